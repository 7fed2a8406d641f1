//! The chaos suite: one job on the real binaries survives seeded faults — `kill -9` of its worker,
//! server restarts, and cancel → resume by curl — and ends with the uninterrupted run's bytes and
//! its whole history in the API.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{assert_same_bytes_as_uninterrupted, prepare_inputs, spec, Harness};
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

#[tokio::test(flavor = "multi_thread")]
async fn seeded_kills_restarts_and_curl_resumes_lose_no_event_and_change_no_byte() {
    let seed = std::env::var("CPT_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261130u64);
    let mut random = Seeded(seed);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let mut harness = Harness::start(root).await;
    let steps_total = 400;
    let mut spec = spec(root, steps_total);
    spec["checkpoint_every"] = json!(10);
    spec["eval_every"] = json!(10);
    spec["max_steps"] = json!(steps_total);
    spec["eval_data"] = json!({"domain": root.join("heldout").display().to_string()});
    let job = harness.post("/v1/jobs", spec.clone()).await;
    let id = job["id"].as_str().unwrap().to_string();
    let mut faults = Vec::new();
    let mut kills_in_checkpoint = 0;

    // Each round waits a seeded number of steps into the current attempt, then injects a fault.
    // At most two kills without a resume between them: three lost leases in a row fail a job
    // (max_attempts). Ten kills, half of them inside a checkpoint write.
    let plan = [
        "kill-in-checkpoint",
        "kill",
        "cancel-resume",
        "restart",
        "kill",
        "kill-in-checkpoint",
        "cancel-resume",
        "kill-in-checkpoint",
        "kill",
        "cancel-resume",
        "restart",
        "kill",
        "kill-in-checkpoint",
        "cancel-resume",
        "kill",
        "kill-in-checkpoint",
        "cancel-resume",
    ];
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
            "kill-in-checkpoint" => {
                // Waits for a checkpoint being staged (`.step-N.partial-PID`), then kills the worker in it.
                let checkpoints = root.join(format!("worker/runs/{id}/checkpoints"));
                let staging = || {
                    std::fs::read_dir(&checkpoints)
                        .map(|dir| dir.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".step-")))
                        .unwrap_or(false)
                };
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while !staging() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                let caught = staging();
                harness.crash_worker(root);
                if caught {
                    kills_in_checkpoint += 1;
                }
            }
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
    assert_eq!(faults.len(), plan.len(), "the job ended before every fault was injected: {faults:?}");
    assert!(kills_in_checkpoint >= 1, "no kill landed inside a checkpoint write: {faults:?}");

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
    let run = root.join(format!("worker/runs/{id}"));
    assert_same_bytes_as_uninterrupted(root, &spec, &run, steps_total, &["model.safetensors", "optimizer.safetensors"]);
    eprintln!(
        "chaos seed {seed}: faults {faults:?} ({kills_in_checkpoint} kills inside a checkpoint write), {} events, \
         0 lost, 0 bytes differing",
        events.len()
    );
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: &str) {
    assert!(std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_frozen_past_the_lease_ttl_requeues_nothing_when_it_thaws() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let server_bin = Path::new(env!("CARGO_BIN_EXE_cpt-worker")).with_file_name("cpt-server");
    assert!(server_bin.exists(), "{} is built by `cargo test --workspace`", server_bin.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = std::process::Command::new(&server_bin)
        .args(["--bind", &format!("127.0.0.1:{port}"), "--lease-ttl-seconds", "2", "--local-workers", "0"])
        .arg("--data-dir")
        .arg(root.join("server"))
        .arg("--data-roots")
        .arg(root)
        .env("CPT_LOG", "warn")
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    // The server binds before it answers: retry only the connection, never past 30 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http.get(format!("{base}/readyz")).send().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "cpt-server did not start");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut worker = common::spawn_worker(root, &base);
    let steps_total = 1500;
    let job: Value =
        http.post(format!("{base}/v1/jobs")).json(&spec(root, steps_total)).send().await.unwrap().json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let progress = |job: &Value| job["progress"]["step"].as_u64().unwrap_or(0);
    let get_job =
        || async { http.get(format!("{base}/v1/jobs/{id}")).send().await.unwrap().json::<Value>().await.unwrap() };
    while progress(&get_job().await) < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before = get_job().await;
    assert!(progress(&before) < steps_total / 2, "the job must outlast the freeze: {before}");
    // Frozen for three lease periods: the worker's heartbeats wait in the socket backlog.
    signal(server.id(), "-STOP");
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    signal(server.id(), "-CONT");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let job = loop {
        let job = get_job().await;
        if job["state"] != "running" && job["state"] != "queued" {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "the job did not end: {job}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let _ = worker.kill();
    let _ = worker.wait();
    signal(server.id(), "-TERM");
    let _ = server.wait();
    assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(1)), "never requeued: {job}");
    assert_eq!(progress(&job), steps_total);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preparation_slower_than_the_lease_keeps_its_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    // The preparation reads a named pipe: it cannot finish before the test writes the text.
    let pipe = root.join("slow.txt");
    assert!(std::process::Command::new("mkfifo").arg(&pipe).status().unwrap().success());
    let harness = Harness::start(root).await;
    let p = |name: &str| root.join(name).display().to_string();
    let request = json!({"name": "slow", "tokenizer": p("smollm2/tokenizer.json"), "inputs": [p("slow.txt")],
                         "config": {"seq_len": 16, "validation_fraction": 0.0}});
    let dataset = harness.post("/v1/datasets", request).await;
    let id = dataset["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while harness.get(&format!("/v1/jobs/{id}")).await["state"] != "running" {
        assert!(std::time::Instant::now() < deadline, "the preparation was never leased");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Three lease periods (TTL 3 s) of preparing, then the text arrives.
    tokio::time::sleep(std::time::Duration::from_secs(9)).await;
    let text = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/english.txt")).unwrap();
    tokio::task::spawn_blocking(move || std::fs::write(pipe, text).unwrap()).await.unwrap();
    harness.follow(&id, |_| false).await;
    let job = harness.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(1)), "never requeued: {job}");
    harness.stop().await;
}
