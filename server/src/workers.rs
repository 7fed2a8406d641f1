//! The worker protocol: register, lease (long-poll), heartbeat (answers with cancel requests),
//! finish. The bodies are `cpt_protocol::worker`'s types; job rows change only in the jobs store.

use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use cpt_protocol::model_config::ModelConfig;
use cpt_protocol::plan::{self, StepPath};
use cpt_protocol::spec::JobSpec;
use cpt_protocol::worker::{Finish, Heartbeat, HeartbeatReply, Registered, Registration};
use serde::Deserialize;
use sqlx::Row;

use crate::error::{ApiError, Body};
use crate::jobs::store::{self, Job};
use crate::{now_ms, AppState};

/// The worker routes (behind the worker token); event batches are in `events`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/workers", post(register))
        .route("/v1/workers/{id}/lease", post(lease))
        .route("/v1/workers/{id}/heartbeat", post(heartbeat))
        .route("/v1/workers/{id}/finish", post(finish))
}

/// `POST /v1/workers`: a worker introduces itself and learns the lease timing.
pub async fn register(State(app): State<AppState>, Body(body): Body<Registration>) -> Result<Response, ApiError> {
    if body.name.is_empty() || body.name.len() > 200 {
        return Err(ApiError::invalid_field("name", "must be 1 to 200 characters"));
    }
    if body.device.len() > 64 {
        return Err(ApiError::invalid_field("device", "must be at most 64 characters"));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO workers (id, name, device, memory_bytes, registered_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&id)
    .bind(&body.name)
    .bind(&body.device)
    .bind(body.memory_bytes.map(|m| m.min(i64::MAX as u64) as i64))
    .bind(now)
    .bind(now)
    .execute(&app.pool)
    .await?;
    let ttl = app.config.lease_ttl_seconds;
    let body = Registered { worker_id: id, lease_ttl_seconds: ttl, heartbeat_interval_seconds: (ttl / 3).max(1) };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Refuses a job that needs more memory than `--max-job-memory-bytes` on any worker, or, without
/// that limit, more than every worker seen within two lease periods says it has, each asked for
/// what the job needs on its device (the explicit step on a CPU, autograd elsewhere). A worker that
/// did not say what it holds may hold anything.
pub async fn check_memory(app: &AppState, config: &ModelConfig, spec: &JobSpec) -> Result<(), ApiError> {
    let refuse = |estimate: u64, limit: u64| {
        ApiError::invalid_field(
            "micro_batch_size",
            format!("the plan needs about {estimate} bytes of memory; the most a worker can give a job is {limit}"),
        )
    };
    if let Some(limit) = app.config.max_job_memory_bytes {
        let estimate = plan::memory_estimate_bytes(config, spec);
        return if estimate > limit { Err(refuse(estimate, limit)) } else { Ok(()) };
    }
    let cutoff = now_ms() - 2 * app.lease_ms();
    let workers = sqlx::query("SELECT device, memory_bytes FROM workers WHERE last_seen_at >= ?")
        .bind(cutoff)
        .fetch_all(&app.pool)
        .await?;
    let mut largest: Option<(u64, u64)> = None;
    for worker in workers {
        let Some(memory) = worker.get::<Option<i64>, _>("memory_bytes").map(|m| m as u64) else { return Ok(()) };
        let path = StepPath::of(spec, worker.get::<String, _>("device") == "cpu");
        let estimate = plan::memory_estimate_bytes_on(config, spec, path);
        if estimate <= memory {
            return Ok(());
        }
        if largest.is_none_or(|(_, most)| memory > most) {
            largest = Some((estimate, memory));
        }
    }
    largest.map_or(Ok(()), |(estimate, memory)| Err(refuse(estimate, memory)))
}

async fn touch(app: &AppState, worker: &str) -> Result<(), ApiError> {
    let updated = sqlx::query("UPDATE workers SET last_seen_at = ? WHERE id = ?")
        .bind(now_ms())
        .bind(worker)
        .execute(&app.pool)
        .await?;
    if updated.rows_affected() == 0 {
        return Err(ApiError::not_found(format!("no worker {worker}; register first")));
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct LeaseQuery {
    /// Seconds to wait for a job before answering 204.
    #[serde(default)]
    wait_seconds: u64,
}

/// `POST /v1/workers/{id}/lease`: the next queued job (200), or 204 after `wait_seconds`.
pub async fn lease(
    State(app): State<AppState>,
    UrlPath(worker): UrlPath<String>,
    Query(query): Query<LeaseQuery>,
) -> Result<Response, ApiError> {
    touch(&app, &worker).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(query.wait_seconds.min(60));
    loop {
        // Subscribe before looking, so a job queued in between still wakes us.
        let queued = app.queue.notified();
        if let Some(job) = store::claim(&app.pool, &worker, app.lease_ms()).await? {
            return Ok(Json(job).into_response());
        }
        if *app.closing.borrow() || tokio::time::timeout_at(deadline, queued).await.is_err() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

/// `POST /v1/workers/{id}/heartbeat`: extends the lease; says whether to stop (cancel requested).
/// 409 when the attempt is no longer this worker's (its lease expired and the job moved on).
pub async fn heartbeat(
    State(app): State<AppState>,
    UrlPath(worker): UrlPath<String>,
    Body(body): Body<Heartbeat>,
) -> Result<Json<HeartbeatReply>, ApiError> {
    touch(&app, &worker).await?;
    let cancel = store::heartbeat(&app.pool, &body.job_id, body.attempt, &worker, app.lease_ms()).await?;
    Ok(Json(HeartbeatReply { cancel }))
}

/// `POST /v1/workers/{id}/finish`: the worker's attempt ended as `succeeded`, `failed`,
/// `cancelled`, or `queued` (released at a checkpoint for another worker to resume at once).
pub async fn finish(
    State(app): State<AppState>,
    UrlPath(worker): UrlPath<String>,
    Body(body): Body<Finish>,
) -> Result<Json<Job>, ApiError> {
    touch(&app, &worker).await?;
    let error = body.error.as_deref().map(|e| truncate(e, 16 * 1024));
    let job = store::finish(&app.pool, &body.job_id, body.attempt, &worker, body.outcome, error).await?;
    if job.state == cpt_protocol::JobState::Queued {
        app.queue.notify_waiters();
    } else if job.state.is_terminal() {
        crate::metrics::forget_later(&app, job.id.clone());
    }
    Ok(Json(job))
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
