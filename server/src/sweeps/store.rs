//! Every SQL statement that touches `sweeps`. A sweep's jobs are rows of `jobs` that name it
//! (inserted here with it, read by [`jobs::of_sweep`]).

use serde::Serialize;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};

use crate::db::WriteTx;
use crate::events::store::{self as events, StoredEvent};
use crate::jobs::store::{self as jobs, JobError, NewJob};
use crate::now_ms;

/// A sweep as stored: the request it was made from.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub id: String,
    pub name: String,
    /// The `POST /v1/sweeps` body: `{name, base, grid}`.
    pub request: Value,
    pub created_at: i64,
}

fn from_row(row: &SqliteRow) -> sqlx::Result<Sweep> {
    let request: String = row.try_get("request")?;
    Ok(Sweep {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        request: serde_json::from_str(&request)
            .map_err(|e| sqlx::Error::Decode(format!("sweeps.request: {e}").into()))?,
        created_at: row.try_get("created_at")?,
    })
}

/// What a new sweep is made of; `jobs` already name the sweep's `id`.
pub struct NewSweep<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub request: &'a Value,
    /// The client's Idempotency-Key and a hash of the request it came with.
    pub idempotency: Option<(&'a str, String)>,
    pub jobs: Vec<NewJob<'a>>,
}

/// Inserts the sweep and all its jobs at once (a sweep is never half queued), or returns the sweep
/// an earlier identical request with the same Idempotency-Key made (`created` false).
pub async fn create(pool: &SqlitePool, new: NewSweep<'_>) -> Result<(Sweep, bool), JobError> {
    let mut tx = WriteTx::begin(pool).await?;
    if let Some(row) = jobs::earlier_request(tx.conn(), "sweeps", new.idempotency.as_ref()).await? {
        return Ok((from_row(&row)?, false));
    }
    let (key, hash) = new.idempotency.map_or((None, None), |(k, h)| (Some(k), Some(h)));
    let row = sqlx::query(
        "INSERT INTO sweeps (id, name, request, idempotency_key, request_hash, created_at)
         VALUES (?, ?, ?, ?, ?, ?) RETURNING *",
    )
    .bind(new.id)
    .bind(new.name)
    .bind(new.request.to_string())
    .bind(key)
    .bind(hash)
    .bind(now_ms())
    .fetch_one(tx.conn())
    .await?;
    let sweep = from_row(&row)?;
    for job in new.jobs {
        jobs::insert(tx.conn(), job).await?;
    }
    tx.commit().await?;
    Ok((sweep, true))
}

pub async fn get(pool: &SqlitePool, id: &str) -> sqlx::Result<Option<Sweep>> {
    let row = sqlx::query("SELECT * FROM sweeps WHERE id = ?").bind(id).fetch_optional(pool).await?;
    row.as_ref().map(from_row).transpose()
}

/// A page of sweeps, newest first, after `cursor` (the `next` of the previous page).
pub async fn list(pool: &SqlitePool, cursor: Option<i64>, limit: i64) -> sqlx::Result<(Vec<Sweep>, Option<i64>)> {
    let rows = sqlx::query("SELECT rowid, * FROM sweeps WHERE rowid < ? ORDER BY rowid DESC LIMIT ?")
        .bind(cursor.unwrap_or(i64::MAX))
        .bind(limit + 1)
        .fetch_all(pool)
        .await?;
    crate::db::page(&rows, limit, from_row)
}

/// Every eval event of the sweep's jobs, each job's oldest attempt first, each attempt in order.
pub async fn evals_of(pool: &SqlitePool, sweep_id: &str) -> sqlx::Result<Vec<StoredEvent>> {
    let rows = sqlx::query(
        "SELECT events.* FROM events JOIN jobs ON events.job_id = jobs.id
         WHERE jobs.sweep_id = ? AND events.kind = 'eval' ORDER BY events.job_id, events.attempt, events.seq",
    )
    .bind(sweep_id)
    .fetch_all(pool)
    .await?;
    rows.iter().map(events::from_row).collect()
}
