//! The jobs API over real HTTP against a real server on port 0 with a temporary SQLite file.

mod common;

use std::path::Path;

use common::{data_root, error_of, spec, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

use reqwest::Method;

#[tokio::test]
async fn submitting_is_validated_idempotent_and_dry_runs_return_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;

    let (status, body) = server.call(Method::POST, "/v1/jobs?dry_run=true", Some(spec(&root, "dry"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["plan"]["total_steps"].as_u64(), body["plan"]["warmup_steps"].as_u64()), (Some(20), Some(2)));
    let (_, list) = server.call(Method::GET, "/v1/jobs", None).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "a dry run queues nothing");

    let send = |key: &'static str| {
        server.request(Method::POST, "/v1/jobs").header("Idempotency-Key", key).json(&spec(&root, "a")).send()
    };
    let first = send("k1").await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let again = send("k1").await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    assert_eq!(first["state"], "queued");
    assert_eq!(first["progress"]["total_steps"], 20);

    let cases = [
        (json!({"seq_len": 0}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("seq_len")),
        (
            json!({"train_data": [{"dataset": "d", "weight": "heavy"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("train_data[0].weight"),
        ),
        (json!({"base_model": "/etc"}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some("base_model")),
        (
            json!({"base_model": "/nonexistent/model"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("base_model"),
        ),
        (
            json!({"eval_data": {"general": "/tmp"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("eval_data.general"),
        ),
    ];
    for (change, status, code, field) in cases {
        let mut body = spec(&root, "bad");
        for (k, v) in change.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (got, error) = server.call(Method::POST, "/v1/jobs", Some(body)).await;
        assert_eq!((got, error_of(&error)), (status, (code, field)), "{change}: {error}");
    }
    let json_post = || server.request(Method::POST, "/v1/jobs").header("content-type", "application/json");
    let raw = json_post().body("{not json").send().await.unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&raw.json().await.unwrap()).0, "bad_request");
    let huge = json_post().body(vec![b' '; 100 * 1024]).send().await.unwrap();
    assert_eq!(huge.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_of(&huge.json().await.unwrap()).0, "payload_too_large");
    server.stop().await;
}

#[tokio::test]
async fn listing_pages_newest_first_and_filters_by_state() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, job) = server.call(Method::POST, "/v1/jobs", Some(spec(&root, &format!("job{i}")))).await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    server.call(Method::POST, &format!("/v1/jobs/{}/cancel", ids[1]), None).await;
    let mut seen = Vec::new();
    let mut path = "/v1/jobs?limit=2".to_string();
    loop {
        let (status, page) = server.call(Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK);
        seen.extend(page["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/jobs?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    let (_, cancelled) = server.call(Method::GET, "/v1/jobs?state=cancelled", None).await;
    assert_eq!(
        cancelled["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect::<Vec<_>>(),
        vec![ids[1].as_str()]
    );
    let (status, error) = server.call(Method::GET, "/v1/jobs?state=sleeping", None).await;
    assert_eq!((status, error_of(&error)), (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_field", Some("state"))));
    let (status, error) = server.call(Method::GET, "/v1/jobs?cursor=garbage", None).await;
    assert_eq!((status, error_of(&error)), (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_field", Some("cursor"))));
    server.stop().await;
}

#[tokio::test]
async fn cancel_and_resume_follow_the_state_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let (_, job) = server.call(Method::POST, "/v1/jobs", Some(spec(&root, "c"))).await;
    let id = job["id"].as_str().unwrap();
    let (status, error) = server.call(Method::POST, &format!("/v1/jobs/{id}/resume"), None).await;
    assert_eq!((status, error_of(&error).0), (StatusCode::CONFLICT, "invalid_state"));
    let (status, job) = server.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!((status, job["state"].as_str()), (StatusCode::OK, Some("cancelled")));
    assert!(job["finished_at"].is_i64());
    let (status, _) = server.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, job) = server.call(Method::POST, &format!("/v1/jobs/{id}/resume"), None).await;
    assert_eq!((status, job["state"].as_str()), (StatusCode::OK, Some("queued")));
    let (status, error) = server.call(Method::GET, "/v1/jobs/no-such-job", None).await;
    assert_eq!((status, error_of(&error).0), (StatusCode::NOT_FOUND, "not_found"));
    let (status, _) = server.call(Method::POST, "/v1/jobs/no-such-job/cancel", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn jobs_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let data = tmp.path().join("data");
    let server = Server::start(&data, &root, None).await;
    let (_, a) = server.call(Method::POST, "/v1/jobs", Some(spec(&root, "a"))).await;
    let (_, b) = server.call(Method::POST, "/v1/jobs", Some(spec(&root, "b"))).await;
    server.call(Method::POST, &format!("/v1/jobs/{}/cancel", b["id"].as_str().unwrap()), None).await;
    server.stop().await;
    let server = Server::start(&data, &root, None).await;
    let (_, a2) = server.call(Method::GET, &format!("/v1/jobs/{}", a["id"].as_str().unwrap()), None).await;
    let (_, b2) = server.call(Method::GET, &format!("/v1/jobs/{}", b["id"].as_str().unwrap()), None).await;
    assert_eq!((a2["state"].as_str(), b2["state"].as_str()), (Some("queued"), Some("cancelled")));
    assert_eq!(a2["spec"], a["spec"]);
    server.stop().await;
}

#[tokio::test]
async fn a_token_guards_the_api_but_not_health() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, Some("s3cret")).await;
    let anonymous = reqwest::Client::new();
    let response = anonymous.get(format!("{}/v1/jobs", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&response.json().await.unwrap()).0, "unauthorized");
    let wrong = anonymous.get(format!("{}/v1/jobs", server.base)).bearer_auth("guess").send().await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(server.call(Method::GET, "/v1/jobs", None).await.0, StatusCode::OK);
    assert_eq!(anonymous.get(format!("{}/healthz", server.base)).send().await.unwrap().status(), StatusCode::OK);
    server.stop().await;
}

#[test]
fn binding_beyond_loopback_without_a_token_is_refused() {
    let config = cpt_server::Config {
        data_dir: "x".into(),
        bind: "0.0.0.0:8080".parse().unwrap(),
        api_token: None,
        data_roots: vec![],
        allowed_hosts: vec![],
        body_timeout_seconds: 30,
        max_attempts: 3,
        max_body_bytes: 1024,
        worker_token: None,
        lease_ttl_seconds: 30,
        metrics_retention_seconds: 600,
        local_workers: 0,
        worker_binary: None,
        max_job_memory_bytes: None,
    };
    assert!(config.finish().unwrap_err().to_string().contains("--api-token"));
}

#[tokio::test]
async fn every_operation_in_openapi_yaml_is_served_and_the_document_is_served_as_is() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let (status, text) = server.call(Method::GET, "/openapi.yaml", None).await;
    assert_eq!(status, StatusCode::OK);
    let served = text.as_str().unwrap().to_string();
    let document: serde_yaml_ng::Value = serde_yaml_ng::from_str(&served).unwrap();
    let repo = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi.yaml")).unwrap();
    assert_eq!(served, repo);
    let paths = document["paths"].as_mapping().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        let path = path.as_str().unwrap().replace("{id}", "no-such-id");
        for method in item.as_mapping().unwrap().keys() {
            let method: Method = method.as_str().unwrap().to_uppercase().parse().unwrap();
            let response = server.request(method.clone(), &path).send().await.unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(!body.contains("no such route"), "{method} {path} is documented but not routed");
            operations += 1;
        }
    }
    assert_eq!(operations, 37);
    let (status, error) = server.call(Method::GET, "/v1/nothing-here", None).await;
    assert_eq!((status, error_of(&error).0), (StatusCode::NOT_FOUND, "not_found"));
    server.stop().await;
}
