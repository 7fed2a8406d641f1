//! The worker protocol over real HTTP: leases, heartbeats with cancel, idempotent event batches,
//! lease expiry, and the SSE stream. The test plays the worker's part.

mod common;

use common::{
    checkpoint_event, data_root, error_of, eval_event, spec, started_event, step_event, step_event_with, Server,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn register(server: &Server) -> String {
    let (status, body) = server.call(Method::POST, "/v1/workers", Some(json!({"name": "w", "device": "cpu"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["worker_id"].as_str().unwrap().to_string()
}

async fn submit(server: &Server, root: &std::path::Path, name: &str) -> String {
    let (status, job) = server.call(Method::POST, "/v1/jobs", Some(spec(root, name))).await;
    assert_eq!(status, StatusCode::CREATED);
    job["id"].as_str().unwrap().to_string()
}

async fn lease(server: &Server, worker: &str, wait: u64) -> (StatusCode, Value) {
    server.call(Method::POST, &format!("/v1/workers/{worker}/lease?wait_seconds={wait}"), None).await
}

/// A server with one registered worker holding the lease of one submitted job named "j".
async fn with_leased_job(dir: &std::path::Path) -> (Server, std::path::PathBuf, String, String) {
    let root = data_root(dir);
    let server = Server::start(&dir.join("data"), &root, None).await;
    let worker = register(&server).await;
    let id = submit(&server, &root, "j").await;
    lease(&server, &worker, 0).await;
    (server, root, worker, id)
}

#[tokio::test]
async fn a_lease_hands_out_the_oldest_job_once_and_long_polls_for_new_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let worker = register(&server).await;
    let first = submit(&server, &root, "first").await;
    let second = submit(&server, &root, "second").await;
    let (_, job) = lease(&server, &worker, 0).await;
    assert_eq!(
        (job["id"].as_str(), job["state"].as_str(), job["attempt"].as_i64()),
        (Some(first.as_str()), Some("running"), Some(1))
    );
    assert_eq!(lease(&server, &worker, 0).await.1["id"].as_str(), Some(second.as_str()));
    assert_eq!(lease(&server, &worker, 0).await.0, StatusCode::NO_CONTENT);

    // A waiting lease is answered by the next submission.
    let waiting = {
        let client = server.client.clone();
        let url = format!("{}/v1/workers/{worker}/lease?wait_seconds=30", server.base);
        tokio::spawn(async move { client.post(url).send().await.unwrap().json::<Value>().await.unwrap() })
    };
    let third = submit(&server, &root, "third").await;
    assert_eq!(waiting.await.unwrap()["id"].as_str(), Some(third.as_str()));
    let (status, error) = lease(&server, "no-such-worker", 0).await;
    assert_eq!((status, error_of(&error).0), (StatusCode::NOT_FOUND, "not_found"));
    server.stop().await;
}

#[tokio::test]
async fn heartbeats_carry_cancel_requests_and_finish_ends_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _root, worker, id) = with_leased_job(tmp.path()).await;
    let heartbeat = format!("/v1/workers/{worker}/heartbeat");
    let beat = || server.call(Method::POST, &heartbeat, Some(json!({"job_id": id, "attempt": 1})));
    assert_eq!(beat().await.1["cancel"], false);
    let (_, job) = server.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!(job["state"], "cancelling");
    assert_eq!(beat().await.1["cancel"], true);
    let other = register(&server).await;
    let (status, _) = server
        .call(Method::POST, &format!("/v1/workers/{other}/heartbeat"), Some(json!({"job_id": id, "attempt": 1})))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "only the lease holder may heartbeat");
    let finish = json!({"job_id": id, "attempt": 1, "outcome": "cancelled"});
    let (status, job) = server.call(Method::POST, &format!("/v1/workers/{worker}/finish"), Some(finish.clone())).await;
    assert_eq!((status, job["state"].as_str()), (StatusCode::OK, Some("cancelled")));
    let (status, _) = server.call(Method::POST, &format!("/v1/workers/{worker}/finish"), Some(finish)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    server.stop().await;
}

#[tokio::test]
async fn event_batches_are_stored_once_in_order_and_update_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _root, worker, id) = with_leased_job(tmp.path()).await;
    let batch = json!({"job_id": id, "attempt": 1, "events": [
        started_event(0), step_event(1, 1), step_event(2, 2),
        eval_event(3, 2, "domain", 2.0, 7.389), step_event(4, 3)]});
    let url = format!("/v1/workers/{worker}/events");
    let (status, body) = server.call(Method::POST, &url, Some(batch.clone())).await;
    assert_eq!((status, body["stored"].as_u64(), body["duplicates"].as_u64()), (StatusCode::OK, Some(5), Some(0)));
    let (_, body) = server.call(Method::POST, &url, Some(batch)).await;
    assert_eq!(
        (body["stored"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(5)),
        "a retried batch is stored once"
    );

    let (_, page) = server.call(Method::GET, &format!("/v1/jobs/{id}/events?limit=3"), None).await;
    let seqs: Vec<i64> = page["events"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![0, 1, 2]);
    let cursor = page["next_cursor"].as_i64().unwrap();
    let (_, rest) = server.call(Method::GET, &format!("/v1/jobs/{id}/events?after={cursor}"), None).await;
    assert_eq!(rest["events"].as_array().unwrap().len(), 2);
    let (_, steps) = server.call(Method::GET, &format!("/v1/jobs/{id}/events?kind=step"), None).await;
    assert_eq!(steps["events"].as_array().unwrap().len(), 3);
    let (_, job) = server.call(Method::GET, &format!("/v1/jobs/{id}"), None).await;
    assert_eq!((job["progress"]["step"].as_i64(), job["progress"]["tokens_total"].as_i64()), (Some(3), Some(192)));
    assert_eq!(job["latest_metrics"]["loss"], 2.5);

    let stale = json!({"job_id": id, "attempt": 7, "events": [step_event(5, 4)]});
    assert_eq!(server.call(Method::POST, &url, Some(stale)).await.0, StatusCode::CONFLICT);
    let bad = json!({"job_id": id, "attempt": 1, "events": [{"kind": "step"}]});
    let (status, error) = server.call(Method::POST, &url, Some(bad)).await;
    assert_eq!((status, error_of(&error)), (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_field", Some("events[0]"))));
    server.stop().await;
}

#[tokio::test]
async fn an_expired_lease_requeues_the_job_until_its_attempts_run_out() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start_with(&tmp.path().join("data"), &root, None, None, 1).await;
    let crashing = register(&server).await;
    let id = submit(&server, &root, "j").await;
    for attempt in 1..=3 {
        // The worker leases and then "dies": no heartbeat. The next lease waits for the requeue.
        let (status, job) = lease(&server, &crashing, 30).await;
        assert_eq!(
            (status, job["id"].as_str(), job["attempt"].as_i64()),
            (StatusCode::OK, Some(id.as_str()), Some(attempt))
        );
    }
    // After the third expiry there is nothing left to lease; the job failed with the reason.
    let (status, _) = lease(&server, &crashing, 3).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, job) = server.call(Method::GET, &format!("/v1/jobs/{id}"), None).await;
    assert_eq!(job["state"], "failed");
    assert!(job["error"].as_str().unwrap().contains("3 attempts"), "{job}");
    server.stop().await;
}

#[tokio::test]
async fn the_event_stream_resumes_after_last_event_id_and_ends_with_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _root, worker, id) = with_leased_job(tmp.path()).await;
    let url = format!("/v1/workers/{worker}/events");
    let batch = json!({"job_id": id, "attempt": 1, "events": [step_event(0, 1), step_event(1, 2)]});
    server.call(Method::POST, &url, Some(batch)).await;
    let (_, page) = server.call(Method::GET, &format!("/v1/jobs/{id}/events"), None).await;
    let first_id = page["events"][0]["id"].as_i64().unwrap();

    let mut response = server
        .request(Method::GET, &format!("/v1/jobs/{id}/events/stream"))
        .header("Last-Event-ID", first_id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let more = json!({"job_id": id, "attempt": 1, "events": [step_event(2, 3)]});
    server.call(Method::POST, &url, Some(more)).await;
    server
        .call(
            Method::POST,
            &format!("/v1/workers/{worker}/finish"),
            Some(json!({"job_id": id, "attempt": 1, "outcome": "succeeded"})),
        )
        .await;
    let mut text = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let steps: Vec<i64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![2, 3], "the replay starts after Last-Event-ID, then live events, then the stream ends");
    assert!(text.contains("event: step"));
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_event_streams_instead_of_waiting_for_their_jobs() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _root, _worker, id) = with_leased_job(tmp.path()).await;
    // Headers received: the stream's handler is running, and the job stays running.
    let stream = server.request(Method::GET, &format!("/v1/jobs/{id}/events/stream")).send().await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server.stop()).await.expect("the server stops at once");
    assert!(stream.bytes().await.is_ok(), "the stream ended cleanly");
}

