//! Records are never lost: resumed attempts, attempts that lost their lease, slow SSE readers, big
//! batches racing each other, finishes racing cancels and stale workers. Each test reproduces a
//! defect an unlucky run or a hostile client hit.

mod common;

use common::{data_root, error_of, eval_event, spec, step_event, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn register(server: &Server) -> String {
    let (status, body) = server.call(Method::POST, "/v1/workers", Some(json!({"name": "w", "device": "cpu"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["worker_id"].as_str().unwrap().to_string()
}

async fn submit(server: &Server, root: &std::path::Path) -> String {
    let (status, job) = server.call(Method::POST, "/v1/jobs", Some(spec(root, "j"))).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    job["id"].as_str().unwrap().to_string()
}

async fn lease(server: &Server, worker: &str, wait: u64) -> Value {
    let (status, job) =
        server.call(Method::POST, &format!("/v1/workers/{worker}/lease?wait_seconds={wait}"), None).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job
}

async fn post_events(server: &Server, worker: &str, id: &str, attempt: u64, events: Vec<Value>) -> (StatusCode, Value) {
    let batch = json!({"job_id": id, "attempt": attempt, "events": events});
    server.call(Method::POST, &format!("/v1/workers/{worker}/events"), Some(batch)).await
}

async fn finish(server: &Server, worker: &str, id: &str, attempt: u64, outcome: &str) -> (StatusCode, Value) {
    let body = json!({"job_id": id, "attempt": attempt, "outcome": outcome});
    server.call(Method::POST, &format!("/v1/workers/{worker}/finish"), Some(body)).await
}

async fn steps_of(server: &Server, id: &str) -> Vec<u64> {
    let (_, series) = server.call(Method::GET, &format!("/v1/jobs/{id}/metrics"), None).await;
    series["steps"]["step"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect()
}

#[tokio::test]
async fn a_resumed_job_runs_a_new_attempt_whose_events_are_all_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let worker = register(&server).await;
    let id = submit(&server, &root).await;
    assert_eq!(lease(&server, &worker, 0).await["attempt"], 1);
    post_events(&server, &worker, &id, 1, vec![step_event(0, 1), step_event(1, 2)]).await;
    server.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!(finish(&server, &worker, &id, 1, "cancelled").await.0, StatusCode::OK);
    for round in 0..3u64 {
        let (status, job) = server.call(Method::POST, &format!("/v1/jobs/{id}/resume"), None).await;
        assert_eq!((status, job["retries"].as_i64()), (StatusCode::OK, Some(0)), "{job}");
        let attempt = 2 + round;
        assert_eq!(lease(&server, &worker, 0).await["attempt"], attempt, "attempt never repeats");
        let (status, reply) = post_events(
            &server,
            &worker,
            &id,
            attempt,
            vec![step_event(0, 3 + round), eval_event(1, 3 + round, "domain", 2.0, 7.4)],
        )
        .await;
        assert_eq!((status, reply["stored"].as_u64()), (StatusCode::OK, Some(2)), "{reply}");
        server.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await;
        finish(&server, &worker, &id, attempt, "cancelled").await;
    }
    assert_eq!(steps_of(&server, &id).await, vec![1, 2, 3, 4, 5]);
    let (_, job) = server.call(Method::GET, &format!("/v1/jobs/{id}"), None).await;
    assert_eq!(job["progress"]["step"], 5, "progress follows the resumed runs");
    server.stop().await;
}

#[tokio::test]
async fn an_attempt_that_lost_its_lease_still_delivers_its_events_as_history() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start_with(&tmp.path().join("data"), &root, None, None, 1).await;
    let (slow, fast) = (register(&server).await, register(&server).await);
    let id = submit(&server, &root).await;
    lease(&server, &slow, 0).await;
    post_events(&server, &slow, &id, 1, vec![step_event(0, 1)]).await;
    // The slow worker misses its heartbeats; the job moves to another worker.
    let job = lease(&server, &fast, 30).await;
    assert_eq!((job["id"].as_str(), job["attempt"].as_u64()), (Some(id.as_str()), Some(2)));
    post_events(&server, &fast, &id, 2, vec![step_event(0, 2), step_event(1, 3)]).await;
    let (status, _) = server
        .call(Method::POST, &format!("/v1/workers/{slow}/heartbeat"), Some(json!({"job_id": id, "attempt": 1})))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "the lease is gone");
    // What the slow worker recorded before it noticed still reaches the history.
    let (status, reply) =
        post_events(&server, &slow, &id, 1, vec![step_event(1, 2), eval_event(2, 2, "domain", 2.5, 12.2)]).await;
    assert_eq!((status, reply["stored"].as_u64()), (StatusCode::OK, Some(2)), "{reply}");
    let (_, again) = post_events(&server, &slow, &id, 1, vec![step_event(1, 2)]).await;
    assert_eq!(again["duplicates"], 1, "stored once");
    let (_, job) = server.call(Method::GET, &format!("/v1/jobs/{id}"), None).await;
    assert_eq!(
        (job["state"].as_str(), job["progress"]["step"].as_i64()),
        (Some("running"), Some(3)),
        "history changes no state"
    );
    let (_, series) = server.call(Method::GET, &format!("/v1/jobs/{id}/metrics"), None).await;
    assert_eq!(series["evals"]["domain"]["step"], json!([2]));
    // Nobody else may write the slow worker's history, and nothing is taken after a finish.
    let (status, _) = post_events(&server, &fast, &id, 1, vec![step_event(5, 2)]).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(finish(&server, &fast, &id, 2, "succeeded").await.0, StatusCode::OK);
    let (status, error) = post_events(&server, &fast, &id, 2, vec![step_event(2, 4)]).await;
    assert_eq!((status, error_of(&error).0), (StatusCode::CONFLICT, "invalid_state"), "no events after the end");
    server.stop().await;
}

#[tokio::test]
async fn a_finish_is_guarded_by_attempt_and_a_cancel_cannot_erase_a_success() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let worker = register(&server).await;
    let id = submit(&server, &root).await;
    lease(&server, &worker, 0).await;
    // Released and leased again by the same worker: attempt 1's late finish must not end attempt 2.
    assert_eq!(finish(&server, &worker, &id, 1, "queued").await.0, StatusCode::OK);
    assert_eq!(lease(&server, &worker, 0).await["attempt"], 2);
    let (status, _) = finish(&server, &worker, &id, 1, "failed").await;
    assert_eq!(status, StatusCode::CONFLICT, "a stale attempt finishes nothing");
    // A cancel arriving while the run succeeds: the success stands.
    server.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await;
    let (status, job) = finish(&server, &worker, &id, 2, "succeeded").await;
    assert_eq!((status, job["state"].as_str()), (StatusCode::OK, Some("succeeded")));
    let (_, job) = server.call(Method::GET, &format!("/v1/jobs/{id}"), None).await;
    assert_eq!((job["state"].as_str(), job["retries"].as_i64()), (Some("succeeded"), Some(1)), "{job}");
    server.stop().await;
}

#[tokio::test]
async fn a_slow_sse_reader_gets_every_event_once_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let data = tmp.path().join("data");
    let server = Server::start_big(&data, &root).await;
    let worker = register(&server).await;
    let mut spec = spec(&root, "long");
    spec["max_steps"] = json!(100_000);
    let (_, job) = server.call(Method::POST, "/v1/jobs", Some(spec)).await;
    let id = job["id"].as_str().unwrap().to_string();
    lease(&server, &worker, 0).await;
    let mut stream = server.request(Method::GET, &format!("/v1/jobs/{id}/events/stream")).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    // 6000 events while the reader reads nothing: far more than the live channel holds.
    let total = 6000u64;
    for chunk in 0..total / 500 {
        let events = (0..500).map(|i| step_event(chunk * 500 + i, chunk * 500 + i + 1)).collect();
        let (status, _) = post_events(&server, &worker, &id, 1, events).await;
        assert_eq!(status, StatusCode::OK);
    }
    finish(&server, &worker, &id, 1, "succeeded").await;
    let mut text = String::new();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let seqs: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..total).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn concurrent_megabyte_batches_and_many_streams_cause_no_server_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start_big(&tmp.path().join("data"), &root).await;
    let mut spec = spec(&root, "big");
    spec["max_steps"] = json!(100_000);
    let (_, job) = server.call(Method::POST, "/v1/jobs", Some(spec)).await;
    let id = job["id"].as_str().unwrap().to_string();
    let worker = register(&server).await;
    lease(&server, &worker, 0).await;
    let streams: Vec<_> = (0..200)
        .map(|_| {
            let request = server.request(Method::GET, &format!("/v1/jobs/{id}/events/stream")).send();
            async move { request.await.unwrap() }
        })
        .collect();
    let streams: Vec<reqwest::Response> = futures_join(streams).await;
    // 8 batches of ~1 MB each (long warning messages), at once.
    let batches: Vec<_> = (0..8u64)
        .map(|b| {
            let events: Vec<Value> = (0..100u64)
                .map(|i| {
                    json!({"seq": b * 100 + i, "kind": "warning", "time": 1, "step": 1, "code": "loss_spike",
                                "message": "x".repeat(10_000)})
                })
                .collect();
            let batch = json!({"job_id": id, "attempt": 1, "events": events});
            let request = server.request(Method::POST, &format!("/v1/workers/{worker}/events")).json(&batch).send();
            async move { request.await.unwrap() }
        })
        .collect();
    for response in futures_join(batches).await {
        assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    }
    finish(&server, &worker, &id, 1, "succeeded").await;
    let readers: Vec<_> = streams
        .into_iter()
        .map(|response| async move { response.text().await.unwrap().matches("event: warning").count() })
        .collect();
    for count in futures_join(readers).await {
        assert_eq!(count, 800, "every stream saw every event");
    }
    server.stop().await;
}

/// Runs futures concurrently on the test's runtime and returns their outputs in order.
async fn futures_join<T: Send + 'static>(
    futures: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_job_failed_by_lease_expiry_leaves_no_series_behind_after_the_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let mut config = Server::config(&tmp.path().join("data"), &root, None, None, 1);
    config.metrics_retention_seconds = 0;
    config.max_attempts = 1;
    let server = Server::start_config(config).await;
    let worker = register(&server).await;
    let id = submit(&server, &root).await;
    lease(&server, &worker, 0).await;
    post_events(&server, &worker, &id, 1, vec![step_event(0, 1)]).await;
    let scrape = || async { server.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap() };
    assert!(scrape().await.contains(&format!("cpt_train_loss{{job_id=\"{id}\"}}")));
    // No heartbeat: the only lease expires and the job fails; its series go once retention (0 s) passes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, job) = server.call(Method::GET, &format!("/v1/jobs/{id}"), None).await;
        if job["state"] == "failed" && !scrape().await.contains(&id) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still there: {job}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.stop().await;
}
