//! A hostile client against a real server: every request below got in before, and each must now be
//! refused with a clear 4xx, a stable code and the offending field, losing nothing.

mod common;

use common::{data_root, error_of, spec, step_event, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Submits `spec` with `change` applied and returns the status and error body.
async fn submit_changed(server: &Server, root: &std::path::Path, change: Value) -> (StatusCode, Value) {
    let mut body = spec(root, "hostile");
    for (k, v) in change.as_object().unwrap() {
        body[k] = v.clone();
    }
    server.call(Method::POST, "/v1/jobs", Some(body)).await
}

#[tokio::test]
async fn numeric_fields_are_bounded_and_a_job_no_worker_can_hold_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let mut config = Server::config(&tmp.path().join("data"), &root, None, None, 30);
    config.max_job_memory_bytes = Some(1 << 30);
    let server = Server::start_config(config).await;
    for (change, field) in [
        (json!({"micro_batch_size": 1_000_000_000_000u64}), "micro_batch_size"),
        (json!({"seq_len": 1u64 << 40, "micro_batch_size": 1u64 << 30}), "seq_len"),
        (json!({"max_steps": u64::MAX}), "max_steps"),
        (json!({"name": "n".repeat(900)}), "name"),
        (json!({"sample_prompts": vec!["p"; 100]}), "sample_prompts"),
        // Fits every bound but needs ~4 GB of activations.
        (json!({"micro_batch_size": 4096}), "micro_batch_size"),
    ] {
        let (status, error) = submit_changed(&server, &root, change.clone()).await;
        assert_eq!(
            (status, error_of(&error)),
            (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_field", Some(field))),
            "{change}: {error}"
        );
    }
    let (_, list) = server.call(Method::GET, "/v1/jobs", None).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0);
    server.stop().await;
}

#[tokio::test]
async fn the_largest_registered_worker_bounds_the_memory_a_job_may_need() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let big = json!({"micro_batch_size": 4096});
    let (status, _) = submit_changed(&server, &root, json!({"micro_batch_size": 4096, "name": "dry"})).await;
    assert_eq!(status, StatusCode::CREATED, "no worker said what it holds: nothing to check against");
    let small = json!({"name": "small", "device": "cpu", "memory_bytes": 256u64 << 20});
    server.call(Method::POST, "/v1/workers", Some(small)).await;
    let (status, error) = submit_changed(&server, &root, big).await;
    assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some("micro_batch_size")), "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("memory"), "{error}");
    server.stop().await;
}

#[tokio::test]
async fn a_cpu_worker_is_asked_for_what_the_explicit_step_needs_and_a_gpu_worker_for_autograd() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let mut body = spec(&root, "large");
    body["micro_batch_size"] = json!(8192);
    let config = std::fs::read_to_string(root.join("model/config.json")).unwrap();
    let config = cpt_protocol::model_config::ModelConfig::from_json_str(&config).unwrap();
    let estimate = |change: Value| {
        let mut body = body.clone();
        body.as_object_mut().unwrap().extend(change.as_object().unwrap().clone());
        let spec = cpt_protocol::spec::JobSpec::from_json_str(&body.to_string()).unwrap();
        cpt_protocol::plan::memory_estimate_bytes(&config, &spec)
    };
    // Recomputing segments as long as the model keeps what the explicit step keeps without
    // recomputation (and one input more); autograd's graph holds far more.
    let (explicit, autograd) = (estimate(json!({"recompute_every": 2})), estimate(json!({})));
    assert!(explicit < autograd * 3 / 4, "explicit {explicit}, autograd {autograd}");
    let memory = (explicit + autograd) / 2;
    for (device, expected) in [("cpu", StatusCode::CREATED), ("cuda:0", StatusCode::UNPROCESSABLE_ENTITY)] {
        let server = Server::start(&tmp.path().join(device.replace(':', "")), &root, None).await;
        let worker = json!({"name": device, "device": device, "memory_bytes": memory});
        assert_eq!(server.call(Method::POST, "/v1/workers", Some(worker)).await.0, StatusCode::CREATED);
        let (status, answer) = server.call(Method::POST, "/v1/jobs", Some(body.clone())).await;
        assert_eq!(status, expected, "{device} with {memory} bytes: {answer}");
        server.stop().await;
    }
}

