//! The job page's server side: the pages carry no data and need no token, the charts it shows are
//! API routes behind the token, and a job's latest eval per set is on the job.

mod common;

use common::{data_root, error_of, eval_event, spec, step_event_with, Server};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn pages_hold_no_data_and_the_charts_they_draw_need_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let root = data_root(tmp.path());
    let server = Server::start(&tmp.path().join("data"), &root, Some("secret")).await;
    for path in ["/", "/jobs/anything", "/sweeps/anything"] {
        let page = server.client.get(format!("{}{path}", server.base)).send().await.unwrap();
        assert_eq!(page.status(), StatusCode::OK, "{path} needs no token");
        let policy = page.headers()["content-security-policy"].to_str().unwrap().to_string();
        assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
        let html = page.text().await.unwrap();
        assert!(html.contains("/assets/cpt.js") && !html.contains("secret"));
    }
    let script = server.client.get(format!("{}/assets/cpt.js", server.base)).send().await.unwrap();
    assert!(script.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));

    let (_, job) = server.call(Method::POST, "/v1/jobs", Some(spec(&root, "charted"))).await;
    let id = job["id"].as_str().unwrap().to_string();
    let bare = server.client.get(format!("{}/v1/jobs/{id}/plot.svg", server.base)).send().await.unwrap();
    assert_eq!(bare.status(), StatusCode::UNAUTHORIZED);

    let (_, worker) = server.call(Method::POST, "/v1/workers", Some(json!({"name": "w", "device": "cpu"}))).await;
    let worker = worker["worker_id"].as_str().unwrap().to_string();
    server.call(Method::POST, &format!("/v1/workers/{worker}/lease?wait_seconds=0"), None).await;
    let mut events: Vec<_> = (1..=5).map(|step| step_event_with(step - 1, step, 3.0 - 0.1 * step as f64)).collect();
    events.push(eval_event(5, 5, "domain", 2.0, 7.389));
    events.push(eval_event(6, 5, "general", 3.0, 20.09));
    let batch = json!({"job_id": id, "attempt": 1, "events": events});
    let (status, _) = server.call(Method::POST, &format!("/v1/workers/{worker}/events"), Some(batch)).await;
    assert_eq!(status, StatusCode::OK);

    let (_, job) = server.call(Method::GET, &format!("/v1/jobs/{id}"), None).await;
    assert_eq!(job["latest_evals"]["general"]["perplexity"], 20.09, "{job}");
    assert_eq!(job["latest_evals"]["domain"]["step"], 5);
    let (_, stored) = server.call(Method::GET, &format!("/v1/jobs/{id}/events"), None).await;
    let newest = stored["events"].as_array().unwrap().iter().map(|e| e["id"].as_i64().unwrap()).max();
    assert_eq!(job["last_event_id"].as_i64(), newest, "where the page starts following the stream");

    let chart = |name: &str| server.request(Method::GET, &format!("/v1/jobs/{id}/plot.svg?chart={name}")).send();
    let loss = chart("loss").await.unwrap();
    assert_eq!(loss.headers()["content-type"], "image/svg+xml");
    let svg = loss.text().await.unwrap();
    let longest = svg
        .split("points=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().split_whitespace().count())
        .max()
        .unwrap();
    assert_eq!(longest, 5, "a line through the five steps (raw and smoothed)");
    assert!(svg.contains("charted — loss") && svg.contains("smoothed") && !svg.contains("style="));
    let perplexity = chart("perplexity").await.unwrap().text().await.unwrap();
    assert!(perplexity.contains(">domain<") || perplexity.contains("domain"), "{perplexity}");
    for name in ["lr", "throughput", "bits_per_byte"] {
        assert_eq!(chart(name).await.unwrap().status(), StatusCode::OK, "{name}");
    }
    let (status, error) = server.call(Method::GET, &format!("/v1/jobs/{id}/plot.svg?chart=pie"), None).await;
    assert_eq!((status, error_of(&error)), (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_field", Some("chart"))));
    server.stop().await;
}
