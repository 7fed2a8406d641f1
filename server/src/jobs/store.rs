//! Jobs in SQLite. Every state change is one `UPDATE … WHERE id = ? AND state = ?`: two requests
//! racing on the same job cannot both win.

use serde::Serialize;
use serde_json::Value;
use sqlx::{Row, SqlitePool};

use super::state::{can_transition, JobState};

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub state: JobState,
    pub spec: Value,
    pub attempt: i64,
    pub max_attempts: i64,
    pub worker_id: Option<String>,
    pub error: Option<String>,
    pub plan: Option<Value>,
    pub progress: Progress,
    pub latest_metrics: Option<Value>,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
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

fn json_column(row: &sqlx::sqlite::SqliteRow, column: &str) -> Option<Value> {
    row.get::<Option<String>, _>(column).and_then(|text| serde_json::from_str(&text).ok())
}

fn job_from_row(row: &sqlx::sqlite::SqliteRow) -> Job {
    let step: i64 = row.get("step");
    let total_steps: Option<i64> = row.get("total_steps");
    let state: String = row.get("state");
    Job {
        id: row.get("id"),
        kind: row.get("kind"),
        name: row.get("name"),
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        spec: json_column(row, "spec").unwrap_or(Value::Null),
        attempt: row.get("attempt"),
        max_attempts: row.get("max_attempts"),
        worker_id: row.get("worker_id"),
        error: row.get("error"),
        plan: json_column(row, "plan"),
        progress: Progress {
            step,
            total_steps,
            tokens_total: row.get("tokens_total"),
            fraction: total_steps.filter(|t| *t > 0).map(|t| (step as f64 / t as f64).min(1.0)),
        },
        latest_metrics: json_column(row, "latest_metrics"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
    }
}

/// What a new job is made of.
pub struct NewJob<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    pub spec: &'a Value,
    pub plan: Option<&'a Value>,
    pub total_steps: Option<i64>,
    pub max_attempts: i64,
    pub idempotency_key: Option<&'a str>,
}

/// Inserts a queued job, or returns the existing one with the same idempotency key (`created` false).
pub async fn create(pool: &SqlitePool, new: NewJob<'_>) -> sqlx::Result<(Job, bool)> {
    if let Some(key) = new.idempotency_key {
        if let Some(row) =
            sqlx::query("SELECT * FROM jobs WHERE idempotency_key = ?").bind(key).fetch_optional(pool).await?
        {
            return Ok((job_from_row(&row), false));
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, kind, name, spec, state, max_attempts, idempotency_key, plan, total_steps, created_at, updated_at)
         VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(&id)
    .bind(new.kind)
    .bind(new.name)
    .bind(new.spec.to_string())
    .bind(new.max_attempts)
    .bind(new.idempotency_key)
    .bind(new.plan.map(Value::to_string))
    .bind(new.total_steps)
    .bind(now)
    .bind(now)
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 0 {
        // A concurrent request with the same key won the race; return its job.
        let row = sqlx::query("SELECT * FROM jobs WHERE idempotency_key = ?")
            .bind(new.idempotency_key)
            .fetch_one(pool)
            .await?;
        return Ok((job_from_row(&row), false));
    }
    Ok((get(pool, &id).await?.expect("just inserted"), true))
}

pub async fn get(pool: &SqlitePool, id: &str) -> sqlx::Result<Option<Job>> {
    Ok(sqlx::query("SELECT * FROM jobs WHERE id = ?").bind(id).fetch_optional(pool).await?.as_ref().map(job_from_row))
}

/// A page of jobs, newest first (by insertion order), optionally of one state, after `cursor`
/// (the `next` of the previous page).
pub async fn list(
    pool: &SqlitePool,
    state: Option<JobState>,
    cursor: Option<i64>,
    limit: i64,
) -> sqlx::Result<(Vec<Job>, Option<i64>)> {
    let rows = sqlx::query(
        "SELECT rowid, * FROM jobs WHERE (?1 IS NULL OR state = ?1) AND rowid < ?2 ORDER BY rowid DESC LIMIT ?3",
    )
    .bind(state.map(JobState::as_str))
    .bind(cursor.unwrap_or(i64::MAX))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let next = if more { rows.last().map(|r| r.get::<i64, _>("rowid")) } else { None };
    Ok((rows.iter().map(job_from_row).collect(), next))
}

/// Why a transition did not happen.
#[derive(Debug, PartialEq)]
pub enum TransitionError {
    NotFound,
    /// The job is in `actual`, from which the transition is not allowed (or it moved meanwhile).
    Illegal {
        actual: JobState,
    },
}

/// Moves a job from `from` to `to` if it is still in `from`; `also` adds column assignments
/// (`("error", value)`, …) applied in the same statement.
pub async fn transition(
    pool: &SqlitePool,
    id: &str,
    from: JobState,
    to: JobState,
    also: &[(&str, Option<String>)],
) -> Result<Job, TransitionOutcome> {
    if !can_transition(from, to) {
        return Err(TransitionOutcome::Refused(TransitionError::Illegal { actual: from }));
    }
    let now = now_ms();
    let mut sql = String::from("UPDATE jobs SET state = ?, updated_at = ?");
    for (column, _) in also {
        sql.push_str(&format!(", {column} = ?"));
    }
    if to == JobState::Running {
        sql.push_str(", started_at = COALESCE(started_at, ?)");
    }
    if to.is_terminal() {
        sql.push_str(", finished_at = ?");
    }
    sql.push_str(" WHERE id = ? AND state = ?");
    let mut query = sqlx::query(&sql).bind(to.as_str()).bind(now);
    for (_, value) in also {
        query = query.bind(value.clone());
    }
    if to == JobState::Running {
        query = query.bind(now);
    }
    if to.is_terminal() {
        query = query.bind(now);
    }
    let result = query.bind(id).bind(from.as_str()).execute(pool).await.map_err(TransitionOutcome::Database)?;
    let job = get(pool, id).await.map_err(TransitionOutcome::Database)?;
    match (result.rows_affected(), job) {
        (1, Some(job)) => Ok(job),
        (_, None) => Err(TransitionOutcome::Refused(TransitionError::NotFound)),
        (_, Some(job)) => Err(TransitionOutcome::Refused(TransitionError::Illegal { actual: job.state })),
    }
}

/// A transition that did not happen, or a database failure.
#[derive(Debug)]
pub enum TransitionOutcome {
    Refused(TransitionError),
    Database(sqlx::Error),
}
