//! `/v1/jobs`: submit (with dry runs and idempotency keys), list, inspect, cancel, resume (and
//! continue, in `continued.rs`).

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::path::Path;

use cpt_protocol::prepare::ManifestSummary;
use cpt_protocol::{JobKind, JobSpec, JobState, ModelConfig, Plan};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::paths::inside_roots;
use super::store::{self, Job, NewJob};
use crate::error::ApiError;
use crate::AppState;

/// The job routes (behind the API token).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", post(create).get(list))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/resume", post(resume))
        .route("/v1/jobs/{id}/continue", post(super::continued::continue_job))
}

/// Resolves the spec's paths inside the data roots (in place), checks each dataset's manifest, and
/// returns the base model's config.
fn resolve_paths(roots: &[std::path::PathBuf], spec: &mut JobSpec) -> Result<ModelConfig, ApiError> {
    let base = inside_roots(roots, "base_model", &spec.base_model)?;
    let text = std::fs::read_to_string(base.join("config.json"))
        .map_err(|_| ApiError::invalid_field("base_model", "the directory has no readable config.json"))?;
    let config = ModelConfig::from_json_str(&text).map_err(|e| ApiError::invalid_field("base_model", e.to_string()))?;
    spec.base_model = base.display().to_string();
    if let Some(init_from) = spec.adapter.as_mut().and_then(|a| a.init_from.as_mut()) {
        *init_from = inside_roots(roots, "adapter.init_from", init_from)?.display().to_string();
    }
    if let Some(from) = spec.continue_from.as_mut() {
        from.checkpoint = inside_roots(roots, "continue_from.checkpoint", &from.checkpoint)?.display().to_string();
    }
    let seq_len = spec.seq_len;
    let train = spec
        .train_data
        .iter_mut()
        .enumerate()
        .map(|(i, s)| (format!("train_data[{i}].dataset"), &mut s.dataset, "train"));
    let evals = spec.eval_data.iter_mut().map(|(name, dataset)| (format!("eval_data.{name}"), dataset, "validation"));
    for (field, dataset, split) in train.chain(evals) {
        let dir = inside_roots(roots, &field, dataset)?;
        check_manifest(&dir, dataset, split, seq_len, &config)
            .map_err(|message| ApiError::invalid_field(field, message))?;
        *dataset = dir.display().to_string();
    }
    Ok(config)
}

/// Refuses now what would fail on the worker later: a directory that is no prepared dataset, blocks
/// of another length, tokens the model has no embedding for, and a `split` with nothing in it.
fn check_manifest(dir: &Path, dataset: &str, split: &str, seq_len: usize, config: &ModelConfig) -> Result<(), String> {
    let text = std::fs::read_to_string(dir.join("manifest.json"))
        .map_err(|_| format!("{dataset} is not a prepared dataset (no manifest.json)"))?;
    let manifest: ManifestSummary = serde_json::from_str(&text).map_err(|e| format!("{dataset}/manifest.json: {e}"))?;
    if manifest.seq_len != seq_len {
        return Err(format!("{dataset} has blocks of {} tokens; the spec's seq_len is {seq_len}", manifest.seq_len));
    }
    if manifest.vocab_size > config.vocab_size {
        return Err(format!(
            "{dataset}'s tokenizer has {} tokens; the model embeds {}",
            manifest.vocab_size, config.vocab_size
        ));
    }
    let counts = manifest.split(split);
    if counts.blocks == 0 {
        let hint = if split == "validation" {
            " (prepare it with a larger validation_fraction, or \"tail\": \"pad\")"
        } else {
            ""
        };
        return Err(format!("{dataset} has no {split} blocks ({} documents){hint}", counts.documents));
    }
    Ok(())
}

/// The Idempotency-Key header, if given, with the hash of the request it came with.
pub fn idempotency(headers: &HeaderMap, request: &impl serde::Serialize) -> Result<Option<(String, String)>, ApiError> {
    let Some(key) = headers.get("idempotency-key") else { return Ok(None) };
    let key = key.to_str().map_err(|_| ApiError::invalid_field("Idempotency-Key", "must be ASCII"))?;
    if key.is_empty() || key.len() > 200 {
        return Err(ApiError::invalid_field("Idempotency-Key", "must be 1 to 200 characters"));
    }
    let canonical = serde_json::to_vec(request).map_err(ApiError::internal)?;
    let hash = Sha256::digest(&canonical).iter().map(|b| format!("{b:02x}")).collect();
    Ok(Some((key.to_string(), hash)))
}

