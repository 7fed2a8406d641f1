//! The worker's side of a job: claiming it, heartbeats, finishing, lease expiry, and whose events a
//! batch may be. Every statement is guarded by state, worker and attempt.

use cpt_protocol::worker::Outcome;
use cpt_protocol::JobState;
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{from_states, job_from_row, Job, JobError};
use crate::db::WriteTx;
use crate::now_ms;

/// Claims the oldest queued job for `worker` (SQLite has no SKIP LOCKED: one `UPDATE … RETURNING`
/// inside a write transaction) and records who holds the new attempt.
pub async fn claim(pool: &SqlitePool, worker: &str, lease_ms: i64) -> sqlx::Result<Option<Job>> {
    let now = now_ms();
    let mut tx = WriteTx::begin(pool).await?;
    let row = sqlx::query(
        "UPDATE jobs SET state = 'running', worker_id = ?1, lease_expires_at = ?2, attempt = attempt + 1,
                retries = retries + 1, started_at = COALESCE(started_at, ?3), updated_at = ?3
         WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY rowid LIMIT 1) AND state = 'queued'
         RETURNING *",
    )
    .bind(worker)
    .bind(now + lease_ms)
    .bind(now)
    .fetch_optional(tx.conn())
    .await?;
    let Some(row) = row else { return Ok(None) };
    let job = job_from_row(&row)?;
    sqlx::query("INSERT INTO attempts (job_id, attempt, worker_id, started_at) VALUES (?, ?, ?, ?)")
        .bind(&job.id)
        .bind(job.attempt)
        .bind(worker)
        .bind(now)
        .execute(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(Some(job))
}

/// Extends the lease of the worker holding `attempt`; answers whether a cancel was requested.
pub async fn heartbeat(
    pool: &SqlitePool,
    id: &str,
    attempt: u64,
    worker: &str,
    lease_ms: i64,
) -> Result<bool, JobError> {
    let row = sqlx::query(
        "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND attempt = ? AND worker_id = ?
                AND state IN ('running', 'cancelling') RETURNING state",
    )
    .bind(now_ms() + lease_ms)
    .bind(id)
    .bind(attempt as i64)
    .bind(worker)
    .fetch_optional(pool)
    .await?;
    match row {
        Some(row) => Ok(row.get::<String, _>("state") == JobState::Cancelling.as_str()),
        None => Err(JobError::NotHolder { id: id.to_string(), attempt, worker: worker.to_string() }),
    }
}

