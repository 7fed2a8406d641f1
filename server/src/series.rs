//! Views derived from a job's events: metric series for plotting and the list of checkpoints.
//! When a later attempt re-ran steps (after a crash), its values replace the earlier attempt's.

use std::collections::BTreeMap;

use axum::extract::{Path as UrlPath, State};
use axum::Json;
use serde_json::{json, Value};
use sqlx::Row;

use crate::app::AppState;
use crate::error::ApiError;
use crate::jobs::routes::existing;

/// The data of a job's events of `kind`, oldest attempt first, in order.
async fn event_data(app: &AppState, id: &str, kind: &str) -> Result<Vec<Value>, ApiError> {
    existing(app, id).await?;
    let rows = sqlx::query("SELECT data FROM events WHERE job_id = ? AND kind = ? ORDER BY attempt, seq")
        .bind(id)
        .bind(kind)
        .fetch_all(&app.pool)
        .await?;
    Ok(rows.iter().filter_map(|r| serde_json::from_str(&r.get::<String, _>("data")).ok()).collect())
}

fn step_of(data: &Value) -> Option<u64> {
    data.get("step").and_then(Value::as_u64)
}

/// `GET /v1/jobs/{id}/metrics`: per-step training series and per-set eval series, as columns.
pub async fn metrics(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    const STEP_FIELDS: [&str; 7] =
        ["loss", "lr", "grad_norm", "tokens_total", "tokens_per_second", "mfu", "step_seconds"];
    let mut steps: BTreeMap<u64, Value> = BTreeMap::new();
    for data in event_data(&app, &id, "step").await? {
        if let Some(step) = step_of(&data) {
            steps.insert(step, data);
        }
    }
    let mut columns = serde_json::Map::new();
    columns.insert("step".into(), steps.keys().copied().collect::<Vec<_>>().into());
    for field in STEP_FIELDS {
        columns.insert(field.into(), steps.values().map(|d| d.get(field).cloned().unwrap_or(Value::Null)).collect());
    }
    let mut evals: BTreeMap<String, BTreeMap<u64, (Value, Value)>> = BTreeMap::new();
    for data in event_data(&app, &id, "eval").await? {
        if let (Some(step), Some(set)) = (step_of(&data), data.get("set").and_then(Value::as_str)) {
            let values = (
                data.get("loss").cloned().unwrap_or(Value::Null),
                data.get("perplexity").cloned().unwrap_or(Value::Null),
            );
            evals.entry(set.to_string()).or_default().insert(step, values);
        }
    }
    let evals: serde_json::Map<String, Value> = evals
        .into_iter()
        .map(|(set, points)| {
            let series = json!({
                "step": points.keys().copied().collect::<Vec<_>>(),
                "loss": points.values().map(|p| p.0.clone()).collect::<Vec<_>>(),
                "perplexity": points.values().map(|p| p.1.clone()).collect::<Vec<_>>(),
            });
            (set, series)
        })
        .collect();
    Ok(Json(json!({"steps": columns, "evals": evals})))
}

/// `GET /v1/jobs/{id}/checkpoints`: every checkpoint reported, by step.
pub async fn checkpoints(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let mut by_step: BTreeMap<u64, Value> = BTreeMap::new();
    for data in event_data(&app, &id, "checkpoint").await? {
        if let Some(step) = step_of(&data) {
            let entry = json!({"step": step, "path": data.get("path"), "tokens_total": data.get("tokens_total")});
            by_step.insert(step, entry);
        }
    }
    Ok(Json(json!({"checkpoints": by_step.into_values().collect::<Vec<_>>()})))
}
