//! Every SQL statement that touches `jobs`: rows and the user's operations here, the worker's
//! lease operations in `leases.rs`. Each state change is one `UPDATE … WHERE` guarded by the states
//! [`can_transition`] allows and, where a worker acts, by its worker id and attempt: two requests
//! racing on the same job cannot both win, and a stale worker changes nothing.

mod leases;
mod lineage;

pub use leases::{claim, event_sender, expire_leases, extend_leases, finish, heartbeat, Expired, Sender};
pub use lineage::{lineage, Lineage};

use cpt_protocol::jobs::{can_transition, sources_of};
use cpt_protocol::{JobKind, JobState};
use serde::Serialize;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::db::WriteTx;
use crate::now_ms;

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub name: String,
    pub state: JobState,
    pub spec: Value,
    /// Grows with every lease and never repeats.
    pub attempt: i64,
    /// Leases since it was submitted or last resumed; it fails when they reach `max_attempts`.
    pub retries: i64,
    pub max_attempts: i64,
    pub worker_id: Option<String>,
    pub error: Option<String>,
    pub plan: Option<Value>,
    pub progress: Progress,
    pub latest_metrics: Option<Value>,
    /// Per eval set, its latest eval: `{step, perplexity, bits_per_byte, perplexity_change}`.
    pub latest_evals: Option<Value>,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The job this one continues (`POST /v1/jobs/{id}/continue`).
    pub parent_id: Option<String>,
    /// The first job of the chain of continuations this one belongs to (itself when it continues
    /// none); the API shows it in the lineage.
    #[serde(skip_serializing)]
    pub root_id: String,
    /// The sweep this job is a point of, and the grid's values there.
    pub sweep_id: Option<String>,
    pub sweep_point: Option<Value>,
}

/// How far a job is.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub step: i64,
    pub total_steps: Option<i64>,
    pub tokens_total: i64,
    /// `step / total_steps`, in [0, 1].
    pub fraction: Option<f64>,
}

/// Why a job operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job {0}")]
    NotFound(String),
    #[error("cannot {verb} a job that is {}", actual.as_str())]
    Illegal { verb: &'static str, actual: JobState },
    #[error("job {id} attempt {attempt} is not leased by worker {worker}")]
    NotHolder { id: String, attempt: u64, worker: String },
    #[error("the Idempotency-Key was used before with a different request")]
    KeyReused,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn decode_error(message: String) -> sqlx::Error {
    sqlx::Error::Decode(message.into())
}

fn json_column(row: &SqliteRow, column: &str) -> sqlx::Result<Option<Value>> {
    match row.try_get::<Option<String>, _>(column)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| decode_error(format!("jobs.{column}: {e}"))),
    }
}

pub(super) fn job_from_row(row: &SqliteRow) -> sqlx::Result<Job> {
    let step: i64 = row.try_get("step")?;
    let total_steps: Option<i64> = row.try_get("total_steps")?;
    let state: String = row.try_get("state")?;
    let kind: String = row.try_get("kind")?;
    Ok(Job {
        id: row.try_get("id")?,
        kind: JobKind::parse(&kind).ok_or_else(|| decode_error(format!("unknown job kind `{kind}`")))?,
        name: row.try_get("name")?,
        state: JobState::parse(&state).ok_or_else(|| decode_error(format!("unknown job state `{state}`")))?,
        spec: json_column(row, "spec")?.unwrap_or(Value::Null),
        attempt: row.try_get("attempt")?,
        retries: row.try_get("retries")?,
        max_attempts: row.try_get("max_attempts")?,
        worker_id: row.try_get("worker_id")?,
        error: row.try_get("error")?,
        plan: json_column(row, "plan")?,
        progress: Progress {
            step,
            total_steps,
            tokens_total: row.try_get("tokens_total")?,
            fraction: total_steps.filter(|t| *t > 0).map(|t| (step as f64 / t as f64).min(1.0)),
        },
        latest_metrics: json_column(row, "latest_metrics")?,
        latest_evals: json_column(row, "latest_evals")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        root_id: row.try_get::<Option<String>, _>("root_id")?.unwrap_or(row.try_get("id")?),
        parent_id: row.try_get("parent_id")?,
        sweep_id: row.try_get("sweep_id")?,
        sweep_point: json_column(row, "sweep_point")?,
    })
}

/// `state IN (…)` for the states that may move to `to` (and pass `keep`): the guard of every transition.
pub(super) fn from_states(to: JobState, keep: fn(JobState) -> bool) -> String {
    let states: Vec<String> =
        sources_of(to).into_iter().filter(|s| keep(*s)).map(|s| format!("'{}'", s.as_str())).collect();
    format!("state IN ({})", states.join(", "))
}