#[tokio::test]
async fn paths_are_checked_without_revealing_what_exists_outside_the_roots_and_stored_resolved() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    std::fs::write(tmp.path().join("secret.txt"), "the secret").unwrap();
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let outside = |path: &str| json!({"base_model": path});
    let (_, exists) =
        submit_changed(&server, &root, outside(&tmp.path().join("secret.txt").display().to_string())).await;
    let (_, missing) =
        submit_changed(&server, &root, outside(&tmp.path().join("nothing.txt").display().to_string())).await;
    let message = |e: &Value, p: &str| e["error"]["message"].as_str().unwrap().replace(p, "PATH");
    assert_eq!(
        message(&exists, &tmp.path().join("secret.txt").display().to_string()),
        message(&missing, &tmp.path().join("nothing.txt").display().to_string()),
        "the same answer for a file that exists and one that does not"
    );
    let climbing = format!("{}/model/../../secret.txt", root.display());
    let (status, error) = submit_changed(&server, &root, outside(&climbing)).await;
    assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some("base_model")));
    // An adapter to start from is a path like any other.
    let secret = tmp.path().join("secret.txt").display().to_string();
    let adapter =
        json!({"adapter": {"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj"]}, "init_from": secret}});
    let (status, error) = submit_changed(&server, &root, adapter).await;
    assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some("adapter.init_from")), "{error}");

    // A glob that climbs out of the roots builds no dataset.
    let tokenizer = root.join("tokenizer.json");
    std::fs::write(&tokenizer, "{}").unwrap();
    let pattern = format!("{}/[m]odel/../../secret.txt", root.display());
    let dataset = json!({"name": "d", "tokenizer": tokenizer, "inputs": [pattern]});
    let (status, error) = server.call(Method::POST, "/v1/datasets", Some(dataset)).await;
    assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some("inputs[0]")), "{error}");
    // Nor a vocabulary, whichever of its paths climbs out.
    std::fs::write(root.join("model/tokenizer.json"), "{}").unwrap();
    let vocabulary = |field: &str, path: &str| {
        let mut body = json!({"name": "v", "base_model": root.join("model"), "corpus": [tokenizer], "new_tokens": 8});
        body[field] = if field == "base_model" { json!(path) } else { json!([path]) };
        body
    };
    for (field, blamed) in [("base_model", "base_model"), ("corpus", "corpus[0]"), ("report_texts", "report_texts[0]")]
    {
        let (status, error) = server.call(Method::POST, "/v1/vocabularies", Some(vocabulary(field, &pattern))).await;
        assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some(blamed)), "{error}");
    }

    // Relative paths are resolved by the server, not by each worker.
    let (status, job) = server.call(Method::POST, "/v1/jobs", Some(spec(&root, "ok"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let stored = job["spec"]["base_model"].as_str().unwrap();
    assert_eq!(stored, root.join("model").canonicalize().unwrap().display().to_string());
    server.stop().await;
}

#[tokio::test]
async fn one_token_alone_is_refused_and_tokens_are_compared_by_value_with_any_scheme_case() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let half = Server::config(&tmp.path().join("data"), &root, Some("api"), None, 30);
    assert!(half.finish().unwrap_err().to_string().contains("--worker-token"));
    let server = Server::start_with(&tmp.path().join("data"), &root, Some("api"), Some("wrk"), 30).await;
    let anonymous = reqwest::Client::new();
    let register = |auth: Option<&'static str>| {
        let mut request = anonymous.post(format!("{}/v1/workers", server.base)).json(&json!({"name": "w"}));
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        request.send()
    };
    assert_eq!(register(None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(register(Some("Bearer api")).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(register(Some("bearer wrk")).await.unwrap().status(), StatusCode::CREATED);
    let metrics = anonymous.get(format!("{}/metrics", server.base)).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::UNAUTHORIZED, "the scrape needs the API token once tokens are set");
    server.stop().await;
}

#[tokio::test]
async fn cross_site_text_bodies_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    for path in ["/v1/jobs", "/v1/datasets", "/v1/vocabularies"] {
        let response = server
            .request(Method::POST, path)
            .header("Content-Type", "text/plain")
            .body(spec(&root, "csrf").to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{path}");
        assert_eq!(error_of(&response.json().await.unwrap()).0, "unsupported_media_type");
    }
    let (_, list) = server.call(Method::GET, "/v1/jobs", None).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0);
    server.stop().await;
}

#[tokio::test]
async fn random_http_methods_do_not_grow_the_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let before = server.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap().len();
    for i in 0..300 {
        let method = Method::from_bytes(format!("M{i:05}X").as_bytes()).unwrap();
        server.request(method, "/v1/jobs").send().await.unwrap();
    }
    let after = server.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(after.len() < before + 4096, "{} → {} bytes", before, after.len());
    assert!(after.contains("method=\"other\""));
    server.stop().await;
}