/// Ends `worker`'s `attempt` of a job with `outcome`, in one statement guarded by worker, attempt
/// and state. A job whose cancel was requested while it was being released or paused ends
/// `cancelled`.
pub async fn finish(
    pool: &SqlitePool,
    id: &str,
    attempt: u64,
    worker: &str,
    outcome: Outcome,
    error: Option<&str>,
) -> Result<Job, JobError> {
    let to = match outcome {
        Outcome::Succeeded => JobState::Succeeded,
        Outcome::Failed => JobState::Failed,
        Outcome::Cancelled => JobState::Cancelled,
        Outcome::Released => JobState::Queued,
        Outcome::Paused => JobState::Paused,
    };
    // Released or paused: given up at a checkpoint, not ended, so it keeps no worker and no
    // finish time, its retry is given back, and a cancel that was pending wins.
    let gave_up = matches!(outcome, Outcome::Released | Outcome::Paused);
    let sql = format!(
        "UPDATE jobs SET state = CASE WHEN ?1 AND state = 'cancelling' THEN 'cancelled' ELSE ?2 END,
                error = ?3, lease_expires_at = NULL, updated_at = ?4,
                worker_id = CASE WHEN ?1 AND state = 'running' THEN NULL ELSE worker_id END,
                retries = CASE WHEN ?1 THEN MAX(retries - 1, 0) ELSE retries END,
                finished_at = CASE WHEN ?1 AND state = 'running' THEN finished_at ELSE ?4 END
         WHERE id = ?5 AND attempt = ?6 AND worker_id = ?7 AND ({} OR (?1 AND state = 'cancelling'))
         RETURNING *",
        from_states(to, JobState::is_leased)
    );
    let now = now_ms();
    let mut tx = WriteTx::begin(pool).await?;
    let row = sqlx::query(&sql)
        .bind(gave_up)
        .bind(to.as_str())
        .bind(error)
        .bind(now)
        .bind(id)
        .bind(attempt as i64)
        .bind(worker)
        .fetch_optional(tx.conn())
        .await?;
    let Some(row) = row else {
        return Err(JobError::NotHolder { id: id.to_string(), attempt, worker: worker.to_string() });
    };
    let job = job_from_row(&row)?;
    sqlx::query("UPDATE attempts SET finished_at = ? WHERE job_id = ? AND attempt = ?")
        .bind(now)
        .bind(id)
        .bind(attempt as i64)
        .execute(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(job)
}

/// The jobs the lease expiry changed.
#[derive(Debug, Default)]
pub struct Expired {
    pub requeued: u64,
    /// Jobs that reached a final state (failed after their last retry, or cancelled).
    pub ended: Vec<String>,
}

/// Requeues the running jobs whose lease expired (or fails them after `max_attempts` leases), and
/// cancels the cancelling ones.
pub async fn expire_leases(pool: &SqlitePool) -> sqlx::Result<Expired> {
    let now = now_ms();
    let mut tx = WriteTx::begin(pool).await?;
    let requeued = sqlx::query(
        "UPDATE jobs SET state = 'queued', worker_id = NULL, lease_expires_at = NULL, updated_at = ?1
         WHERE state = 'running' AND lease_expires_at < ?1 AND retries < max_attempts",
    )
    .bind(now)
    .execute(tx.conn())
    .await?
    .rows_affected();
    let ended = sqlx::query(
        "UPDATE jobs SET state = CASE state WHEN 'running' THEN 'failed' ELSE 'cancelled' END,
                error = CASE state WHEN 'running'
                    THEN 'the worker stopped heartbeating on each of ' || retries || ' attempts (max_attempts)'
                    ELSE error END,
                finished_at = ?1, updated_at = ?1, lease_expires_at = NULL
         WHERE state IN ('running', 'cancelling') AND lease_expires_at < ?1 RETURNING id",
    )
    .bind(now)
    .fetch_all(tx.conn())
    .await?;
    tx.commit().await?;
    Ok(Expired { requeued, ended: ended.iter().map(|r| r.get("id")).collect() })
}

/// Gives every lease at least until `until`: after the server was down or stalled, workers that
/// kept training need a full period to check in before expiry can requeue their jobs.
pub async fn extend_leases(pool: &SqlitePool, until: i64) -> sqlx::Result<u64> {
    let result = sqlx::query(
        "UPDATE jobs SET lease_expires_at = MAX(lease_expires_at, ?) WHERE state IN ('running', 'cancelling')",
    )
    .bind(until)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Whose events a batch of `attempt` is, checked inside the transaction that stores them.
pub enum Sender {
    /// The holder of the job's running attempt: its events are the job's progress.
    Current { total_steps: Option<i64> },
    /// The holder of an attempt that lost its lease: its events are history, stored without
    /// changing the job.
    Earlier,
}

/// Accepts events of `attempt` from `worker` only if it held that attempt and has not reported its
/// end (nothing is accepted after `finish`).
pub async fn event_sender(
    conn: &mut SqliteConnection,
    id: &str,
    attempt: u64,
    worker: &str,
) -> Result<Sender, JobError> {
    let row = sqlx::query(
        "SELECT a.worker_id, a.finished_at, j.attempt AS current, j.worker_id AS holder, j.state, j.total_steps
         FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.job_id = ? AND a.attempt = ?",
    )
    .bind(id)
    .bind(attempt as i64)
    .fetch_optional(&mut *conn)
    .await?;
    let refused = || JobError::NotHolder { id: id.to_string(), attempt, worker: worker.to_string() };
    let Some(row) = row else { return Err(refused()) };
    if row.get::<String, _>("worker_id") != worker || row.get::<Option<i64>, _>("finished_at").is_some() {
        return Err(refused());
    }
    let state = JobState::parse(&row.get::<String, _>("state"));
    let current = row.get::<i64, _>("current") == attempt as i64
        && row.get::<Option<String>, _>("holder").as_deref() == Some(worker)
        && state.is_some_and(JobState::is_leased);
    Ok(if current { Sender::Current { total_steps: row.get("total_steps") } } else { Sender::Earlier })
}
