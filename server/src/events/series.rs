//! Views derived from a job's events: metric series for plotting and the list of checkpoints.
//! The series is the union over attempts; when a later attempt re-ran steps (after a crash), its
//! values replace the earlier attempt's.

use std::collections::BTreeMap;

use axum::extract::{Path as UrlPath, State};
use axum::Json;
use cpt_protocol::{Event, StepMetrics};
use serde_json::{json, Value};

use super::store::{self, StoredEvent};
use crate::error::ApiError;
use crate::jobs::store as jobs;
use crate::AppState;

/// A job's events of `kind`, oldest attempt first, in order.
async fn events_of(app: &AppState, id: &str, kind: &str) -> Result<Vec<StoredEvent>, ApiError> {
    jobs::existing(&app.pool, id).await?;
    Ok(store::all_of_kind(&app.pool, id, kind).await?)
}

/// Step events' metrics by step, a later attempt's replacing an earlier one's.
fn by_step(events: Vec<StoredEvent>) -> BTreeMap<u64, StepMetrics> {
    let metrics = events.into_iter().filter_map(|event| match event.envelope.event {
        Event::Step(metrics) => Some((metrics.step, metrics)),
        _ => None,
    });
    metrics.collect()
}

/// A job's step metrics by step.
pub async fn steps_of(app: &AppState, id: &str) -> Result<BTreeMap<u64, StepMetrics>, ApiError> {
    Ok(by_step(events_of(app, id, "step").await?))
}

/// A job's step metrics at about `points` evenly spaced steps, its last included (for charts).
pub async fn sampled_steps_of(app: &AppState, id: &str, points: usize) -> Result<BTreeMap<u64, StepMetrics>, ApiError> {
    jobs::existing(&app.pool, id).await?;
    Ok(by_step(store::steps_sampled(&app.pool, id, points as i64).await?))
}

/// One eval of one set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalPoint {
    pub loss: f64,
    pub perplexity: f64,
    pub bits_per_byte: f64,
}

/// A job's eval sets: per set, its evals by step.
pub type EvalCourses = BTreeMap<String, BTreeMap<u64, EvalPoint>>;

/// Eval events (each job's oldest attempt first, each attempt in order) as courses per job id.
pub fn eval_courses(events: &[StoredEvent]) -> BTreeMap<String, EvalCourses> {
    let mut courses: BTreeMap<String, EvalCourses> = BTreeMap::new();
    for stored in events {
        if let Event::Eval { step, set, loss, perplexity, bits_per_byte, .. } = &stored.envelope.event {
            let point = EvalPoint { loss: *loss, perplexity: *perplexity, bits_per_byte: *bits_per_byte };
            courses.entry(stored.job_id.clone()).or_default().entry(set.clone()).or_default().insert(*step, point);
        }
    }
    courses
}

/// A job's evals by set, then step.
pub async fn evals_of(app: &AppState, id: &str) -> Result<EvalCourses, ApiError> {
    Ok(eval_courses(&events_of(app, id, "eval").await?).remove(id).unwrap_or_default())
}

/// `GET /v1/jobs/{id}/metrics`: per-step training series and per-set eval series, as columns.
pub async fn metrics(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let steps = steps_of(&app, &id).await?;
    let column = |value: fn(&StepMetrics) -> f64| steps.values().map(value).collect::<Vec<f64>>();
    let columns = json!({
        "step": steps.keys().copied().collect::<Vec<_>>(),
        "loss": column(|m| m.loss),
        "lr": column(|m| m.lr),
        "grad_norm": column(|m| m.grad_norm),
        "tokens_total": steps.values().map(|m| m.tokens_total).collect::<Vec<_>>(),
        "tokens_per_second": column(|m| m.tokens_per_second),
        "mfu": column(|m| m.mfu),
        "step_seconds": column(|m| m.step_seconds),
    });
    let evals: serde_json::Map<String, Value> = evals_of(&app, &id)
        .await?
        .into_iter()
        .map(|(set, points)| {
            let series = json!({
                "step": points.keys().copied().collect::<Vec<_>>(),
                "loss": points.values().map(|p| p.loss).collect::<Vec<_>>(),
                "perplexity": points.values().map(|p| p.perplexity).collect::<Vec<_>>(),
                "bits_per_byte": points.values().map(|p| p.bits_per_byte).collect::<Vec<_>>(),
            });
            (set, series)
        })
        .collect();
    Ok(Json(json!({"steps": columns, "evals": evals})))
}

/// `GET /v1/jobs/{id}/checkpoints`: every checkpoint reported, by step.
pub async fn checkpoints(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let mut by_step: BTreeMap<u64, Value> = BTreeMap::new();
    for event in events_of(&app, &id, "checkpoint").await? {
        if let Event::Checkpoint { step, path, tokens_total } = event.envelope.event {
            by_step.insert(step, json!({"step": step, "path": path, "tokens_total": tokens_total}));
        }
    }
    Ok(Json(json!({"checkpoints": by_step.into_values().collect::<Vec<_>>()})))
}
