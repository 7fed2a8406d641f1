//! Prometheus metrics: training series fed by ingested events (per job, dropped a while after the
//! job ends), job and worker counts read at scrape time, and HTTP request counts and latencies by
//! matched route. Names follow Prometheus conventions: base units, `_total` counters.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use serde_json::Value;
use sqlx::{Row, SqlitePool};

use crate::app::AppState;
use crate::events::StoredEvent;
use crate::jobs::state::JobState;

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    train_loss: GaugeVec,
    learning_rate: GaugeVec,
    grad_norm: GaugeVec,
    tokens: IntCounterVec,
    model_flops: CounterVec,
    tokens_per_second: GaugeVec,
    mfu: GaugeVec,
    step_duration: HistogramVec,
    last_step: GaugeVec,
    step: GaugeVec,
    target_tokens: GaugeVec,
    data_seconds: CounterVec,
    compute_seconds: CounterVec,
    checkpoints: CounterVec,
    last_checkpoint_step: GaugeVec,
    eval_loss: GaugeVec,
    eval_perplexity: GaugeVec,
    job_info: GaugeVec,
    jobs: GaugeVec,
    workers: GaugeVec,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    /// What has been exported per job: to turn totals into counter increments and to remove the
    /// job's series later.
    seen: Mutex<HashMap<String, JobSeries>>,
}

