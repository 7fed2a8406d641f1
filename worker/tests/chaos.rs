//! The chaos suite: one job on the real binaries survives seeded faults — `kill -9` of its worker,
//! server restarts, and cancel → resume by curl — and ends with the uninterrupted run's bytes and
//! its whole history in the API.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{prepare_inputs, spec, succeed, Harness};
use serde_json::{json, Value};

/// A small seeded generator (xorshift64*), so a failing run can be replayed.
struct Seeded(u64);

impl Seeded {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }
}

/// Every stored event of a job, all pages.
async fn all_events(harness: &Harness, id: &str) -> Vec<Value> {
    let (mut events, mut after) = (Vec::new(), 0);
    loop {
        let page = harness.get(&format!("/v1/jobs/{id}/events?limit=1000&after={after}")).await;
        events.extend(page["events"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_i64() {
            Some(cursor) => after = cursor,
            None => return events,
        }
    }
}

async fn state_of(harness: &Harness, id: &str) -> String {
    harness.get(&format!("/v1/jobs/{id}")).await["state"].as_str().unwrap().to_string()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_kills_restarts_and_curl_resumes_lose_no_event_and_change_no_byte() {
    let seed = std::env::var("CPT_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261130u64);
    let mut random = Seeded(seed);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let mut harness = Harness::start(root).await;
    let steps_total = 150;
    let mut spec = spec(root, steps_total);
    spec["checkpoint_every"] = json!(10);
    spec["eval_every"] = json!(10);
    spec["eval_data"] = json!({"domain": root.join("heldout").display().to_string()});
    let job = harness.post("/v1/jobs", spec.clone()).await;
    let id = job["id"].as_str().unwrap().to_string();
    let mut faults = Vec::new();

    // Each round waits a seeded number of steps into the current attempt, then injects a fault.
    let plan = ["kill", "cancel-resume", "restart", "kill", "cancel-resume", "kill", "cancel-resume", "restart"];
    for fault in plan {
        let wait_steps = 3 + random.below(12) as usize;
        let text = harness
            .follow(&id, |text| {
                text.rsplit("event: started").next().unwrap().matches("event: step").count() >= wait_steps
            })
            .await;
        if state_of(&harness, &id).await == "succeeded" || text.contains("\"outcome\":\"succeeded\"") {
            break;
        }
        match fault {
            "kill" => harness.crash_worker(root),
            "restart" => {
                harness.stop_server().await;
                harness.start_server(root).await;
            }
            _ => {
                harness.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
                harness.follow(&id, |_| false).await;
                let state = state_of(&harness, &id).await;
                if state == "succeeded" {
                    break;
                }
                assert_eq!(state, "cancelled");
                let resumed = harness.post(&format!("/v1/jobs/{id}/resume"), json!({})).await;
                assert_eq!(resumed["state"], "queued", "{resumed}");
            }
        }
        faults.push(fault);
    }
    harness.follow(&id, |_| false).await;
    let job = harness.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(faults.len() >= 6, "the job ended before the faults were injected: {faults:?}");

    // The whole history: every step, every eval and every checkpoint of the final run.
    let events = all_events(&harness, &id).await;
    let mut per_attempt = BTreeSet::new();
    let mut steps = BTreeSet::new();
    let (mut evals, mut checkpoints) = (BTreeSet::new(), BTreeSet::new());
    for event in &events {
        let (attempt, data) = (event["attempt"].as_u64().unwrap(), &event["data"]);
        let step = data["step"].as_u64();
        match event["kind"].as_str().unwrap() {
            "step" => {
                assert!(
                    per_attempt.insert((attempt, step.unwrap())),
                    "step {step:?} stored twice in attempt {attempt}"
                );
                steps.insert(step.unwrap());
            }
            "eval" => {
                evals.insert(step.unwrap());
            }
            "checkpoint" => {
                checkpoints.insert(step.unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(steps, (1..=steps_total).collect(), "every step 1..N is in the history");
    let tens: BTreeSet<u64> = (1..=steps_total / 10).map(|k| k * 10).collect();
    assert!(tens.is_subset(&checkpoints), "every checkpoint: {checkpoints:?}");
    assert!(tens.is_subset(&evals) && evals.contains(&0), "every eval: {evals:?}");
    let series = harness.get(&format!("/v1/jobs/{id}/metrics")).await;
    assert_eq!(series["steps"]["step"].as_array().unwrap().len() as u64, steps_total);
    assert_eq!(job["progress"]["step"], steps_total, "progress agrees with the events");
    let metrics = harness.http.get(format!("{}/metrics", harness.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(&format!("cpt_step{{job_id=\"{id}\"}} {steps_total}")), "Prometheus agrees: {metrics}");
    harness.stop().await;

    // Byte-identical to a run nobody disturbed.
    std::fs::write(root.join("spec.json"), spec.to_string()).unwrap();
    let reference = root.join("reference");
    tokio::task::block_in_place(|| {
        succeed(&[
            "train",
            "--spec",
            root.join("spec.json").to_str().unwrap(),
            "--run-dir",
            reference.to_str().unwrap(),
        ])
    });
    let run = root.join(format!("worker/runs/{id}"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let path = format!("checkpoints/step-{steps_total}/{file}");
        assert!(read(&run.join(&path)) == read(&reference.join(&path)), "{file} differs from the uninterrupted run's");
    }
    eprintln!("chaos seed {seed}: faults {faults:?}, {} events, 0 lost, 0 bytes differing", events.len());
}