#[derive(Deserialize)]
pub struct CreateQuery {
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /v1/jobs`.
pub async fn create(
    State(app): State<AppState>,
    Query(query): Query<CreateQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
    let spec = parse_spec(body)?;
    let idempotency = idempotency(&headers, &spec)?;
    submit(&app, spec, query.dry_run, idempotency, None).await
}

/// A spec from JSON text, its errors naming their field.
pub fn parse_spec(text: &str) -> Result<JobSpec, ApiError> {
    JobSpec::from_json_str(text).map_err(|e| {
        if e.field.is_empty() {
            ApiError::bad_request(e.message)
        } else {
            ApiError::invalid_field(e.field, e.message)
        }
    })
}

/// Resolves `spec`'s paths inside the data roots and plans it, refusing what no worker could hold.
/// The paths and manifests are read on a blocking thread: a slow disk must not hold the runtime.
pub async fn plan_job(app: &AppState, mut spec: JobSpec) -> Result<(JobSpec, Plan), ApiError> {
    let server = app.config.clone();
    let (spec, config) =
        tokio::task::spawn_blocking(move || resolve_paths(&server.data_roots, &mut spec).map(|config| (spec, config)))
            .await
            .map_err(ApiError::internal)??;
    let plan = Plan::new(&spec, &config);
    crate::workers::check_memory(app, &config, &spec).await?;
    Ok((spec, plan))
}

/// A training job's row, from its resolved spec and plan.
pub struct TrainJob {
    pub spec: Value,
    pub plan: Value,
    pub total_steps: i64,
}

impl TrainJob {
    pub fn new(spec: &JobSpec, plan: &Plan) -> Result<TrainJob, ApiError> {
        Ok(TrainJob {
            spec: serde_json::to_value(spec).map_err(ApiError::internal)?,
            plan: serde_json::to_value(plan).map_err(ApiError::internal)?,
            total_steps: plan.total_steps as i64,
        })
    }

    /// The row to insert (`name` is the spec's).
    pub fn row<'a>(&'a self, app: &AppState, name: &'a str) -> NewJob<'a> {
        NewJob {
            kind: JobKind::Train,
            name,
            spec: &self.spec,
            plan: Some(&self.plan),
            total_steps: Some(self.total_steps),
            max_attempts: app.config.max_attempts,
            idempotency: None,
            parent_id: None,
            sweep: None,
        }
    }
}

/// Plans `spec` (see [`plan_job`]); then answers a dry run with the plan, or queues the job (200
/// for a repeated `Idempotency-Key`, 201 for a new job).
pub async fn submit(
    app: &AppState,
    spec: JobSpec,
    dry_run: bool,
    idempotency: Option<(String, String)>,
    parent_id: Option<&str>,
) -> Result<Response, ApiError> {
    let (spec, plan) = plan_job(app, spec).await?;
    if dry_run {
        return Ok(Json(json!({"plan": plan})).into_response());
    }
    let job = TrainJob::new(&spec, &plan)?;
    let new = NewJob {
        idempotency: idempotency.as_ref().map(|(key, hash)| (key.as_str(), hash.clone())),
        parent_id,
        ..job.row(app, &spec.name)
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

/// A validated page request: `(cursor, limit)`.
pub fn page_query(cursor: Option<&str>, limit: Option<i64>) -> Result<(Option<i64>, i64), ApiError> {
    let cursor = match cursor {
        Some(text) => Some(text.parse::<i64>().map_err(|_| ApiError::invalid_field("cursor", "malformed cursor"))?),
        None => None,
    };
    let limit = limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid_field("limit", "must be between 1 and 500"));
    }
    Ok((cursor, limit))
}

/// `GET /v1/jobs`: newest first, as summaries; `next_cursor` fetches the following page.
pub async fn list(State(app): State<AppState>, Query(query): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let state = match query.state.as_deref() {
        Some(text) => Some(
            JobState::parse(text).ok_or_else(|| ApiError::invalid_field("state", format!("unknown state `{text}`")))?,
        ),
        None => None,
    };
    let (cursor, limit) = page_query(query.cursor.as_deref(), query.limit)?;
    let (jobs, next) = store::list(&app.pool, None, state, cursor, limit).await?;
    Ok(Json(json!({"jobs": jobs.iter().map(summary).collect::<Vec<_>>(), "next_cursor": next.map(|n| n.to_string())})))
}

/// A job as the list shows it: without its spec and plan, which may be large (a dataset's spec names
/// up to thousands of files) and are one `GET /v1/jobs/{id}` away.
fn summary(job: &Job) -> Value {
    let mut view = serde_json::to_value(job).unwrap_or_default();
    if let Some(fields) = view.as_object_mut() {
        fields.remove("spec");
        fields.remove("plan");
    }
    view
}

/// `GET /v1/jobs/{id}`: the job, its lineage, and the id of its newest event.
pub async fn get_job(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let job = store::existing(&app.pool, &id).await?;
    let lineage = store::lineage(&app.pool, &job).await?;
    let mut view = serde_json::to_value(&job).map_err(ApiError::internal)?;
    view["lineage"] = serde_json::to_value(&lineage).map_err(ApiError::internal)?;
    view["last_event_id"] = crate::events::store::latest_id(&app.pool, &id).await?.into();
    Ok(Json(view))
}

/// `POST /v1/jobs/{id}/cancel`: a queued job is cancelled at once; a running one becomes
/// `cancelling` until its worker has checkpointed.
pub async fn cancel(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Job>, ApiError> {
    let job = store::cancel(&app.pool, &id).await?;
    if job.state.is_terminal() {
        crate::metrics::forget_later(&app, job.id.clone());
    }
    Ok(Json(job))
}

/// `POST /v1/jobs/{id}/resume`: a failed or cancelled job is queued again; its next attempt
/// continues from the newest valid checkpoint.
pub async fn resume(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Job>, ApiError> {
    let job = store::resume(&app.pool, &id).await?;
    app.queue.notify_waiters();
    Ok(Json(job))
}