#[derive(Default)]
struct JobSeries {
    name: String,
    tokens: u64,
    flops: f64,
    eval_sets: std::collections::BTreeSet<String>,
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry.register(Box::new(metric.clone())).expect("a unique metric");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> CounterVec {
    let metric = CounterVec::new(Opts::new(name, help), &["job_id"]).expect("a valid metric");
    registry.register(Box::new(metric.clone())).expect("a unique metric");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let job = &["job_id"];
        let tokens =
            IntCounterVec::new(Opts::new("cpt_tokens_total", "Training tokens consumed."), job).expect("valid");
        let step_buckets = prometheus::exponential_buckets(0.01, 2.0, 16).expect("valid buckets");
        let step_duration = HistogramVec::new(
            HistogramOpts::new("cpt_step_duration_seconds", "Wall time of an optimizer step.").buckets(step_buckets),
            job,
        )
        .expect("valid");
        let http_requests = IntCounterVec::new(
            Opts::new("cpt_http_requests_total", "HTTP requests by matched route and status."),
            &["method", "route", "status"],
        )
        .expect("valid");
        let http_duration = HistogramVec::new(
            HistogramOpts::new("cpt_http_request_duration_seconds", "HTTP request latency by matched route."),
            &["method", "route"],
        )
        .expect("valid");
        for metric in [
            Box::new(tokens.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(step_duration.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_duration.clone()),
        ] {
            r.register(metric).expect("a unique metric");
        }
        Metrics {
            train_loss: gauge(&r, "cpt_train_loss", "Training loss of the last step (nats/token).", job),
            learning_rate: gauge(&r, "cpt_learning_rate", "Learning rate of the last step.", job),
            grad_norm: gauge(&r, "cpt_grad_norm", "Global gradient L2 norm of the last step, before clipping.", job),
            tokens_per_second: gauge(&r, "cpt_tokens_per_second", "Throughput of the last step.", job),
            mfu: gauge(&r, "cpt_mfu_ratio", "Model FLOPs utilisation of the last step (0–1).", job),
            last_step: gauge(&r, "cpt_last_step_timestamp_seconds", "Unix time of the last step.", job),
            step: gauge(&r, "cpt_step", "The last optimizer step reported.", job),
            target_tokens: gauge(&r, "cpt_target_tokens", "Training tokens the job's plan will consume in all.", job),
            data_seconds: counter(&r, "cpt_data_wait_seconds_total", "Step time spent waiting for data."),
            compute_seconds: counter(&r, "cpt_compute_seconds_total", "Step time spent computing."),
            checkpoints: counter(&r, "cpt_checkpoints_total", "Checkpoints written."),
            last_checkpoint_step: gauge(&r, "cpt_last_checkpoint_step", "Step of the newest checkpoint.", job),
            eval_loss: gauge(&r, "cpt_eval_loss", "Held-out loss per eval set (nats/token).", &["job_id", "set"]),
            eval_perplexity: gauge(&r, "cpt_eval_perplexity", "Held-out perplexity per eval set.", &["job_id", "set"]),
            job_info: gauge(&r, "cpt_job_info", "Always 1; labels describe the job.", &["job_id", "name"]),
            jobs: gauge(&r, "cpt_jobs", "Jobs by state.", &["state"]),
            workers: gauge(
                &r,
                "cpt_workers",
                "Registered workers by liveness (active: seen within two lease periods).",
                &["state"],
            ),
            tokens,
            model_flops: counter(&r, "cpt_model_flops_total", "Model FLOPs of training (6N + attention)."),
            step_duration,
            http_requests,
            http_duration,
            registry: r,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Updates the training series from a newly stored event of job `name`.
    pub fn observe(&self, event: &StoredEvent, name: &str) {
        let id = event.job_id.as_str();
        let number = |key: &str| event.data.get(key).and_then(Value::as_f64);
        self.job_info.with_label_values(&[id, name]).set(1.0);
        let mut seen = self.seen.lock().expect("metrics lock");
        let series = seen.entry(id.to_string()).or_default();
        series.name = name.to_string();
        match event.kind.as_str() {
            "step" => {
                let set = |gauge: &GaugeVec, key: &str| {
                    if let Some(v) = number(key).filter(|v| v.is_finite()) {
                        gauge.with_label_values(&[id]).set(v);
                    }
                };
                set(&self.train_loss, "loss");
                set(&self.learning_rate, "lr");
                set(&self.grad_norm, "grad_norm");
                set(&self.tokens_per_second, "tokens_per_second");
                set(&self.mfu, "mfu");
                if let Some(seconds) = number("step_seconds") {
                    self.step_duration.with_label_values(&[id]).observe(seconds);
                }
                set(&self.step, "step");
                self.last_step.with_label_values(&[id]).set(event.time as f64 / 1000.0);
                for (counter, key) in [(&self.data_seconds, "data_seconds"), (&self.compute_seconds, "compute_seconds")]
                {
                    if let Some(seconds) = number(key).filter(|v| v.is_finite() && *v >= 0.0) {
                        counter.with_label_values(&[id]).inc_by(seconds);
                    }
                }
                let tokens = number("tokens_total").unwrap_or(0.0) as u64;
                let flops = number("flops_total").unwrap_or(0.0);
                self.tokens.with_label_values(&[id]).inc_by(tokens.saturating_sub(series.tokens));
                self.model_flops.with_label_values(&[id]).inc_by((flops - series.flops).max(0.0));
                series.tokens = series.tokens.max(tokens);
                series.flops = series.flops.max(flops);
            }
            "eval" => {
                let set = event.data.get("set").and_then(Value::as_str).unwrap_or("unknown");
                if let (Some(loss), Some(ppl)) = (number("loss"), number("perplexity")) {
                    self.eval_loss.with_label_values(&[id, set]).set(loss);
                    self.eval_perplexity.with_label_values(&[id, set]).set(ppl);
                    series.eval_sets.insert(set.to_string());
                }
            }
            "started" => {
                let total = event.data.pointer("/plan/total_tokens").and_then(Value::as_f64);
                if let Some(total) = total {
                    self.target_tokens.with_label_values(&[id]).set(total);
                }
            }
            "checkpoint" => {
                self.checkpoints.with_label_values(&[id]).inc();
                if let Some(step) = number("step") {
                    self.last_checkpoint_step.with_label_values(&[id]).set(step);
                }
            }
            _ => {}
        }
    }

    /// Removes every series of a job (after it ended and its retention passed).
    pub fn forget(&self, job_id: &str) {
        let Some(series) = self.seen.lock().expect("metrics lock").remove(job_id) else { return };
        for gauge in [
            &self.train_loss,
            &self.learning_rate,
            &self.grad_norm,
            &self.tokens_per_second,
            &self.mfu,
            &self.last_step,
            &self.step,
            &self.target_tokens,
            &self.last_checkpoint_step,
        ] {
            let _ = gauge.remove_label_values(&[job_id]);
        }
        for counter in [&self.model_flops, &self.data_seconds, &self.compute_seconds, &self.checkpoints] {
            let _ = counter.remove_label_values(&[job_id]);
        }
        for set in &series.eval_sets {
            let _ = self.eval_loss.remove_label_values(&[job_id, set]);
            let _ = self.eval_perplexity.remove_label_values(&[job_id, set]);
        }
        let _ = self.job_info.remove_label_values(&[job_id, &series.name]);
        let _ = self.tokens.remove_label_values(&[job_id]);
        let _ = self.step_duration.remove_label_values(&[job_id]);
    }

    /// The text exposition, with job and worker counts read now.
    pub async fn render(&self, pool: &SqlitePool, lease_ttl_seconds: u64) -> sqlx::Result<String> {
        for state in JobState::ALL {
            self.jobs.with_label_values(&[state.as_str()]).set(0.0);
        }
        for row in sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetch_all(pool).await? {
            self.jobs.with_label_values(&[row.get::<String, _>("state").as_str()]).set(row.get::<i64, _>("n") as f64);
        }
        let cutoff = crate::jobs::store::now_ms() - 2 * lease_ttl_seconds as i64 * 1000;
        let row = sqlx::query("SELECT SUM(last_seen_at >= ?) AS active, SUM(last_seen_at < ?) AS stale FROM workers")
            .bind(cutoff)
            .bind(cutoff)
            .fetch_one(pool)
            .await?;
        self.workers.with_label_values(&["active"]).set(row.get::<Option<i64>, _>("active").unwrap_or(0) as f64);
        self.workers.with_label_values(&["stale"]).set(row.get::<Option<i64>, _>("stale").unwrap_or(0) as f64);
        Ok(self.text())
    }

    /// The text exposition of the registry as it is.
    fn text(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `GET /metrics`.
pub async fn scrape(State(app): State<AppState>) -> Result<Response, crate::error::ApiError> {
    let text = app.metrics.render(&app.pool, app.config.lease_ttl_seconds).await?;
    Ok(Response::builder()
        .header("content-type", "text/plain; version=0.0.4")
        .body(text.into())
        .expect("a valid response"))
}

/// Counts and times every request by its matched route (unmatched requests share one label).
pub async fn track_http(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let method = request.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    app.metrics.http_requests.with_label_values(&[&method, &route, &status]).inc();
    app.metrics.http_duration.with_label_values(&[&method, &route]).observe(started.elapsed().as_secs_f64());
    response
}

/// Drops a finished job's series once `retention` has passed, so dashboards keep its last values a while.
pub fn forget_later(app: &AppState, job_id: String) {
    let (metrics, retention) = (app.metrics.clone(), Duration::from_secs(app.config.metrics_retention_seconds));
    tokio::spawn(async move {
        tokio::time::sleep(retention).await;
        metrics.forget(&job_id);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(kind: &str, data: Value) -> StoredEvent {
        StoredEvent { id: 1, job_id: "j1".into(), attempt: 1, seq: 0, kind: kind.into(), time: 5000, data }
    }

    #[test]
    fn totals_become_counter_increments_and_forget_removes_every_series_of_the_job() {
        let metrics = Metrics::new();
        metrics.observe(
            &event("step", json!({"loss": 2.0, "tokens_total": 100, "flops_total": 1e9, "step_seconds": 0.5})),
            "a",
        );
        metrics.observe(
            &event(
                "step",
                json!({"step": 2, "loss": 1.5, "tokens_total": 300, "flops_total": 3e9, "step_seconds": 0.5,
                       "data_seconds": 0.25, "compute_seconds": 0.25}),
            ),
            "a",
        );
        metrics.observe(&event("started", json!({"plan": {"total_tokens": 1000}})), "a");
        metrics.observe(&event("checkpoint", json!({"step": 2, "path": "x"})), "a");
        metrics.observe(&event("eval", json!({"set": "domain", "loss": 1.0, "perplexity": 2.5})), "a");
        let text = metrics.text();
        assert!(text.contains("cpt_tokens_total{job_id=\"j1\"} 300"), "{text}");
        assert!(text.contains("cpt_model_flops_total{job_id=\"j1\"} 3000000000"), "{text}");
        assert!(text.contains("cpt_train_loss{job_id=\"j1\"} 1.5"), "{text}");
        assert!(text.contains("cpt_step_duration_seconds_count{job_id=\"j1\"} 2"), "{text}");
        assert!(text.contains("cpt_eval_perplexity{job_id=\"j1\",set=\"domain\"} 2.5"), "{text}");
        assert!(text.contains("cpt_last_step_timestamp_seconds{job_id=\"j1\"} 5"), "{text}");
        assert!(text.contains("cpt_step{job_id=\"j1\"} 2"), "{text}");
        assert!(text.contains("cpt_target_tokens{job_id=\"j1\"} 1000"), "{text}");
        assert!(text.contains("cpt_data_wait_seconds_total{job_id=\"j1\"} 0.25"), "{text}");
        assert!(text.contains("cpt_checkpoints_total{job_id=\"j1\"} 1"), "{text}");
        assert!(text.contains("cpt_last_checkpoint_step{job_id=\"j1\"} 2"), "{text}");
        metrics.forget("j1");
        assert!(!metrics.text().contains("j1"), "{}", metrics.text());
    }
}