/// What a new job is made of.
pub struct NewJob<'a> {
    pub kind: JobKind,
    pub name: &'a str,
    pub spec: &'a Value,
    pub plan: Option<&'a Value>,
    pub total_steps: Option<i64>,
    pub max_attempts: i64,
    /// The client's Idempotency-Key and a hash of the request it came with.
    pub idempotency: Option<(&'a str, String)>,
    /// The job it continues.
    pub parent_id: Option<&'a str>,
    /// The sweep it is a point of, and the grid's values there.
    pub sweep: Option<(&'a str, &'a Value)>,
}

/// Inserts a queued job, or returns the existing one with the same idempotency key (`created`
/// false); the same key with a different request is [`JobError::KeyReused`].
pub async fn create(pool: &SqlitePool, new: NewJob<'_>) -> Result<(Job, bool), JobError> {
    let mut tx = WriteTx::begin(pool).await?;
    if let Some(row) = earlier_request(tx.conn(), "jobs", new.idempotency.as_ref()).await? {
        return Ok((job_from_row(&row)?, false));
    }
    let job = insert(tx.conn(), new).await?;
    tx.commit().await?;
    Ok((job, true))
}

/// The row of `table` (`jobs` or `sweeps`) an earlier request with the same Idempotency-Key made,
/// if any; the same key with a different request is [`JobError::KeyReused`].
pub async fn earlier_request(
    conn: &mut SqliteConnection,
    table: &'static str,
    idempotency: Option<&(&str, String)>,
) -> Result<Option<SqliteRow>, JobError> {
    let Some((key, hash)) = idempotency else { return Ok(None) };
    let sql = format!("SELECT * FROM {table} WHERE idempotency_key = ?");
    let Some(row) = sqlx::query(&sql).bind(key).fetch_optional(conn).await? else { return Ok(None) };
    // Rows made before hashes were kept (NULL) match any request, as they always did.
    let stored: Option<String> = row.try_get("request_hash")?;
    if stored.is_some() && stored.as_ref() != Some(hash) {
        return Err(JobError::KeyReused);
    }
    Ok(Some(row))
}

/// Inserts a queued job inside the caller's transaction.
pub async fn insert(conn: &mut SqliteConnection, new: NewJob<'_>) -> sqlx::Result<Job> {
    let now = now_ms();
    let (key, hash) = new.idempotency.map_or((None, None), |(k, h)| (Some(k), Some(h)));
    let (sweep_id, sweep_point) = new.sweep.map_or((None, None), |(id, point)| (Some(id), Some(point.to_string())));
    let id = uuid::Uuid::new_v4().to_string();
    let root_id: Option<String> = match new.parent_id {
        Some(parent) => {
            sqlx::query_scalar("SELECT COALESCE(root_id, id) FROM jobs WHERE id = ?")
                .bind(parent)
                .fetch_optional(&mut *conn)
                .await?
        }
        None => None,
    };
    let row = sqlx::query(
        "INSERT INTO jobs (id, kind, name, spec, state, max_attempts, idempotency_key, request_hash, plan, total_steps,
                           created_at, updated_at, parent_id, sweep_id, sweep_point, root_id)
         VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
    )
    .bind(&id)
    .bind(new.kind.as_str())
    .bind(new.name)
    .bind(new.spec.to_string())
    .bind(new.max_attempts)
    .bind(key)
    .bind(hash)
    .bind(new.plan.map(Value::to_string))
    .bind(new.total_steps)
    .bind(now)
    .bind(now)
    .bind(new.parent_id)
    .bind(sweep_id)
    .bind(sweep_point)
    .bind(root_id.unwrap_or_else(|| id.clone()))
    .fetch_one(conn)
    .await?;
    job_from_row(&row)
}

pub async fn get(pool: &SqlitePool, id: &str) -> sqlx::Result<Option<Job>> {
    let row = sqlx::query("SELECT * FROM jobs WHERE id = ?").bind(id).fetch_optional(pool).await?;
    row.as_ref().map(job_from_row).transpose()
}

/// The job `id`, or [`JobError::NotFound`].
pub async fn existing(pool: &SqlitePool, id: &str) -> Result<Job, JobError> {
    get(pool, id).await?.ok_or_else(|| JobError::NotFound(id.to_string()))
}

/// A page of jobs, newest first (by insertion order), optionally of one kind and state, after
/// `cursor` (the `next` of the previous page).
pub async fn list(
    pool: &SqlitePool,
    kind: Option<JobKind>,
    state: Option<JobState>,
    cursor: Option<i64>,
    limit: i64,
) -> sqlx::Result<(Vec<Job>, Option<i64>)> {
    let rows = sqlx::query(
        "SELECT rowid, * FROM jobs WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR state = ?2) AND rowid < ?3
         ORDER BY rowid DESC LIMIT ?4",
    )
    .bind(kind.map(JobKind::as_str))
    .bind(state.map(JobState::as_str))
    .bind(cursor.unwrap_or(i64::MAX))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    crate::db::page(&rows, limit, job_from_row)
}

