//! One request must not stop a shared server: each request below once hung it, made it walk the
//! disk, burned its CPU, crashed its workers or slipped past its browser rules. While they run, a
//! `/healthz` probe every 100 ms must always be answered within a second.

mod common;

use std::time::{Duration, Instant};

use common::{data_root, error_of, eval_event, spec, step_event_with, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Probes `/healthz` every 100 ms until stopped; [`HealthProbe::slowest`] says how long it waited at most.
struct HealthProbe {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Duration>,
}

impl HealthProbe {
    fn start(base: &str) -> HealthProbe {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let url = format!("{base}/healthz");
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ticks = tokio::time::interval(Duration::from_millis(100));
            let mut slowest = Duration::ZERO;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stopped.changed() => return slowest,
                }
                let asked = Instant::now();
                let answer = tokio::time::timeout(Duration::from_secs(5), client.get(&url).send()).await;
                slowest = slowest.max(asked.elapsed());
                assert!(matches!(answer, Ok(Ok(ref r)) if r.status() == StatusCode::OK), "/healthz: {answer:?}");
            }
        });
        HealthProbe { stop, task }
    }

    /// The slowest `/healthz` answer while it ran.
    async fn slowest(self) -> Duration {
        self.stop.send(true).unwrap();
        self.task.await.unwrap()
    }
}

