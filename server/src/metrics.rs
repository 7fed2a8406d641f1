//! Prometheus metrics: training series fed by ingested events (per job, dropped a while after the
//! job ends), job and worker counts read at scrape time, and HTTP request counts and latencies by
//! matched route. Names follow Prometheus conventions: base units, `_total` counters.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use cpt_protocol::Event;
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use sqlx::{Row, SqlitePool};

use crate::events::StoredEvent;
use crate::AppState;

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
    rollbacks: CounterVec,
    last_checkpoint_step: GaugeVec,
    eval_loss: GaugeVec,
    eval_perplexity: GaugeVec,
    eval_bits_per_byte: GaugeVec,
    eval_perplexity_change: GaugeVec,
    budget_exceeded: GaugeVec,
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
    root: String,
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
            rollbacks: counter(&r, "cpt_rollbacks_total", "Loss-spike rollbacks (spike_rollback)."),
            last_checkpoint_step: gauge(&r, "cpt_last_checkpoint_step", "Step of the newest checkpoint.", job),
            eval_loss: gauge(&r, "cpt_eval_loss", "Held-out loss per eval set (nats/token).", &["job_id", "set"]),
            eval_perplexity: gauge(&r, "cpt_eval_perplexity", "Held-out perplexity per eval set.", &["job_id", "set"]),
            eval_bits_per_byte: gauge(
                &r,
                "cpt_eval_bits_per_byte",
                "Held-out bits per UTF-8 byte per eval set (comparable across tokenizers).",
                &["job_id", "set"],
            ),
            eval_perplexity_change: gauge(
                &r,
                "cpt_eval_perplexity_change_ratio",
                "Held-out perplexity per eval set relative to step 0, minus 1 (0.05: +5%).",
                &["job_id", "set"],
            ),
            budget_exceeded: gauge(
                &r,
                "cpt_forgetting_budget_exceeded",
                "1 once an eval set's perplexity rose past its forgetting budget.",
                &["job_id", "set"],
            ),
            job_info: gauge(
                &r,
                "cpt_job_info",
                "Always 1; labels describe the job (root_id: the first job of the chain it continues, else itself).",
                &["job_id", "name", "root_id"],
            ),
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

    /// Updates the training series from a newly stored event of job `name`, whose lineage starts
    /// at job `root`.
    pub fn observe(&self, event: &StoredEvent, name: &str, root: &str) {
        let id = event.job_id.as_str();
        self.job_info.with_label_values(&[id, name, root]).set(1.0);
        let mut seen = self.seen.lock().expect("metrics lock");
        let series = seen.entry(id.to_string()).or_default();
        (series.name, series.root) = (name.to_string(), root.to_string());
        match &event.envelope.event {
            Event::Step(m) => {
                let set = |gauge: &GaugeVec, value: f64| {
                    if value.is_finite() {
                        gauge.with_label_values(&[id]).set(value);
                    }
                };
                set(&self.train_loss, m.loss);
                set(&self.learning_rate, m.lr);
                set(&self.grad_norm, m.grad_norm);
                set(&self.tokens_per_second, m.tokens_per_second);
                set(&self.mfu, m.mfu);
                if m.step_seconds.is_finite() && m.step_seconds >= 0.0 {
                    self.step_duration.with_label_values(&[id]).observe(m.step_seconds);
                }
                set(&self.step, m.step as f64);
                self.last_step.with_label_values(&[id]).set(event.envelope.time as f64 / 1000.0);
                for (counter, seconds) in
                    [(&self.data_seconds, m.data_seconds), (&self.compute_seconds, m.compute_seconds)]
                {
                    if seconds.is_finite() && seconds >= 0.0 {
                        counter.with_label_values(&[id]).inc_by(seconds);
                    }
                }
                self.tokens.with_label_values(&[id]).inc_by(m.tokens_total.saturating_sub(series.tokens));
                if m.flops_total.is_finite() {
                    self.model_flops.with_label_values(&[id]).inc_by((m.flops_total - series.flops).max(0.0));
                    series.flops = series.flops.max(m.flops_total);
                }
                series.tokens = series.tokens.max(m.tokens_total);
            }
            Event::Eval { set, loss, perplexity, bits_per_byte, perplexity_change, .. } => {
                self.eval_loss.with_label_values(&[id, set]).set(*loss);
                self.eval_perplexity.with_label_values(&[id, set]).set(*perplexity);
                for (gauge, value) in
                    [(&self.eval_bits_per_byte, bits_per_byte), (&self.eval_perplexity_change, perplexity_change)]
                {
                    if value.is_finite() {
                        gauge.with_label_values(&[id, set]).set(*value);
                    }
                }
                series.eval_sets.insert(set.clone());
            }
            Event::Rollback { .. } => self.rollbacks.with_label_values(&[id]).inc(),
            Event::ForgettingBudget { set, .. } => {
                self.budget_exceeded.with_label_values(&[id, set]).set(1.0);
                series.eval_sets.insert(set.clone());
            }
            Event::Started { plan, .. } => {
                self.target_tokens.with_label_values(&[id]).set(plan.total_tokens as f64);
            }
            Event::Checkpoint { step, .. } => {
                self.checkpoints.with_label_values(&[id]).inc();
                self.last_checkpoint_step.with_label_values(&[id]).set(*step as f64);
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
        for counter in
            [&self.model_flops, &self.data_seconds, &self.compute_seconds, &self.checkpoints, &self.rollbacks]
        {
            let _ = counter.remove_label_values(&[job_id]);
        }
        for set in &series.eval_sets {
            let _ = self.eval_loss.remove_label_values(&[job_id, set]);
            let _ = self.eval_perplexity.remove_label_values(&[job_id, set]);
            let _ = self.eval_bits_per_byte.remove_label_values(&[job_id, set]);
            let _ = self.eval_perplexity_change.remove_label_values(&[job_id, set]);
            let _ = self.budget_exceeded.remove_label_values(&[job_id, set]);
        }
        let _ = self.job_info.remove_label_values(&[job_id, &series.name, &series.root]);
        let _ = self.tokens.remove_label_values(&[job_id]);
        let _ = self.step_duration.remove_label_values(&[job_id]);
    }

    /// The text exposition, with job and worker counts read now.
    pub async fn render(&self, pool: &SqlitePool, lease_ttl_seconds: u64) -> sqlx::Result<String> {
        for (state, count) in crate::jobs::store::counts_by_state(pool).await? {
            self.jobs.with_label_values(&[state.as_str()]).set(count as f64);
        }
        let cutoff = crate::now_ms() - 2 * lease_ttl_seconds as i64 * 1000;
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
    // Any token is a valid HTTP method: only the ones the API knows become label values.
    let method = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
        .into_iter()
        .find(|known| request.method().as_str() == *known)
        .unwrap_or("other");
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    app.metrics.http_requests.with_label_values(&[method, &route, &status]).inc();
    app.metrics.http_duration.with_label_values(&[method, &route]).observe(started.elapsed().as_secs_f64());
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
    use serde_json::{json, Value};

    /// A stored event of `kind` with the fields of `data` over zeroed defaults.
    fn event(kind: &str, data: Value) -> StoredEvent {
        let mut full = match kind {
            "step" => json!({"step": 1, "loss": 0.0, "lr": 0.0, "grad_norm": 0.0, "skipped": false, "tokens": 0,
                             "tokens_total": 0, "tokens_per_second": 0.0, "flops": 0.0, "flops_total": 0.0,
                             "flops_per_second": 0.0, "mfu": 0.0, "step_seconds": 0.0, "data_seconds": 0.0,
                             "compute_seconds": 0.0}),
            "eval" => json!({"step": 0, "tokens": 0}),
            "checkpoint" => json!({"tokens_total": 0}),
            "started" => json!({"from_step": 0, "resumed": false, "device": "cpu", "peak_flops_per_second": 1.0,
                                "peak_source": "test", "plan": {"total_steps": 1, "tokens_per_step": 1000,
                                "warmup_steps": 0, "lr": {"peak": 1e-4, "min": 1e-5, "reasoning": ""},
                                "flops_per_token": 1.0, "total_flops": 1.0, "parameters": 1,
                                "memory_estimate_bytes": 1}}),
            _ => json!({}),
        };
        for (key, value) in data.as_object().unwrap() {
            if key == "plan" {
                full["plan"]["total_tokens"] = value["total_tokens"].clone();
            } else {
                full[key] = value.clone();
            }
        }
        full["kind"] = kind.into();
        full["seq"] = 0.into();
        full["time"] = 5000.into();
        StoredEvent { id: 1, job_id: "j1".into(), attempt: 1, envelope: serde_json::from_value(full).unwrap() }
    }

    #[test]
    fn totals_become_counter_increments_and_forget_removes_every_series_of_the_job() {
        let metrics = Metrics::new();
        metrics.observe(
            &event("step", json!({"loss": 2.0, "tokens_total": 100, "flops_total": 1e9, "step_seconds": 0.5})),
            "a",
            "j1",
        );
        metrics.observe(
            &event(
                "step",
                json!({"step": 2, "loss": 1.5, "tokens_total": 300, "flops_total": 3e9, "step_seconds": 0.5,
                       "data_seconds": 0.25, "compute_seconds": 0.25}),
            ),
            "a",
            "j1",
        );
        metrics.observe(&event("started", json!({"plan": {"total_tokens": 1000}})), "a", "j1");
        metrics.observe(&event("checkpoint", json!({"step": 2, "path": "x"})), "a", "j1");
        metrics.observe(&event("eval", json!({"set": "domain", "loss": 1.0, "perplexity": 2.5})), "a", "j1");
        let rollback = json!({"step": 12, "to_step": 10, "loss": 9.0, "average": 3.0, "skipped_tokens": 64,
                              "lr_scale": 0.5, "cooldown_until": 13, "rollbacks": 1});
        metrics.observe(&event("rollback", rollback), "a", "j1");
        let text = metrics.text();
        assert!(text.contains("cpt_rollbacks_total{job_id=\"j1\"} 1"), "{text}");
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
