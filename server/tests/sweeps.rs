//! Sweeps over real HTTP: a grid makes one queued job per point, all or none; the sweep's table
//! and plot read the jobs' eval events; cancel and resume reach every job. The test plays the
//! worker's part.

mod common;

use common::{data_root, error_of, eval_event, spec, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn sweep_request(root: &std::path::Path) -> Value {
    json!({"name": "lr × replay", "base": spec(root, "base"),
           "grid": {"lr": [1e-4, 1e-3], "train_data.1.weight": [0.1, 0.5]}})
}

async fn jobs_count(server: &Server) -> usize {
    server.call(Method::GET, "/v1/jobs", None).await.1["jobs"].as_array().unwrap().len()
}

/// Leases the next job as worker `worker`, sends `evals` (step, domain ppl, general ppl) and, if
/// `outcome` is given, finishes it so.
async fn run_job(server: &Server, worker: &str, evals: &[(u64, f64, f64)], outcome: Option<&str>) -> String {
    let (status, job) = server.call(Method::POST, &format!("/v1/workers/{worker}/lease?wait_seconds=0"), None).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let (id, attempt) = (job["id"].as_str().unwrap().to_string(), job["attempt"].as_u64().unwrap());
    let mut events = Vec::new();
    for &(step, domain, general) in evals {
        let seq = events.len() as u64;
        events.push(eval_event(seq, step, "domain", domain.ln(), domain));
        events.push(eval_event(seq + 1, step, "general", general.ln(), general));
    }
    let batch = json!({"job_id": id, "attempt": attempt, "events": events});
    let (status, _) = server.call(Method::POST, &format!("/v1/workers/{worker}/events"), Some(batch)).await;
    assert_eq!(status, StatusCode::OK);
    if let Some(outcome) = outcome {
        let finish = json!({"job_id": id, "attempt": attempt, "outcome": outcome});
        let (status, _) = server.call(Method::POST, &format!("/v1/workers/{worker}/finish"), Some(finish)).await;
        assert_eq!(status, StatusCode::OK);
    }
    id
}

#[tokio::test]
async fn a_sweep_queues_a_job_per_point_compares_them_and_cancels_and_resumes_them_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let (status, sweep) = server.call(Method::POST, "/v1/sweeps", Some(sweep_request(&root))).await;
    assert_eq!(status, StatusCode::CREATED, "{sweep}");
    let id = sweep["id"].as_str().unwrap().to_string();
    assert_eq!((sweep["state"].as_str(), sweep["counts"]["queued"].as_u64()), (Some("queued"), Some(4)));
    let jobs = sweep["jobs"].as_array().unwrap();
    let points: Vec<Value> = jobs.iter().map(|j| j["point"].clone()).collect();
    assert_eq!(points[1], json!({"lr": 1e-4, "train_data.1.weight": 0.5}));
    assert_eq!(points[2], json!({"lr": 1e-3, "train_data.1.weight": 0.1}));
    let (_, second) =
        server.call(Method::GET, &format!("/v1/jobs/{}", jobs[1]["job_id"].as_str().unwrap()), None).await;
    assert_eq!((second["sweep_id"].as_str(), &second["sweep_point"]), (Some(id.as_str()), &points[1]));
    assert_eq!(
        (second["spec"]["lr"].as_f64(), second["spec"]["train_data"][1]["weight"].as_f64()),
        (Some(1e-4), Some(0.5))
    );
    assert_eq!(second["name"], "lr × replay [lr=0.0001, train_data.1.weight=0.5]");

    // The same Idempotency-Key and request: the same sweep; another request: refused.
    let again = server.request(Method::POST, "/v1/sweeps").header("Idempotency-Key", "k").json(&sweep_request(&root));
    let first: Value = again.send().await.unwrap().json().await.unwrap();
    let again = server.request(Method::POST, "/v1/sweeps").header("Idempotency-Key", "k").json(&sweep_request(&root));
    let response = again.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap()["id"], first["id"]);
    let mut other = sweep_request(&root);
    other["grid"]["lr"] = json!([3e-4]);
    let reused = server.request(Method::POST, "/v1/sweeps").header("Idempotency-Key", "k").json(&other);
    assert_eq!(reused.send().await.unwrap().status(), StatusCode::CONFLICT);
    server.call(Method::POST, &format!("/v1/sweeps/{}/cancel", first["id"].as_str().unwrap()), None).await;

    // Two jobs report evals: the first learns and ends; the second forgets, and is resumed once
    // (its second attempt re-evaluates step 10, which replaces the first attempt's value).
    let (_, worker) = server.call(Method::POST, "/v1/workers", Some(json!({"name": "w", "device": "cpu"}))).await;
    let worker = worker["worker_id"].as_str().unwrap().to_string();
    let a = run_job(&server, &worker, &[(0, 50.0, 40.0), (10, 30.0, 41.0), (20, 32.0, 42.0)], Some("succeeded")).await;
    let b = run_job(&server, &worker, &[(0, 50.0, 40.0), (10, 99.0, 99.0)], Some("failed")).await;
    server.call(Method::POST, &format!("/v1/jobs/{b}/resume"), None).await;
    run_job(&server, &worker, &[(10, 25.0, 60.0)], None).await;
    let (_, sweep) = server.call(Method::GET, &format!("/v1/sweeps/{id}"), None).await;
    assert_eq!(sweep["state"], "running");
    let lines = sweep["jobs"].as_array().unwrap();
    assert_eq!((lines[0]["job_id"].as_str(), lines[1]["job_id"].as_str()), (Some(a.as_str()), Some(b.as_str())));
    let domain = &lines[0]["eval"]["domain"];
    assert_eq!(
        (domain["initial"].as_f64(), domain["final"].as_f64(), domain["final_step"].as_u64()),
        (Some(50.0), Some(32.0), Some(20))
    );
    assert_eq!((domain["best"].as_f64(), domain["best_step"].as_u64()), (Some(30.0), Some(10)));
    assert!((domain["change"].as_f64().unwrap() - (32.0 / 50.0 - 1.0)).abs() < 1e-12);
    let general = &lines[1]["eval"]["general"];
    assert_eq!((general["final"].as_f64(), general["final_step"].as_u64()), (Some(60.0), Some(10)));
    assert!((general["change"].as_f64().unwrap() - 0.5).abs() < 1e-12);
    assert_eq!(lines[2]["eval"], json!({}));

    let plot = server.request(Method::GET, &format!("/v1/sweeps/{id}/plot.svg")).send().await.unwrap();
    assert_eq!(plot.headers()["content-type"], "image/svg+xml");
    let svg = plot.text().await.unwrap();
    assert!(svg.contains("lr=0.0001, train_data.1.weight=0.1]") && svg.contains("domain perplexity"), "{svg}");
    let (status, error) =
        server.call(Method::GET, &format!("/v1/sweeps/{id}/plot.svg?x=nothing&y=general"), None).await;
    assert_eq!(status, StatusCode::OK, "an unknown set draws no curves: {error}");

    // Cancel: the running job is asked to stop, the queued ones stop now, the ended one stays.
    let (status, sweep) = server.call(Method::POST, &format!("/v1/sweeps/{id}/cancel"), None).await;
    assert_eq!(status, StatusCode::OK);
    let states: Vec<&str> = sweep["jobs"].as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["succeeded", "cancelling", "cancelled", "cancelled"]);
    let finish = json!({"job_id": b, "attempt": 2, "outcome": "cancelled"});
    server.call(Method::POST, &format!("/v1/workers/{worker}/finish"), Some(finish)).await;
    let (_, sweep) = server.call(Method::POST, &format!("/v1/sweeps/{id}/resume"), None).await;
    let states: Vec<&str> = sweep["jobs"].as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap()).collect();
    assert_eq!((states, sweep["state"].as_str()), (vec!["succeeded", "queued", "queued", "queued"], Some("queued")));

    let (_, list) = server.call(Method::GET, "/v1/sweeps?limit=1", None).await;
    assert_eq!(list["sweeps"].as_array().unwrap().len(), 1);
    let (_, rest) =
        server.call(Method::GET, &format!("/v1/sweeps?cursor={}", list["next_cursor"].as_str().unwrap()), None).await;
    assert_eq!(rest["sweeps"][0]["id"].as_str(), Some(id.as_str()));
    let (status, error) = server.call(Method::GET, "/v1/sweeps/no-such-sweep", None).await;
    assert_eq!((status, error_of(&error).0), (StatusCode::NOT_FOUND, "not_found"));
    server.stop().await;
}

