//! A sweep through the API on a real worker: its jobs run one after the other, and the sweep's
//! table, its plot and `cpt-worker sweep` agree with the eval events the jobs sent.

mod common;

use common::{prepare_inputs_and_chinese, spec, Harness};
use serde_json::{json, Value};

/// The perplexity of every eval of `set` in a job's events, by step.
fn perplexities(events: &[Value], set: &str) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter(|e| e["data"]["set"] == set)
        .map(|e| (e["data"]["step"].as_u64().unwrap(), e["data"]["perplexity"].as_f64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_runs_every_job_and_its_table_plot_and_terminal_view_match_their_evals() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs_and_chinese(root));
    let harness = Harness::start(root).await;
    let p = |name: &str| root.join(name).display().to_string();
    let mut base = spec(root, 6);
    base["eval_every"] = json!(3);
    base["eval_data"] = json!({"domain": p("heldout"), "general": p("chinese")});
    let (status, sweep) =
        harness.call("/v1/sweeps", json!({"name": "tiny lr", "base": base, "grid": {"lr": [1e-3, 1e-2]}})).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{sweep}");
    let id = sweep["id"].as_str().unwrap().to_string();
    let jobs: Vec<String> =
        sweep["jobs"].as_array().unwrap().iter().map(|j| j["job_id"].as_str().unwrap().into()).collect();
    for job in &jobs {
        harness.follow(job, |_| false).await;
    }

    let sweep = harness.get(&format!("/v1/sweeps/{id}")).await;
    assert_eq!(sweep["state"], "succeeded", "{sweep}");
    for (line, job) in sweep["jobs"].as_array().unwrap().iter().zip(&jobs) {
        let events = harness.events(job, Some("eval")).await;
        for set in ["domain", "general"] {
            let course = perplexities(&events, set);
            assert_eq!(course.iter().map(|c| c.0).collect::<Vec<_>>(), [0, 3, 6], "{set}: {course:?}");
            let summary = &line["eval"][set];
            assert_eq!(summary["initial"].as_f64(), Some(course[0].1));
            assert_eq!((summary["final"].as_f64(), summary["final_step"].as_u64()), (Some(course[2].1), Some(6)));
            let best = course.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
            assert_eq!(summary["best"].as_f64(), Some(best));
        }
        assert_eq!((line["step"].as_i64(), line["tokens_total"].as_i64()), (Some(6), Some(6 * 2 * 16)));
        assert!(line["wall_seconds"].as_f64().unwrap() > 0.0);
    }
    let lines = sweep["jobs"].as_array().unwrap();
    assert_ne!(lines[0]["eval"]["domain"]["final"], lines[1]["eval"]["domain"]["final"], "the rates differ");

    let plot_path = root.join("plot.svg");
    let shown = tokio::task::block_in_place(|| {
        common::worker_bin()
            .args(["sweep", &id, "--server", &harness.base, "--plot", plot_path.to_str().unwrap()])
            .output()
            .unwrap()
    });
    let table = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    assert!(table.contains("lr=0.001") && table.contains("lr=0.01 "), "{table}");
    for line in lines {
        let final_domain = line["eval"]["domain"]["final"].as_f64().unwrap();
        assert!(table.contains(&format!("{final_domain:.2} (")), "{table}");
    }
    let svg = std::fs::read_to_string(&plot_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("tiny lr [lr=0.001]") && svg.contains("tiny lr [lr=0.01]"));
    harness.stop().await;
}