#[tokio::test]
async fn worker_endpoints_need_the_worker_token() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start_with(&tmp.path().join("data"), &root, Some("api"), Some("w0rker"), 30).await;
    let (status, error) = server.call(Method::POST, "/v1/workers", Some(json!({"name": "w"}))).await;
    assert_eq!((status, error_of(&error).0), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let response = server
        .client
        .post(format!("{}/v1/workers", server.base))
        .bearer_auth("w0rker")
        .json(&json!({"name": "w"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    server.stop().await;
}

#[tokio::test]
async fn metrics_show_training_series_job_and_worker_counts_and_pass_promtool() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _root, worker, id) = with_leased_job(tmp.path()).await;
    let batch = json!({"job_id": id, "attempt": 1, "events": [step_event(0, 1), step_event(1, 2),
        eval_event(2, 2, "general", 3.0, 20.0855)]});
    server.call(Method::POST, &format!("/v1/workers/{worker}/events"), Some(batch)).await;
    let text = server.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    for expected in [
        format!("cpt_train_loss{{job_id=\"{id}\"}} 2.5"),
        format!("cpt_tokens_total{{job_id=\"{id}\"}} 128"),
        format!("cpt_eval_perplexity{{job_id=\"{id}\",set=\"general\"}} 20.0855"),
        format!("cpt_job_info{{job_id=\"{id}\",name=\"j\",root_id=\"{id}\"}} 1"),
        "cpt_jobs{state=\"running\"} 1".to_string(),
        "cpt_workers{state=\"active\"} 1".to_string(),
        "cpt_http_requests_total{method=\"POST\",route=\"/v1/workers/{id}/events\",status=\"200\"} 1".to_string(),
    ] {
        assert!(text.contains(&expected), "missing `{expected}` in\n{text}");
    }
    // promtool (Debian's prometheus package; scripts/test.sh installs it) accepts the exposition.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus)");
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    server.stop().await;
}

#[tokio::test]
async fn metric_series_and_checkpoints_are_derived_from_events_with_reruns_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _root, worker, id) = with_leased_job(tmp.path()).await;
    let events = json!({"job_id": id, "attempt": 1, "events": [
        step_event(0, 1), step_event(1, 2),
        eval_event(2, 2, "domain", 2.0, 7.389),
        checkpoint_event(3, 2, "runs/x/checkpoints/step-2"),
        step_event_with(4, 3, 9.0)]});
    server.call(Method::POST, &format!("/v1/workers/{worker}/events"), Some(events)).await;
    // The worker is released after its checkpoint at step 2; attempt 2 re-runs step 3.
    let release = json!({"job_id": id, "attempt": 1, "outcome": "queued"});
    let (_, job) = server.call(Method::POST, &format!("/v1/workers/{worker}/finish"), Some(release)).await;
    assert_eq!(job["state"], "queued");
    assert_eq!(lease(&server, &worker, 0).await.1["attempt"], 2);
    let rerun = json!({"job_id": id, "attempt": 2, "events": [step_event_with(0, 3, 1.0)]});
    server.call(Method::POST, &format!("/v1/workers/{worker}/events"), Some(rerun)).await;
    let (_, series) = server.call(Method::GET, &format!("/v1/jobs/{id}/metrics"), None).await;
    assert_eq!(series["steps"]["step"], json!([1, 2, 3]));
    assert_eq!(series["steps"]["loss"], json!([2.5, 2.5, 1.0]), "attempt 2's step 3 replaces attempt 1's");
    assert_eq!(series["evals"]["domain"]["perplexity"], json!([7.389]));
    let (_, checkpoints) = server.call(Method::GET, &format!("/v1/jobs/{id}/checkpoints"), None).await;
    assert_eq!(
        checkpoints["checkpoints"],
        json!([{"step": 2, "path": "runs/x/checkpoints/step-2", "tokens_total": 128}])
    );
    let (status, _) = server.call(Method::GET, "/v1/jobs/none/metrics", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn a_paused_job_waits_for_a_resume_or_a_cancel_and_a_pending_cancel_wins_over_a_pause() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, root, worker, id) = with_leased_job(tmp.path()).await;
    let finish_path = format!("/v1/workers/{worker}/finish");
    let finish = |job: &str, attempt: u64, outcome: &str| {
        let body = json!({"job_id": job, "attempt": attempt, "outcome": outcome});
        server.call(Method::POST, &finish_path, Some(body))
    };
    let (status, job) = finish(&id, 1, "paused").await;
    assert_eq!((status, job["state"].as_str(), job["worker_id"].as_str()), (StatusCode::OK, Some("paused"), None));
    assert_eq!(lease(&server, &worker, 0).await.0, StatusCode::NO_CONTENT, "a paused job is not leased");
    let (_, listed) = server.call(Method::GET, "/v1/jobs?state=paused", None).await;
    assert_eq!(listed["jobs"][0]["id"].as_str(), Some(id.as_str()));

    let (status, job) = server.call(Method::POST, &format!("/v1/jobs/{id}/resume"), None).await;
    assert_eq!((status, job["state"].as_str()), (StatusCode::OK, Some("queued")));
    let (_, leased) = lease(&server, &worker, 0).await;
    assert_eq!((leased["id"].as_str(), leased["attempt"].as_i64()), (Some(id.as_str()), Some(2)));
    finish(&id, 2, "paused").await;
    let (status, job) = server.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!((status, job["state"].as_str()), (StatusCode::OK, Some("cancelled")));
    assert!(job["finished_at"].is_i64(), "{job}");

    // Cancelled while its worker was pausing it: the cancel wins.
    let other = submit(&server, &root, "k").await;
    lease(&server, &worker, 0).await;
    server.call(Method::POST, &format!("/v1/jobs/{other}/cancel"), None).await;
    let (_, job) = finish(&other, 1, "paused").await;
    assert_eq!(job["state"], "cancelled");
    server.stop().await;
}
