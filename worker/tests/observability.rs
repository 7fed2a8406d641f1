//! Observability end to end: a real Prometheus (Debian's `prometheus` package) scrapes a real
//! cpt-server while a real worker trains. PromQL through Prometheus' HTTP API returns the job's loss
//! series, and every query of the Grafana dashboard runs on that Prometheus and uses only metrics
//! the server exports.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A Prometheus server scraping one target every second, with its data in a temporary directory.
struct Prometheus {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr, dir: &Path) -> Prometheus {
        let config = format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: cpt-server\n    static_configs: [{{targets: ['{target}']}}]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the `prometheus` binary (Debian's prometheus package; scripts/test.sh installs it)");
        let prometheus = Prometheus { child, base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = prometheus.http.get(format!("{}/-/ready", prometheus.base)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return prometheus;
            }
            assert!(Instant::now() < deadline, "Prometheus ready in 60 s: {}", log_of(dir));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET /api/v1/{endpoint}` with `params`; asserts the query succeeded and returns `data`.
    async fn api(&self, endpoint: &str, params: &[(&str, &str)]) -> Value {
        let url = format!("{}/api/v1/{endpoint}", self.base);
        let answer: Value = self.http.get(url).query(params).send().await.unwrap().json().await.unwrap();
        assert_eq!(answer["status"], "success", "{endpoint} {params:?}: {answer}");
        answer["data"].clone()
    }

    async fn query(&self, promql: &str) -> Vec<Value> {
        self.api("query", &[("query", promql)]).await["result"].as_array().unwrap().clone()
    }

    /// Polls an instant query until `accept` takes its result.
    async fn until(&self, promql: &str, mut accept: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let result = self.query(promql).await;
            if accept(&result) {
                return result;
            }
            assert!(Instant::now() < deadline, "{promql}: still {result:?} after 120 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
}

/// A sample's value as Prometheus returns it: `[time, "value"]`.
fn value(sample: &Value) -> f64 {
    sample[1].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_a_running_job_and_the_dashboard_queries_only_exported_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let harness = Harness::start(root).await;
    std::fs::create_dir(root.join("prometheus")).unwrap();
    let prometheus = Prometheus::start(harness.address, &root.join("prometheus")).await;

    // A job far too long to finish: Prometheus sees it running, then it is cancelled.
    let mut spec = spec(root, 1_000_000);
    let heldout = root.join("heldout").display().to_string();
    spec["eval_data"] = json!({"domain": heldout, "general": heldout});
    spec["eval_every"] = json!(50);
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let job = harness.post("/v1/jobs", spec).await;
    let id = job["id"].as_str().unwrap().to_string();
    let loss = format!("cpt_train_loss{{job_id=\"{id}\"}}");
    let samples = format!("count_over_time({loss}[10m])");
    prometheus.until(&samples, |r| r.first().is_some_and(|s| value(&s["value"]) >= 3.0)).await;
    assert_eq!(harness.get(&format!("/v1/jobs/{id}")).await["state"], "running", "scraped while it runs");
    harness.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    harness.follow(&id, |_| false).await;
    let job = harness.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["state"], "cancelled", "{job}");

    // The loss series: every scraped value is the loss of one of the job's steps, and the newest
    // is its last step's.
    let series = harness.get(&format!("/v1/jobs/{id}/metrics")).await;
    let losses: Vec<f64> = series["steps"]["loss"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let last = *losses.last().unwrap();
    prometheus.until(&loss, |r| r.first().is_some_and(|s| value(&s["value"]) == last)).await;
    let now = format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64());
    let range = prometheus
        .api("query_range", &[("query", &loss), ("start", &started.to_string()), ("end", &now), ("step", "1")])
        .await;
    let points = range["result"][0]["values"].as_array().unwrap();
    assert!(points.len() >= 3, "a series over time: {range}");
    for point in points {
        assert!(losses.contains(&value(point)), "{} is one of the job's step losses", value(point));
    }
    let checkpoint = format!("cpt_last_checkpoint_step{{job_id=\"{id}\"}}");
    let cancelled_at = job["progress"]["step"].as_f64().unwrap();
    prometheus.until(&checkpoint, |r| r.first().is_some_and(|s| value(&s["value"]) == cancelled_at)).await;

    // The dashboard: every metric it names was scraped, and every query runs and finds data.
    let exported: BTreeSet<String> = prometheus
        .api("label/__name__/values", &[])
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards/cpt.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15, "{queries:?}");
    for query in &queries {
        for name in metric_names(query) {
            assert!(exported.contains(&name), "the dashboard queries {name}, which the server does not export");
        }
        let promql = query
            .replace("$job", &id)
            .replace("$smoothing", "5m")
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m");
        let result = prometheus.query(&promql).await;
        // The annotation fires only around a checkpoint; every panel has data for this job.
        if !query.starts_with("changes(") {
            assert!(!result.is_empty(), "no data for the dashboard query {promql}");
        }
    }
    let perplexity = prometheus.query(&format!("cpt_eval_perplexity{{job_id=\"{id}\"}}")).await;
    let sets: BTreeSet<&str> = perplexity.iter().map(|s| s["metric"]["set"].as_str().unwrap()).collect();
    assert_eq!(sets, BTreeSet::from(["domain", "general"]), "learning and forgetting on one panel");
    harness.stop().await;
}

/// Every PromQL expression in a dashboard: panel targets, annotations and query variables (with
/// Grafana's `query_result(…)` wrapper removed).
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    for annotation in dashboard["annotations"]["list"].as_array().unwrap() {
        queries.extend(annotation["expr"].as_str().map(String::from));
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            let query = variable["query"]["query"].as_str().unwrap();
            let inner = query.strip_prefix("query_result(").and_then(|q| q.strip_suffix(')')).unwrap_or(query);
            queries.push(inner.to_string());
        }
    }
    queries
}

/// The `cpt_…` metric names in a PromQL expression.
fn metric_names(promql: &str) -> Vec<String> {
    promql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("cpt_"))
        .map(String::from)
        .collect()
}