#[tokio::test]
async fn a_bad_sweep_is_refused_naming_the_field_and_queues_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, None).await;
    let refused = |change: fn(&mut Value)| {
        let mut request = sweep_request(&root);
        change(&mut request);
        let server = &server;
        async move {
            let (status, error) = server.call(Method::POST, "/v1/sweeps", Some(request)).await;
            assert!(status.is_client_error(), "{error}");
            (
                error_of(&error).1.unwrap_or_default().to_string(),
                error["error"]["message"].as_str().unwrap().to_string(),
            )
        }
    };
    assert_eq!(refused(|r| r["grid"]["lr"] = json!([1e-4, -1.0])).await.0, "grid.lr");
    assert!(refused(|r| r["grid"]["lr"] = json!([1e-4, -1.0])).await.1.contains("with lr = -1"));
    assert_eq!(refused(|r| r["grid"] = json!({"train_data.0.dataset": ["/etc"]})).await.0, "grid.train_data.0.dataset");
    assert_eq!(refused(|r| r["base"]["seq_len"] = json!(32)).await.0, "base.train_data[0].dataset");
    assert_eq!(refused(|r| r["grid"] = json!({"seed": (0..65).collect::<Vec<_>>()})).await.0, "grid");
    assert_eq!(refused(|r| r["grid"] = json!({"name": ["a"]})).await.0, "grid.name");
    assert_eq!(refused(|r| r["extra"] = json!(1)).await.1.contains("extra"), true);
    assert_eq!(jobs_count(&server).await, 0, "a refused sweep queues nothing");

    let (status, plan) = server.call(Method::POST, "/v1/sweeps?dry_run=true", Some(sweep_request(&root))).await;
    assert_eq!(status, StatusCode::OK);
    let plans = plan["jobs"].as_array().unwrap();
    assert_eq!(plans.len(), 4);
    assert!(plans.iter().all(|p| p["plan"]["total_steps"] == 20), "{plan}");
    assert_eq!(plans[3]["plan"]["lr"]["peak"], 1e-3);
    assert_eq!(jobs_count(&server).await, 0, "a dry run queues nothing");
    let (_, sweeps) = server.call(Method::GET, "/v1/sweeps", None).await;
    assert_eq!(sweeps["sweeps"], json!([]));
    server.stop().await;
}
