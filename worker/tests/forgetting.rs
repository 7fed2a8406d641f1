//! A forgetting budget through the API on a real worker: training on English makes Chinese text
//! less likely; a `pause` budget on it pauses the job at the first eval past the bound, a metric
//! says so, and a resume continues exactly where it paused.

mod common;

use common::{prepare_inputs_and_chinese, spec, Harness};
use serde_json::{json, Value};

/// (attempt, step) of every step event, and the events of `kind`, in order.
async fn history(harness: &Harness, id: &str) -> (Vec<(u64, u64)>, Vec<Value>) {
    let events = harness.events(id, None).await;
    let steps = events
        .iter()
        .filter(|e| e["kind"] == "step")
        .map(|e| (e["attempt"].as_u64().unwrap(), e["data"]["step"].as_u64().unwrap()))
        .collect();
    let budget = events.iter().filter(|e| e["kind"] == "forgetting_budget").map(|e| e["data"].clone()).collect();
    (steps, budget)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pausing_budget_pauses_the_job_and_a_resume_continues_it_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs_and_chinese(root));
    let harness = Harness::start(root).await;
    let p = |name: &str| root.join(name).display().to_string();
    let mut job = spec(root, 8);
    job["lr"] = json!(1e-2);
    job["eval_every"] = json!(2);
    job["eval_data"] = json!({"english": p("heldout"), "chinese": p("chinese")});
    job["forgetting_budget"] = json!({"chinese": {"max_rise": 0.001, "action": "pause"}});
    let id = harness.post("/v1/jobs", job).await["id"].as_str().unwrap().to_string();
    harness.follow(&id, |_| false).await;
    let paused = harness.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(paused["state"], "paused", "{paused}");
    let (steps, crossings) = history(&harness, &id).await;
    assert_eq!(crossings.len(), 1, "{crossings:?}");
    let at = crossings[0]["step"].as_u64().unwrap();
    assert!(crossings[0]["rise"].as_f64().unwrap() > 0.001 && crossings[0]["action"] == "pause");
    assert_eq!(steps.last(), Some(&(1, at)), "it paused at the eval that crossed");
    let metrics = harness.http.get(format!("{}/metrics", harness.base)).send().await.unwrap().text().await.unwrap();
    let exceeded = format!("cpt_forgetting_budget_exceeded{{job_id=\"{id}\",set=\"chinese\"}} 1");
    assert!(metrics.contains(&exceeded), "{metrics}");
    assert!(metrics.contains(&format!("cpt_eval_perplexity_change_ratio{{job_id=\"{id}\",set=\"english\"}}")));

    // `cpt-worker watch` stops at a pause too, and says how to go on.
    let watched = tokio::task::block_in_place(|| {
        common::worker_bin().args(["watch", &id, "--server", &harness.base]).output().unwrap()
    });
    let said = String::from_utf8_lossy(&watched.stderr);
    assert!(!watched.status.success() && said.contains("paused by a forgetting budget"), "{said}");

    let resumed = harness.post(&format!("/v1/jobs/{id}/resume"), json!({})).await;
    assert_eq!(resumed["state"], "queued", "{resumed}");
    harness.follow(&id, |_| false).await;
    let (steps, crossings) = history(&harness, &id).await;
    let second: Vec<u64> = steps.iter().filter(|(attempt, _)| *attempt == 2).map(|(_, step)| *step).collect();
    assert_eq!(second.first(), Some(&(at + 1)), "the resumed attempt continues after the pause: {steps:?}");
    let state = harness.get(&format!("/v1/jobs/{id}")).await["state"].clone();
    // Still past the bound, it pauses again at its next eval (or ends, had it been the last).
    let expected = if at + 2 <= 8 { "paused" } else { "succeeded" };
    assert_eq!(state, expected, "{crossings:?}");
    if state == "paused" {
        let cancelled = harness.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
        assert_eq!(cancelled["state"], "cancelled");
    }
    harness.stop().await;
}