/// The jobs of a sweep, in the grid's order.
pub async fn of_sweep(pool: &SqlitePool, sweep_id: &str) -> sqlx::Result<Vec<Job>> {
    let rows =
        sqlx::query("SELECT * FROM jobs WHERE sweep_id = ? ORDER BY rowid").bind(sweep_id).fetch_all(pool).await?;
    rows.iter().map(job_from_row).collect()
}

/// Jobs per state, every state present.
pub async fn counts_by_state(pool: &SqlitePool) -> sqlx::Result<Vec<(JobState, i64)>> {
    let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetch_all(pool).await?;
    let mut counts: Vec<(JobState, i64)> = JobState::ALL.into_iter().map(|s| (s, 0)).collect();
    for row in rows {
        let state: String = row.try_get("state")?;
        let state = JobState::parse(&state).ok_or_else(|| decode_error(format!("unknown job state `{state}`")))?;
        counts.iter_mut().filter(|(s, _)| *s == state).for_each(|(_, n)| *n = row.get("n"));
    }
    Ok(counts)
}

/// After a refused guarded update: why it was refused.
async fn refusal(pool: &SqlitePool, id: &str, verb: &'static str) -> JobError {
    match existing(pool, id).await {
        Ok(job) => JobError::Illegal { verb, actual: job.state },
        Err(error) => error,
    }
}

/// `queued | paused → cancelled` at once, `running → cancelling` until its worker has checkpointed.
pub async fn cancel(pool: &SqlitePool, id: &str) -> Result<Job, JobError> {
    debug_assert!(can_transition(JobState::Queued, JobState::Cancelled));
    debug_assert!(can_transition(JobState::Paused, JobState::Cancelled));
    debug_assert!(can_transition(JobState::Running, JobState::Cancelling));
    let now = now_ms();
    let row = sqlx::query(
        "UPDATE jobs SET state = CASE state WHEN 'running' THEN 'cancelling' ELSE 'cancelled' END, updated_at = ?1,
                finished_at = CASE state WHEN 'running' THEN finished_at ELSE ?1 END
         WHERE id = ?2 AND state IN ('queued', 'running', 'paused') RETURNING *",
    )
    .bind(now)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    match row {
        Some(row) => Ok(job_from_row(&row)?),
        None => Err(refusal(pool, id, "cancel").await),
    }
}

/// `failed | cancelled | paused → queued`: a new attempt continues from the newest valid
/// checkpoint, with its retries counted afresh. The attempt number keeps growing.
pub async fn resume(pool: &SqlitePool, id: &str) -> Result<Job, JobError> {
    let sql = format!(
        "UPDATE jobs SET state = 'queued', error = NULL, retries = 0, worker_id = NULL, lease_expires_at = NULL,
                finished_at = NULL, updated_at = ? WHERE id = ? AND kind = 'train' AND {} RETURNING *",
        from_states(JobState::Queued, JobState::is_resumable)
    );
    let row = sqlx::query(&sql).bind(now_ms()).bind(id).fetch_optional(pool).await?;
    match row {
        Some(row) => Ok(job_from_row(&row)?),
        None => Err(refusal(pool, id, "resume").await),
    }
}

/// Records a step event's progress, inside the transaction that stored it.
pub async fn record_progress(
    conn: &mut SqliteConnection,
    id: &str,
    step: u64,
    tokens_total: u64,
    latest_metrics: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET step = MAX(step, ?), tokens_total = MAX(tokens_total, ?), latest_metrics = ?, updated_at = ?
         WHERE id = ?",
    )
    .bind(step as i64)
    .bind(tokens_total as i64)
    .bind(latest_metrics.to_string())
    .bind(now_ms())
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records the newest eval of each set in `evals`, inside the transaction that stored them.
pub async fn record_evals(conn: &mut SqliteConnection, id: &str, evals: &[(&str, Value)]) -> sqlx::Result<()> {
    if evals.is_empty() {
        return Ok(());
    }
    let stored: Option<String> =
        sqlx::query_scalar("SELECT latest_evals FROM jobs WHERE id = ?").bind(id).fetch_one(&mut *conn).await?;
    let mut latest: serde_json::Map<String, Value> =
        stored.and_then(|text| serde_json::from_str(&text).ok()).unwrap_or_default();
    for (set, eval) in evals {
        latest.insert(set.to_string(), eval.clone());
    }
    sqlx::query("UPDATE jobs SET latest_evals = ? WHERE id = ?")
        .bind(Value::Object(latest).to_string())
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}
