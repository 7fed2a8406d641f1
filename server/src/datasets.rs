//! `/v1/datasets`: preparations run by workers as jobs of kind `prepare`. A dataset's id is its
//! job's id; its directory is `<data-dir>/datasets/<id>`; its report arrives as a `prepared` event.

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cpt_data::prepare::PrepareConfig;
use cpt_protocol::spec::PrepareSpec;
use serde_json::{json, Value};
use sqlx::Row;

use crate::app::AppState;
use crate::error::ApiError;
use crate::jobs::routes::inside_roots;
use crate::jobs::store::{self, Job, NewJob};

/// `POST /v1/datasets`.
pub async fn create(State(app): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let spec: PrepareSpec = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if spec.name.trim().is_empty() {
        return Err(ApiError::invalid_field("name", "must not be empty"));
    }
    if spec.inputs.is_empty() {
        return Err(ApiError::invalid_field("inputs", "needs at least one path"));
    }
    inside_roots(&app.config.data_roots, "tokenizer", &spec.tokenizer)?;
    for (i, input) in spec.inputs.iter().enumerate() {
        // Glob patterns are checked by their directory part.
        let fixed = input.split(['*', '?', '[']).next().unwrap_or(input);
        let dir = if fixed.len() < input.len() { fixed.rsplit_once('/').map_or(".", |(d, _)| d) } else { input };
        inside_roots(&app.config.data_roots, &format!("inputs[{i}]"), dir)?;
    }
    let config = if spec.config.is_null() { json!({}) } else { spec.config.clone() };
    serde_json::from_value::<PrepareConfig>(config).map_err(|e| ApiError::invalid_field("config", e.to_string()))?;
    let spec_json = serde_json::to_value(&spec).map_err(ApiError::internal)?;
    let new = NewJob {
        kind: "prepare",
        name: &spec.name,
        spec: &spec_json,
        plan: None,
        total_steps: None,
        max_attempts: app.config.max_attempts,
        idempotency_key: None,
    };
    let (job, _) = store::create(&app.pool, new).await?;
    app.queue.notify_waiters();
    Ok((StatusCode::CREATED, Json(view(&app, job).await?)).into_response())
}

/// A dataset: its job, where it lives, and the preparation report once there is one.
async fn view(app: &AppState, job: Job) -> Result<Value, ApiError> {
    let report = sqlx::query("SELECT data FROM events WHERE job_id = ? AND kind = 'prepared' ORDER BY id DESC LIMIT 1")
        .bind(&job.id)
        .fetch_optional(&app.pool)
        .await?
        .and_then(|row| serde_json::from_str::<Value>(&row.get::<String, _>("data")).ok());
    let path = app.config.data_dir.join("datasets").join(&job.id);
    Ok(json!({
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "path": report.as_ref().and_then(|r| r.get("path").cloned()).unwrap_or_else(|| path.display().to_string().into()),
        "manifest": report.as_ref().and_then(|r| r.get("manifest").cloned()),
        "error": job.error,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }))
}

/// `GET /v1/datasets`: newest first.
pub async fn list(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let rows = sqlx::query("SELECT id FROM jobs WHERE kind = 'prepare' ORDER BY rowid DESC LIMIT 500")
        .fetch_all(&app.pool)
        .await?;
    let mut datasets = Vec::new();
    for row in rows {
        if let Some(job) = store::get(&app.pool, &row.get::<String, _>("id")).await? {
            datasets.push(view(&app, job).await?);
        }
    }
    Ok(Json(json!({"datasets": datasets})))
}

/// `GET /v1/datasets/{id}`.
pub async fn get(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let job = store::get(&app.pool, &id).await?.filter(|j| j.kind == "prepare");
    let job = job.ok_or_else(|| ApiError::not_found(format!("no dataset {id}")))?;
    Ok(Json(view(&app, job).await?))
}