/// A job of `spec` submitted to `server` and leased to a new worker: (job id, worker id).
async fn leased_job(server: &Server, spec: Value) -> (String, String) {
    let (_, job) = server.call(Method::POST, "/v1/jobs", Some(spec)).await;
    let id = job["id"].as_str().unwrap().to_string();
    let (_, worker) = server.call(Method::POST, "/v1/workers", Some(json!({"name": "w", "device": "cpu"}))).await;
    let worker = worker["worker_id"].as_str().unwrap().to_string();
    server.call(Method::POST, &format!("/v1/workers/{worker}/lease?wait_seconds=0"), None).await;
    (id, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_values_chart_in_bounded_time_and_the_server_stays_responsive() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let (id, worker) = leased_job(&server, spec(&root, "poisoned")).await;
    let mut events = vec![step_event_with(0, 1, 1e308), step_event_with(1, 2, -1e308), step_event_with(2, 3, 2.0)];
    let mut eval = eval_event(3, 3, "domain", 1e308, f64::MAX);
    eval["bits_per_byte"] = json!(-1e308);
    events.push(eval);
    events.push(eval_event(4, 4, "domain", -1e308, 1e-300));
    let batch = json!({"job_id": id, "attempt": 1, "events": events});
    let (status, body) = server.call(Method::POST, &format!("/v1/workers/{worker}/events"), Some(batch)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let probe = HealthProbe::start(&server.base);
    for _round in 0..2 {
        for chart in ["loss", "lr", "throughput", "perplexity", "bits_per_byte"] {
            let path = format!("/v1/jobs/{id}/plot.svg?chart={chart}");
            let answer = tokio::time::timeout(Duration::from_secs(20), server.request(Method::GET, &path).send()).await;
            let response = answer.unwrap_or_else(|_| panic!("{chart}: no answer in 20 s")).unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{chart}");
            assert_eq!(response.headers()["x-content-type-options"], "nosniff");
            assert!(response.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'none'"));
            let svg = response.text().await.unwrap();
            assert!(svg.trim_end().ends_with("</svg>") && !svg.contains("NaN"), "{chart}");
        }
    }
    let slowest = probe.slowest().await;
    assert!(slowest < Duration::from_secs(1), "/healthz waited {slowest:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_are_confined_to_the_roots_before_any_walk_and_say_nothing_of_what_lies_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    std::fs::write(root.join("tokenizer.json"), "{}").unwrap();
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let dataset = |inputs: Value| json!({"name": "d", "tokenizer": root.join("tokenizer.json"), "inputs": inputs});
    let probe = HealthProbe::start(&server.base);
    let mut messages = Vec::new();
    for pattern in ["/usr/**/zzzz", "/etc/pass*", "/etc/no-such-file-*", "/proc/*/environ", "/[e]tc/passwd"] {
        let asked = Instant::now();
        let (status, error) = server.call(Method::POST, "/v1/datasets", Some(dataset(json!([pattern])))).await;
        assert_eq!(
            (status, error_of(&error)),
            (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_field", Some("inputs[0]")))
        );
        assert!(asked.elapsed() < Duration::from_secs(5), "{pattern} took {:?}", asked.elapsed());
        messages.push(error["error"]["message"].as_str().unwrap().replace(pattern, "P"));
    }
    assert!(messages.iter().all(|m| *m == messages[0]), "one message for every outside pattern: {messages:?}");
    assert!(!messages[0].contains("passwd") && !messages[0].contains("environ"), "{}", messages[0]);
    let slowest = probe.slowest().await;
    assert!(slowest < Duration::from_secs(1), "/healthz waited {slowest:?}");

    // 300 copies of a pattern over 100 files: 100 paths stored, and the list stays small.
    std::fs::create_dir_all(root.join("many")).unwrap();
    for i in 0..100 {
        std::fs::write(root.join(format!("many/{i:03}.txt")), "text").unwrap();
    }
    let pattern = format!("{}/many/*", root.display());
    let (status, made) = server.call(Method::POST, "/v1/datasets", Some(dataset(json!(vec![pattern; 300])))).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let (_, job) = server.call(Method::GET, &format!("/v1/jobs/{}", made["id"].as_str().unwrap()), None).await;
    assert_eq!(job["spec"]["inputs"].as_array().unwrap().len(), 100, "repeats are stored once");
    let (_, list) = server.call(Method::GET, "/v1/jobs", None).await;
    assert!(list["jobs"][0].get("spec").is_none() && list["jobs"][0]["name"] == "d", "{}", list["jobs"][0]);
    let text = server.request(Method::GET, "/v1/jobs").send().await.unwrap().text().await.unwrap();
    assert!(text.len() < 4096, "the list carries no specs: {} bytes", text.len());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_grids_and_unbounded_preparation_configs_are_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    std::fs::write(root.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(root.join("domain/text.txt"), "text").unwrap();
    let server = Server::start_big(&tmp.path().join("data"), &root).await;
    let probe = HealthProbe::start(&server.base);
    let grid: serde_json::Map<String, Value> = (0..25_000).map(|i| (format!("p{i}"), json!([0]))).collect();
    let sweep = json!({"name": "wide", "base": spec(&root, "x"), "grid": grid});
    let (first, second) = tokio::join!(
        server.call(Method::POST, "/v1/sweeps", Some(sweep.clone())),
        server.call(Method::POST, "/v1/sweeps", Some(sweep))
    );
    for (status, error) in [first, second] {
        assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some("grid")), "{error}");
    }
    let aliases = json!({"name": "alias", "base": spec(&root, "x"), "grid": {"train_data.01.weight": [0.5]}});
    let (status, error) = server.call(Method::POST, "/v1/sweeps", Some(aliases)).await;
    assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some("grid.train_data.01.weight")));

    let text = root.join("domain/text.txt");
    for (config, field) in [
        (json!({"batch_documents": 1_000_000_000_000_000u64}), "config.batch_documents"),
        (json!({"batch_documents": u64::MAX}), "config.batch_documents"),
        (json!({"seq_len": 1u64 << 40, "tail": "pad"}), "config.seq_len"),
        (json!({"dedup": {"num_perm": 100_000_000_000_000u64}}), "config.dedup.num_perm"),
    ] {
        let body = json!({"name": "d", "tokenizer": root.join("tokenizer.json"), "inputs": [text], "config": config});
        let (status, error) = server.call(Method::POST, "/v1/datasets", Some(body)).await;
        assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some(field)), "{config}: {error}");
    }
    let mut job = spec(&root, "x");
    job["name"] = json!("bell\u{7} and nul\u{0}");
    let (status, error) = server.call(Method::POST, "/v1/jobs", Some(job)).await;
    assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some("name")), "{error}");
    let slowest = probe.slowest().await;
    assert!(slowest < Duration::from_secs(1), "/healthz waited {slowest:?}");
    assert_eq!(server.call(Method::GET, "/v1/jobs", None).await.1["jobs"].as_array().unwrap().len(), 0);
    server.stop().await;
}