#[tokio::test]
async fn a_reused_idempotency_key_with_another_body_is_a_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let send = |name: &str| {
        server.request(Method::POST, "/v1/jobs").header("Idempotency-Key", "k").json(&spec(&root, name)).send()
    };
    assert_eq!(send("a").await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(send("a").await.unwrap().status(), StatusCode::OK);
    let reused = send("b").await.unwrap();
    assert_eq!(reused.status(), StatusCode::CONFLICT);
    assert_eq!(error_of(&reused.json().await.unwrap()), ("idempotency_key_reused", Some("Idempotency-Key")));
    server.stop().await;
}

#[tokio::test]
async fn events_beyond_the_plan_and_oversized_batches_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start_big(&tmp.path().join("data"), &root).await;
    let (_, worker) = server.call(Method::POST, "/v1/workers", Some(json!({"name": "w"}))).await;
    let worker = worker["worker_id"].as_str().unwrap().to_string();
    let (_, job) = server.call(Method::POST, "/v1/jobs", Some(spec(&root, "j"))).await;
    let id = job["id"].as_str().unwrap().to_string();
    server.call(Method::POST, &format!("/v1/workers/{worker}/lease"), None).await;
    let url = format!("/v1/workers/{worker}/events");
    let (status, error) = server
        .call(Method::POST, &url, Some(json!({"job_id": id, "attempt": 1, "events": [step_event(0, 999)]})))
        .await;
    assert_eq!(
        (status, error_of(&error)),
        (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_field", Some("events[0].step")))
    );
    let many: Vec<Value> = (0..1001).map(|i| step_event(i, 1)).collect();
    let (status, error) =
        server.call(Method::POST, &url, Some(json!({"job_id": id, "attempt": 1, "events": many}))).await;
    assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some("events")));
    let (_, events) = server.call(Method::GET, &format!("/v1/jobs/{id}/events"), None).await;
    assert_eq!(events["events"].as_array().unwrap().len(), 0, "nothing of a refused batch is stored");
    server.stop().await;
}

#[tokio::test]
async fn datasets_are_listed_page_by_page() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let tokenizer = root.join("tokenizer.json");
    std::fs::write(&tokenizer, "{}").unwrap();
    std::fs::write(root.join("a.txt"), "text").unwrap();
    for i in 0..5 {
        let body = json!({"name": format!("d{i}"), "tokenizer": tokenizer, "inputs": [root.join("a.txt")]});
        assert_eq!(server.call(Method::POST, "/v1/datasets", Some(body)).await.0, StatusCode::CREATED);
    }
    let (_, first) = server.call(Method::GET, "/v1/datasets?limit=3", None).await;
    assert_eq!(first["datasets"].as_array().unwrap().len(), 3);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, rest) = server.call(Method::GET, &format!("/v1/datasets?limit=3&cursor={cursor}"), None).await;
    let names: Vec<&str> = rest["datasets"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["d1", "d0"]);
    assert!(rest["next_cursor"].is_null());
    server.stop().await;
}

#[tokio::test]
async fn datasets_that_would_fail_the_job_are_refused_at_submit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    for (name, manifest) in [("short", common::manifest(32, 10, 2)), ("no-validation", common::manifest(64, 10, 0))] {
        std::fs::create_dir_all(root.join(name)).unwrap();
        std::fs::write(root.join(name).join("manifest.json"), manifest.to_string()).unwrap();
    }
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let path = |name: &str| root.join(name).display().to_string();
    let (status, error) = submit_changed(&server, &root, json!({"train_data": [{"dataset": path("short")}]})).await;
    assert_eq!(
        (status, error_of(&error).1),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("train_data[0].dataset")),
        "{error}"
    );
    assert!(error["error"]["message"].as_str().unwrap().contains("seq_len"), "{error}");
    let (status, error) =
        submit_changed(&server, &root, json!({"eval_data": {"general": path("no-validation")}})).await;
    assert_eq!((status, error_of(&error).1), (StatusCode::UNPROCESSABLE_ENTITY, Some("eval_data.general")), "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("validation_fraction"), "{error}");
    let (status, _) = server.call(Method::POST, "/v1/jobs?dry_run=true", Some(spec(&root, "fine"))).await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[test]
fn a_flag_mistake_is_one_line_naming_the_flag_even_with_backtraces_on() {
    let tmp = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cpt-server"))
        .args(["--api-token", "secret", "--bind", "127.0.0.1:0", "--local-workers", "0", "--data-dir"])
        .arg(tmp.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--worker-token") && !stderr.contains("backtrace"), "{stderr}");
}
