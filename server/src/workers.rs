//! The worker protocol: register, lease (long-poll), heartbeat (answers with cancel requests),
//! finish; and the task that requeues jobs whose worker stopped heartbeating.

use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use sqlx::Row;

use crate::app::AppState;
use crate::error::ApiError;
use crate::jobs::state::JobState;
use crate::jobs::store::{self, now_ms, TransitionOutcome};

#[derive(Deserialize)]
pub struct Registration {
    name: String,
    #[serde(default)]
    device: String,
}

/// `POST /v1/workers`: a worker introduces itself and learns the lease timing.
pub async fn register(State(app): State<AppState>, Json(body): Json<Registration>) -> Result<Response, ApiError> {
    if body.name.is_empty() || body.name.len() > 200 {
        return Err(ApiError::invalid_field("name", "must be 1 to 200 characters"));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    sqlx::query("INSERT INTO workers (id, name, device, registered_at, last_seen_at) VALUES (?, ?, ?, ?, ?)")
        .bind(&id)
        .bind(&body.name)
        .bind(&body.device)
        .bind(now)
        .bind(now)
        .execute(&app.pool)
        .await?;
    let ttl = app.config.lease_ttl_seconds;
    let body = json!({"worker_id": id, "lease_ttl_seconds": ttl, "heartbeat_interval_seconds": (ttl / 3).max(1)});
    Ok((StatusCode::CREATED, Json(body)).into_response())
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

/// Claims the oldest queued job for `worker` in one statement (SQLite has no SKIP LOCKED; the
/// `AND state = 'queued'` guard makes concurrent claims of one job impossible).
async fn claim(app: &AppState, worker: &str) -> Result<Option<store::Job>, ApiError> {
    let expires = now_ms() + app.config.lease_ttl_seconds as i64 * 1000;
    let row = sqlx::query(
        "UPDATE jobs SET state = 'running', worker_id = ?1, lease_expires_at = ?2, attempt = attempt + 1,
                started_at = COALESCE(started_at, ?3), updated_at = ?3
         WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY rowid LIMIT 1) AND state = 'queued'
         RETURNING id",
    )
    .bind(worker)
    .bind(expires)
    .bind(now_ms())
    .fetch_optional(&app.pool)
    .await?;
    match row {
        Some(row) => Ok(store::get(&app.pool, &row.get::<String, _>("id")).await?),
        None => Ok(None),
    }
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
        if let Some(job) = claim(&app, &worker).await? {
            return Ok(Json(job).into_response());
        }
        if *app.closing.borrow() || tokio::time::timeout_at(deadline, queued).await.is_err() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

#[derive(Deserialize)]
pub struct Heartbeat {
    job_id: String,
}

/// `POST /v1/workers/{id}/heartbeat`: extends the lease; says whether to stop (cancel requested).
/// 409 when the job is no longer this worker's (its lease expired and it was requeued).
pub async fn heartbeat(
    State(app): State<AppState>,
    UrlPath(worker): UrlPath<String>,
    Json(body): Json<Heartbeat>,
) -> Result<Json<serde_json::Value>, ApiError> {
    touch(&app, &worker).await?;
    let expires = now_ms() + app.config.lease_ttl_seconds as i64 * 1000;
    let row = sqlx::query(
        "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND worker_id = ? AND state IN ('running', 'cancelling')
         RETURNING state",
    )
    .bind(expires)
    .bind(&body.job_id)
    .bind(&worker)
    .fetch_optional(&app.pool)
    .await?;
    match row {
        Some(row) => Ok(Json(json!({"cancel": row.get::<String, _>("state") == "cancelling"}))),
        None => Err(ApiError::conflict(format!("job {} is not leased by worker {worker}", body.job_id))),
    }
}

#[derive(Deserialize)]
pub struct Finish {
    job_id: String,
    outcome: JobState,
    #[serde(default)]
    error: Option<String>,
}

/// `POST /v1/workers/{id}/finish`: the job ended as `succeeded`, `failed` or `cancelled`.
pub async fn finish(
    State(app): State<AppState>,
    UrlPath(worker): UrlPath<String>,
    Json(body): Json<Finish>,
) -> Result<Json<store::Job>, ApiError> {
    touch(&app, &worker).await?;
    if !(body.outcome.is_terminal() || body.outcome == JobState::Queued) {
        return Err(ApiError::invalid_field("outcome", "must be succeeded, failed, cancelled or queued"));
    }
    let job = crate::jobs::routes::existing(&app, &body.job_id).await?;
    if job.worker_id.as_deref() != Some(worker.as_str())
        || !matches!(job.state, JobState::Running | JobState::Cancelling)
    {
        return Err(ApiError::conflict(format!("job {} is not leased by worker {worker}", body.job_id)));
    }
    // `queued` releases a running job (its worker is shutting down after a checkpoint): another
    // worker resumes it at once instead of after the lease expires.
    let mut also = vec![("error", body.error.clone()), ("lease_expires_at", None)];
    if body.outcome == JobState::Queued {
        also.push(("worker_id", None));
    }
    let finished =
        store::transition(&app.pool, &job.id, job.state, body.outcome, &also).await.map_err(|e| match e {
            TransitionOutcome::Database(e) => ApiError::internal(e),
            TransitionOutcome::Refused(_) => {
                ApiError::conflict(format!("job {} cannot become {}", job.id, body.outcome.as_str()))
            }
        })?;
    if finished.state == JobState::Queued {
        app.queue.notify_waiters();
    } else {
        crate::metrics::forget_later(&app, job.id);
    }
    Ok(Json(finished))
}

/// Requeues (attempt + 1 on the next lease) or fails the running jobs whose lease expired, and
/// cancels the cancelling ones. Returns how many jobs it changed.
pub async fn expire_leases(app: &AppState) -> sqlx::Result<u64> {
    let now = now_ms();
    let mut changed = 0;
    let requeued = sqlx::query(
        "UPDATE jobs SET state = 'queued', worker_id = NULL, lease_expires_at = NULL, updated_at = ?1
         WHERE state = 'running' AND lease_expires_at < ?1 AND attempt < max_attempts",
    )
    .bind(now)
    .execute(&app.pool)
    .await?;
    changed += requeued.rows_affected();
    let failed = sqlx::query(
        "UPDATE jobs SET state = 'failed', finished_at = ?1, updated_at = ?1, lease_expires_at = NULL,
                error = 'the worker stopped heartbeating on each of ' || attempt || ' attempts (max_attempts)'
         WHERE state = 'running' AND lease_expires_at < ?1 AND attempt >= max_attempts",
    )
    .bind(now)
    .execute(&app.pool)
    .await?;
    changed += failed.rows_affected();
    let cancelled = sqlx::query(
        "UPDATE jobs SET state = 'cancelled', finished_at = ?1, updated_at = ?1, lease_expires_at = NULL
         WHERE state = 'cancelling' AND lease_expires_at < ?1",
    )
    .bind(now)
    .execute(&app.pool)
    .await?;
    changed += cancelled.rows_affected();
    if requeued.rows_affected() > 0 {
        app.queue.notify_waiters();
    }
    Ok(changed)
}