/// Sends `request` (raw HTTP/1.1) and returns the answer's head.
async fn raw(base: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk)).await.expect("no answer");
        match read.unwrap() {
            0 => break,
            n => answer.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_cannot_write_from_other_sites_nor_reach_a_rebound_host_and_stalled_bodies_end() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let mut config = Server::config(&tmp.path().join("data"), &root, None, None, 30);
    config.body_timeout_seconds = 1;
    let server = Server::start_config(config).await;
    let body = spec(&root, "csrf").to_string();
    let post = |headers: &[(&'static str, &'static str)]| {
        let mut request = server.client.post(format!("{}/v1/jobs", server.base)).body(body.clone());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    // A no-cors fetch of a Blob: a body with no Content-Type.
    let untyped = post(&[]).await.unwrap();
    assert_eq!(untyped.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let json_type = ("content-type", "application/json");
    for (headers, field) in [
        (vec![json_type, ("sec-fetch-site", "cross-site")], "Sec-Fetch-Site"),
        (vec![json_type, ("origin", "http://evil.example")], "Origin"),
        (vec![json_type, ("host", "evil.example")], "Host"),
    ] {
        let response = post(&headers).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{headers:?}");
        assert_eq!(error_of(&response.json().await.unwrap()), ("cross_site", Some(field)));
    }
    let rebound = server.client.get(format!("{}/v1/jobs", server.base)).header("host", "evil.example:80").send().await;
    assert_eq!(rebound.unwrap().status(), StatusCode::FORBIDDEN, "a rebound name reads nothing either");
    assert_eq!(server.call(Method::GET, "/v1/jobs", None).await.1["jobs"].as_array().unwrap().len(), 0);

    // Half a body, then silence: the server gives up after the body timeout instead of waiting.
    let asked = Instant::now();
    let half = "POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"na";
    let answer = raw(&server.base, half).await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert!(asked.elapsed() < Duration::from_secs(15), "{:?}", asked.elapsed());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_run_charts_at_most_two_thousand_points_and_its_export_keeps_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start_big(&tmp.path().join("data"), &root).await;
    let mut job = spec(&root, "long");
    job["max_steps"] = json!(5_000);
    let (id, worker) = leased_job(&server, job).await;
    for batch in 0..5u64 {
        let events: Vec<Value> =
            (0..1000).map(|i| step_event_with(batch * 1000 + i, batch * 1000 + i + 1, 3.0)).collect();
        let body = json!({"job_id": id, "attempt": 1, "events": events});
        let (status, reply) = server.call(Method::POST, &format!("/v1/workers/{worker}/events"), Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }
    let svg = server.request(Method::GET, &format!("/v1/jobs/{id}/plot.svg?chart=loss")).send().await.unwrap();
    let svg = svg.text().await.unwrap();
    let lines: Vec<usize> = svg
        .split("points=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().split_whitespace().count())
        .filter(|&points| points > 2)
        .collect();
    assert_eq!(lines.len(), 2, "raw and smoothed");
    assert!(lines.iter().all(|&n| (1000..=2000).contains(&n)), "{lines:?}");
    let (_, metrics) = server.call(Method::GET, &format!("/v1/jobs/{id}/metrics"), None).await;
    assert_eq!(metrics["steps"]["step"].as_array().unwrap().len(), 5_000, "the metrics export keeps every step");
    assert_eq!(metrics["steps"]["step"][4_999], 5_000);
    server.stop().await;
}
