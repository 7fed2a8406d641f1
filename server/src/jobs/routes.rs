//! `/v1/jobs`: submit (with dry runs and idempotency keys), list, inspect, cancel, resume.

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cpt_protocol::{JobSpec, ModelConfig, Plan};
use serde::Deserialize;
use serde_json::{json, Value};

use super::state::JobState;
use super::store::{self, NewJob, TransitionError, TransitionOutcome};
use crate::app::AppState;
use crate::error::ApiError;

/// Resolves a path from a spec inside the configured data roots, or names the field.
pub fn inside_roots(roots: &[PathBuf], field: &str, path: &str) -> Result<PathBuf, ApiError> {
    let resolved = Path::new(path)
        .canonicalize()
        .map_err(|_| ApiError::invalid_field(field, format!("{path} does not exist on the server")))?;
    if roots.iter().any(|root| root.canonicalize().is_ok_and(|root| resolved.starts_with(root))) {
        Ok(resolved)
    } else {
        Err(ApiError::invalid_field(field, format!("{path} is outside the server's data roots")))
    }
}

/// Checks that the spec's paths exist inside the roots and returns the base model's config.
fn check_paths(roots: &[PathBuf], spec: &JobSpec) -> Result<ModelConfig, ApiError> {
    let base = inside_roots(roots, "base_model", &spec.base_model)?;
    let text = std::fs::read_to_string(base.join("config.json"))
        .map_err(|_| ApiError::invalid_field("base_model", "the directory has no readable config.json"))?;
    let config = ModelConfig::from_json_str(&text).map_err(|e| ApiError::invalid_field("base_model", e.to_string()))?;
    let datasets = spec.train_data.iter().enumerate().map(|(i, s)| (format!("train_data[{i}].dataset"), &s.dataset));
    let evals = spec.eval_data.iter().map(|(name, dataset)| (format!("eval_data.{name}"), dataset));
    for (field, dataset) in datasets.chain(evals) {
        let dir = inside_roots(roots, &field, dataset)?;
        if !dir.join("manifest.json").exists() {
            return Err(ApiError::invalid_field(
                field,
                format!("{dataset} is not a prepared dataset (no manifest.json)"),
            ));
        }
    }
    Ok(config)
}

#[derive(Deserialize)]
pub struct CreateQuery {
    #[serde(default)]
    dry_run: bool,
}

/// `POST /v1/jobs`.
pub async fn create(
    State(app): State<AppState>,
    Query(query): Query<CreateQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
    let spec = JobSpec::from_json_str(body).map_err(|e| {
        if e.field.is_empty() {
            ApiError::bad_request(e.message)
        } else {
            ApiError::invalid_field(e.field, e.message)
        }
    })?;
    let config = check_paths(&app.config.data_roots, &spec)?;
    let plan = Plan::new(&spec, &config);
    if query.dry_run {
        return Ok(Json(json!({"plan": plan})).into_response());
    }
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().map_err(|_| ApiError::bad_request("Idempotency-Key must be ASCII")));
    let key = key.transpose()?;
    if key.is_some_and(|k| k.is_empty() || k.len() > 200) {
        return Err(ApiError::invalid_field("Idempotency-Key", "must be 1 to 200 characters"));
    }
    let spec_json = serde_json::to_value(&spec).map_err(ApiError::internal)?;
    let plan_json = serde_json::to_value(&plan).map_err(ApiError::internal)?;
    let new = NewJob {
        kind: "train",
        name: &spec.name,
        spec: &spec_json,
        plan: Some(&plan_json),
        total_steps: Some(plan.total_steps as i64),
        max_attempts: app.config.max_attempts,
        idempotency_key: key,
    };
    let (job, created) = store::create(&app.pool, new).await?;
    app.queue.notify_waiters();
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(job)).into_response())
}

#[derive(Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/jobs`: newest first; `next_cursor` fetches the following page.
pub async fn list(State(app): State<AppState>, Query(query): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let state = match query.state.as_deref() {
        Some(text) => Some(
            JobState::parse(text).ok_or_else(|| ApiError::invalid_field("state", format!("unknown state `{text}`")))?,
        ),
        None => None,
    };
    let cursor = match query.cursor.as_deref() {
        Some(text) => Some(text.parse::<i64>().map_err(|_| ApiError::invalid_field("cursor", "malformed cursor"))?),
        None => None,
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid_field("limit", "must be between 1 and 500"));
    }
    let (jobs, next) = store::list(&app.pool, state, cursor, limit).await?;
    Ok(Json(json!({"jobs": jobs, "next_cursor": next.map(|n| n.to_string())})))
}

/// `GET /v1/jobs/{id}`.
pub async fn get(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<store::Job>, ApiError> {
    existing(&app, &id).await.map(Json)
}

/// The job `id`, or the API's 404.
pub async fn existing(app: &AppState, id: &str) -> Result<store::Job, ApiError> {
    store::get(&app.pool, id).await?.ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

fn refused(outcome: TransitionOutcome, id: &str, verb: &str) -> ApiError {
    match outcome {
        TransitionOutcome::Refused(TransitionError::NotFound) => ApiError::not_found(format!("no job {id}")),
        TransitionOutcome::Refused(TransitionError::Illegal { actual }) => {
            ApiError::conflict(format!("cannot {verb} a job that is {}", actual.as_str()))
        }
        TransitionOutcome::Database(e) => ApiError::internal(e),
    }
}

/// `POST /v1/jobs/{id}/cancel`: a queued job is cancelled at once; a running one becomes
/// `cancelling` until its worker has checkpointed.
pub async fn cancel(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<store::Job>, ApiError> {
    let job = existing(&app, &id).await?;
    let to = match job.state {
        JobState::Queued => JobState::Cancelled,
        JobState::Running => JobState::Cancelling,
        other => return Err(ApiError::conflict(format!("cannot cancel a job that is {}", other.as_str()))),
    };
    store::transition(&app.pool, &id, job.state, to, &[]).await.map(Json).map_err(|e| refused(e, &id, "cancel"))
}

/// `POST /v1/jobs/{id}/resume`: a failed or cancelled job is queued again; its worker continues
/// from the newest valid checkpoint.
pub async fn resume(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<store::Job>, ApiError> {
    let job = existing(&app, &id).await?;
    if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
        return Err(ApiError::conflict(format!(
            "only failed or cancelled jobs resume; this one is {}",
            job.state.as_str()
        )));
    }
    let also = [("error", None), ("attempt", Some("0".to_string()))];
    let job = store::transition(&app.pool, &id, job.state, JobState::Queued, &also)
        .await
        .map_err(|e| refused(e, &id, "resume"))?;
    app.queue.notify_waiters();
    Ok(Json(job))
}
