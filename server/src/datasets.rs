//! `/v1/datasets`: preparations run by workers as jobs of kind `prepare`. A dataset's id is its
//! job's id; its directory is `<data-dir>/datasets/<id>`; its report arrives as a `prepared` event.

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cpt_protocol::prepare::PrepareConfig;
use cpt_protocol::spec::limits::NAME_BYTES;
use cpt_protocol::spec::PrepareSpec;
use cpt_protocol::{Event, JobKind};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::events::store as events;
use crate::jobs::paths::{expand_input, inside_roots};
use crate::jobs::routes::{idempotency, page_query};
use crate::jobs::store::{self, Job, NewJob};
use crate::AppState;

/// The dataset routes (behind the API token).
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/datasets", post(create).get(list)).route("/v1/datasets/{id}", get(get_dataset))
}

/// At most this many inputs (each may be a directory or a pattern).
const MAX_INPUTS: usize = 1000;

/// `POST /v1/datasets`. Paths are resolved and patterns expanded here, inside the data roots; the
/// stored spec names the resolved paths, so every worker reads the same files.
pub async fn create(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let mut spec: PrepareSpec = crate::error::parse_json(&body)?;
    if spec.name.trim().is_empty() || spec.name.len() as u64 > NAME_BYTES {
        return Err(ApiError::invalid_field("name", format!("must be 1 to {NAME_BYTES} characters")));
    }
    if spec.inputs.is_empty() || spec.inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid_field("inputs", format!("needs 1 to {MAX_INPUTS} paths")));
    }
    let idempotency = idempotency(&headers, &spec)?;
    spec.tokenizer = inside_roots(&app.config.data_roots, "tokenizer", &spec.tokenizer)?.display().to_string();
    let mut inputs = Vec::new();
    for (i, input) in spec.inputs.iter().enumerate() {
        let expanded = expand_input(&app.config.data_roots, &format!("inputs[{i}]"), input)?;
        inputs.extend(expanded.into_iter().map(|p| p.display().to_string()));
    }
    spec.inputs = inputs;
    let config = if spec.config.is_null() { json!({}) } else { spec.config.clone() };
    serde_json::from_value::<PrepareConfig>(config).map_err(|e| ApiError::invalid_field("config", e.to_string()))?;
    let spec_json = serde_json::to_value(&spec).map_err(ApiError::internal)?;
    let new = NewJob {
        kind: JobKind::Prepare,
        name: &spec.name,
        spec: &spec_json,
        plan: None,
        total_steps: None,
        max_attempts: app.config.max_attempts,
        idempotency: idempotency.as_ref().map(|(key, hash)| (key.as_str(), hash.clone())),
    };
    let (job, created) = store::create(&app.pool, new).await?;
    app.queue.notify_waiters();
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(view(&app, job).await?)).into_response())
}

/// A dataset: its job, where it lives, and the preparation report once there is one.
async fn view(app: &AppState, job: Job) -> Result<Value, ApiError> {
    let prepared = events::latest_of_kind(&app.pool, &job.id, "prepared").await?.map(|e| e.envelope.event);
    let (path, manifest) = match prepared {
        Some(Event::Prepared { path, manifest }) => (path, Some(manifest)),
        _ => (app.config.data_dir.join("datasets").join(&job.id).display().to_string(), None),
    };
    Ok(json!({
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "path": path,
        "manifest": manifest,
        "error": job.error,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }))
}

#[derive(Deserialize)]
pub struct ListQuery {
    cursor: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/datasets`: newest first; `next_cursor` fetches the following page.
pub async fn list(State(app): State<AppState>, Query(query): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let (cursor, limit) = page_query(query.cursor.as_deref(), query.limit)?;
    let (jobs, next) = store::list(&app.pool, Some(JobKind::Prepare), None, cursor, limit).await?;
    let mut datasets = Vec::with_capacity(jobs.len());
    for job in jobs {
        datasets.push(view(&app, job).await?);
    }
    Ok(Json(json!({"datasets": datasets, "next_cursor": next.map(|n| n.to_string())})))
}

/// `GET /v1/datasets/{id}`.
pub async fn get_dataset(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let job = store::get(&app.pool, &id).await?.filter(|j| j.kind == JobKind::Prepare);
    let job = job.ok_or_else(|| ApiError::not_found(format!("no dataset {id}")))?;
    Ok(Json(view(&app, job).await?))
}
