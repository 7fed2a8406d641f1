//! End to end: a real cpt-server (in process, real HTTP on port 0, SQLite file) and the real
//! `cpt-worker run` binary training a tiny model: success, then cancel → resume with weights
//! bit-identical to an uninterrupted run.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_on_a_worker_and_a_cancelled_one_resumes_to_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let harness = Harness::start(root).await;

    // A short job succeeds; every step event is stored once, the events page and the SSE stream
    // agree, and the metrics show its loss, tokens, throughput and both eval perplexities.
    let mut short = spec(root, 6);
    let heldout = root.join("heldout").display().to_string();
    short["eval_data"] = json!({"domain": heldout, "general": heldout});
    let job = harness.post("/v1/jobs", short).await;
    let id = job["id"].as_str().unwrap().to_string();
    let stream = harness.follow(&id, |_| false).await;
    let job = harness.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["progress"]["step"], 6);
    let steps = harness.get(&format!("/v1/jobs/{id}/events?kind=step")).await;
    let numbers: Vec<u64> =
        steps["events"].as_array().unwrap().iter().map(|e| e["data"]["step"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=6).collect::<Vec<_>>());
    let streamed: Vec<u64> = stream
        .split("\n\n")
        .filter(|message| message.contains("event: step"))
        .map(|message| {
            let data = message.lines().find_map(|line| line.strip_prefix("data: ")).unwrap();
            serde_json::from_str::<Value>(data).unwrap()["step"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(streamed, numbers, "the SSE stream shows the stored steps");
    let metrics = harness.http.get(format!("{}/metrics", harness.base)).send().await.unwrap().text().await.unwrap();
    for series in ["cpt_train_loss", "cpt_tokens_total", "cpt_tokens_per_second", "cpt_learning_rate"] {
        assert!(metrics.contains(&format!("{series}{{job_id=\"{id}\"}}")), "{series} in {metrics}");
    }
    for set in ["domain", "general"] {
        let series = format!("cpt_eval_perplexity{{job_id=\"{id}\",set=\"{set}\"}}");
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
    let run = root.join(format!("worker/runs/{id}"));
    assert!(run.join("checkpoints/step-6/model.safetensors").exists());
    assert!(!run.join("spool/attempt-1.jsonl").exists(), "a delivered spool is removed");

    // A long job is cancelled mid-run: it checkpoints and stops; resumed, it finishes.
    let steps_total = 300;
    let job = harness.post("/v1/jobs", spec(root, steps_total)).await;
    let long = job["id"].as_str().unwrap().to_string();
    harness.follow(&long, |text| text.contains("event: step")).await;
    let cancelling = harness.post(&format!("/v1/jobs/{long}/cancel"), json!({})).await;
    assert_eq!(cancelling["state"], "cancelling", "{cancelling}");
    harness.follow(&long, |_| false).await;
    let job = harness.get(&format!("/v1/jobs/{long}")).await;
    assert_eq!(job["state"], "cancelled", "{job}");
    let stopped_at = job["progress"]["step"].as_u64().unwrap();
    assert!(stopped_at < steps_total, "the cancel landed after the end ({stopped_at})");
    let run = root.join(format!("worker/runs/{long}"));
    assert!(run.join(format!("checkpoints/step-{stopped_at}")).exists(), "a checkpoint at the cancelled step");
    let resumed = harness.post(&format!("/v1/jobs/{long}/resume"), json!({})).await;
    assert_eq!(resumed["state"], "queued");
    harness.follow(&long, |_| false).await;
    assert_eq!(harness.get(&format!("/v1/jobs/{long}")).await["state"], "succeeded");
    harness.stop().await;

    assert_same_bytes_as_uninterrupted(root, &spec(root, steps_total), &run, steps_total, &["model.safetensors"]);
}

fn steps_by_attempt(events: &Value) -> Vec<(i64, u64)> {
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["attempt"].as_i64().unwrap(), e["data"]["step"].as_u64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_and_a_restarted_server_lose_nothing_and_change_no_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let mut harness = Harness::start(root).await;
    let steps_total = 200;
    let mut spec = spec(root, steps_total);
    spec["checkpoint_every"] = json!(20);
    let job = harness.post("/v1/jobs", spec.clone()).await;
    let id = job["id"].as_str().unwrap().to_string();

    // kill -9 after the first checkpoint: the lease expires and a new worker resumes from it.
    harness.follow(&id, |text| text.contains("event: checkpoint")).await;
    harness.crash_worker(root);
    // The server goes away while the new attempt trains: its events wait in the on-disk spool and
    // arrive once the server is back.
    let into_second_attempt = |text: &str| {
        text.matches("event: started").count() >= 2
            && text.rsplit("event: started").next().is_some_and(|tail| tail.matches("event: step").count() >= 5)
    };
    harness.follow(&id, into_second_attempt).await;
    harness.stop_server().await;
    let spool = root.join(format!("worker/runs/{id}/spool/attempt-2.jsonl"));
    let spooled_steps = || std::fs::read_to_string(&spool).unwrap_or_default().matches(r#""kind":"step""#).count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while spooled_steps() < 10 {
        assert!(std::time::Instant::now() < deadline, "the worker spools step events while the server is down");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    harness.start_server(root).await;
    harness.follow(&id, |_| false).await;

    let job = harness.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!((job["state"].as_str(), job["attempt"].as_i64()), (Some("succeeded"), Some(2)), "{job}");
    let steps = harness.get(&format!("/v1/jobs/{id}/events?kind=step&limit=1000")).await;
    let steps = steps_by_attempt(&steps);
    let second: Vec<u64> = steps.iter().filter(|(a, _)| *a == 2).map(|(_, s)| *s).collect();
    let first: Vec<u64> = steps.iter().filter(|(a, _)| *a == 1).map(|(_, s)| *s).collect();
    assert_eq!(first, (1..=first.len() as u64).collect::<Vec<_>>(), "attempt 1: each step once, in order");
    let resumed_from = second[0] - 1;
    assert!(resumed_from % 20 == 0 && resumed_from >= 20, "attempt 2 starts after a checkpoint, not at {resumed_from}");
    assert_eq!(second, (resumed_from + 1..=steps_total).collect::<Vec<_>>(), "attempt 2: every step once, none lost");
    harness.stop().await;

    let run = root.join(format!("worker/runs/{id}"));
    assert_same_bytes_as_uninterrupted(root, &spec, &run, steps_total, &["model.safetensors"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_default_runs_jobs_on_the_local_worker_it_supervises() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, server) = serve_with(root, listener, 1);
    let http = reqwest::Client::new();
    let job: Value =
        http.post(format!("{base}/v1/jobs")).json(&spec(root, 4)).send().await.unwrap().json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let stream = http.get(format!("{base}/v1/jobs/{id}/events/stream")).send().await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(300), stream.bytes())
        .await
        .expect("the job ended in time")
        .unwrap();
    let job: Value = http.get(format!("{base}/v1/jobs/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["worker_id"].is_string());
    assert!(root.join(format!("server/runs/{id}/checkpoints/step-4/model.safetensors")).exists());

    // Shutting down mid-job drains the local worker first: checkpoint, every event delivered, job queued.
    let job: Value =
        http.post(format!("{base}/v1/jobs")).json(&spec(root, 300)).send().await.unwrap().json().await.unwrap();
    let long = job["id"].as_str().unwrap().to_string();
    let mut stream = http.get(format!("{base}/v1/jobs/{long}/events/stream")).send().await.unwrap();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        if String::from_utf8_lossy(&chunk).contains("event: step") {
            break;
        }
    }
    drop(stream);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, server) = serve(root, listener);
    let job: Value = http.get(format!("{base}/v1/jobs/{long}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(job["state"], "queued", "released by the draining worker: {job}");
    let step = job["progress"]["step"].as_u64().unwrap();
    assert!(root.join(format!("server/runs/{long}/checkpoints/step-{step}/model.safetensors")).exists(), "{job}");
    let url = format!("{base}/v1/jobs/{long}/events?kind=step&limit=1000");
    let events: Value = http.get(url).send().await.unwrap().json().await.unwrap();
    let steps: Vec<u64> =
        events["events"].as_array().unwrap().iter().map(|e| e["data"]["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=step).collect::<Vec<_>>(), "no event lost in the shutdown");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_checkpoints_releases_the_job_and_another_worker_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let mut harness = Harness::start(root).await;
    let job = harness.post("/v1/jobs", spec(root, 300)).await;
    let id = job["id"].as_str().unwrap().to_string();
    harness.follow(&id, |text| text.contains("event: step")).await;
    assert!(harness.terminate_worker(), "the worker exits 0 after draining");
    let job = harness.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["state"], "queued", "released for another worker: {job}");
    let step = job["progress"]["step"].as_u64().unwrap();
    assert!(step > 0 && step < 300);
    assert!(root.join(format!("worker/runs/{id}/checkpoints/step-{step}/model.safetensors")).exists());
    harness.worker = spawn_worker(root, &harness.base);
    harness.follow(&id, |_| false).await;
    let job = harness.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!((job["state"].as_str(), job["attempt"].as_i64()), (Some("succeeded"), Some(2)), "{job}");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dataset_prepared_through_the_api_trains_a_job() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/english.txt"),
        root.join("english.txt"),
    )
    .unwrap();
    let harness = Harness::start(root).await;
    let p = |name: &str| root.join(name).display().to_string();
    let request = json!({"name": "english", "tokenizer": p("smollm2/tokenizer.json"), "inputs": [p("english.txt")],
                         "config": {"seq_len": 16, "validation_fraction": 0.0}});
    let dataset = harness.post("/v1/datasets", request.clone()).await;
    let id = dataset["id"].as_str().unwrap().to_string();
    // The idle worker may lease it before the response is written.
    assert!(["queued", "running"].contains(&dataset["state"].as_str().unwrap()), "{dataset}");
    harness.follow(&id, |_| false).await;
    let dataset = harness.get(&format!("/v1/datasets/{id}")).await;
    assert_eq!(dataset["state"], "succeeded", "{dataset}");
    assert_eq!(dataset["manifest"]["stats"]["documents_read"], 1);
    let path = dataset["path"].as_str().unwrap().to_string();
    assert!(Path::new(&path).join("manifest.json").exists());
    let listed = harness.get("/v1/datasets").await;
    assert_eq!(listed["datasets"][0]["id"], id.as_str());

    let mut train = spec(root, 4);
    train["train_data"] = json!([{"dataset": path}]);
    let job = harness.post("/v1/jobs", train).await;
    let job_id = job["id"].as_str().unwrap().to_string();
    harness.follow(&job_id, |_| false).await;
    assert_eq!(harness.get(&format!("/v1/jobs/{job_id}")).await["state"], "succeeded");

    let mut outside = request;
    outside["inputs"] = json!(["/etc/passwd"]);
    let refused = harness.post("/v1/datasets", outside).await;
    assert_eq!(refused["error"]["field"], "inputs[0]", "{refused}");
    harness.stop().await;
}
