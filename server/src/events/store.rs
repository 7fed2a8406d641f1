//! Every SQL statement that touches `events`.

use cpt_protocol::worker::Envelope;
use serde_json::{json, Value};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};

/// A stored event: where it belongs, its global id and the event as the worker sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Global, increasing: the cursor and the SSE id.
    pub id: i64,
    pub job_id: String,
    pub attempt: u64,
    pub envelope: Envelope,
}

impl StoredEvent {
    /// The API's shape: `{id, job_id, attempt, seq, kind, time, data}`, `data` being the event.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "seq": self.envelope.seq,
            "kind": self.envelope.event.kind(),
            "time": self.envelope.time,
            "data": self.envelope,
        })
    }
}

pub fn from_row(row: &SqliteRow) -> sqlx::Result<StoredEvent> {
    let data: String = row.try_get("data")?;
    let envelope = serde_json::from_str(&data).map_err(|e| sqlx::Error::Decode(format!("stored event: {e}").into()))?;
    Ok(StoredEvent {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        attempt: row.try_get::<i64, _>("attempt")? as u64,
        envelope,
    })
}

/// Stores the events of one attempt that are not stored yet, in one statement, and returns them.
pub async fn insert(
    conn: &mut SqliteConnection,
    job_id: &str,
    attempt: u64,
    events: &[Envelope],
) -> sqlx::Result<Vec<StoredEvent>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut insert: QueryBuilder<Sqlite> =
        QueryBuilder::new("INSERT INTO events (job_id, attempt, seq, kind, time, data, step) ");
    insert.push_values(events, |mut row, envelope| {
        row.push_bind(job_id)
            .push_bind(attempt as i64)
            .push_bind(envelope.seq as i64)
            .push_bind(envelope.event.kind())
            .push_bind(envelope.time as i64)
            .push_bind(serde_json::to_string(envelope).unwrap_or_default())
            .push_bind(envelope.event.step().map(|step| step as i64));
    });
    insert.push(" ON CONFLICT (job_id, attempt, seq) DO NOTHING RETURNING *");
    let rows = insert.build().fetch_all(conn).await?;
    let mut stored = rows.iter().map(from_row).collect::<sqlx::Result<Vec<_>>>()?;
    stored.sort_by_key(|e| e.id);
    Ok(stored)
}

/// Up to `limit` events of a job after the cursor `after`, optionally of one kind, oldest first.
pub async fn page(
    pool: &SqlitePool,
    job_id: &str,
    after: i64,
    kind: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<StoredEvent>> {
    let rows =
        sqlx::query("SELECT * FROM events WHERE job_id = ? AND id > ? AND (? IS NULL OR kind = ?) ORDER BY id LIMIT ?")
            .bind(job_id)
            .bind(after)
            .bind(kind)
            .bind(kind)
            .bind(limit)
            .fetch_all(pool)
            .await?;
    rows.iter().map(from_row).collect()
}

/// Every event of `kind` of a job, oldest attempt first, each attempt in order.
pub async fn all_of_kind(pool: &SqlitePool, job_id: &str, kind: &str) -> sqlx::Result<Vec<StoredEvent>> {
    let rows = sqlx::query("SELECT * FROM events WHERE job_id = ? AND kind = ? ORDER BY attempt, seq")
        .bind(job_id)
        .bind(kind)
        .fetch_all(pool)
        .await?;
    rows.iter().map(from_row).collect()
}

/// A job's step events at every `stride`-th step from its first, and at its last, where `stride`
/// keeps them to about `points` steps; oldest attempt first, each attempt in order. Read through
/// the step index: a chart of a long run reads only what it draws.
pub async fn steps_sampled(pool: &SqlitePool, job_id: &str, points: i64) -> sqlx::Result<Vec<StoredEvent>> {
    let range: (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT MIN(step), MAX(step) FROM events WHERE job_id = ? AND kind = 'step'")
            .bind(job_id)
            .fetch_one(pool)
            .await?;
    let (Some(first), Some(last)) = range else { return Ok(Vec::new()) };
    let stride = ((last - first) / points.max(1) + 1).max(1);
    let rows = sqlx::query(
        "SELECT * FROM events WHERE job_id = ? AND kind = 'step' AND ((step - ?) % ? = 0 OR step = ?)
         ORDER BY attempt, seq",
    )
    .bind(job_id)
    .bind(first)
    .bind(stride)
    .bind(last)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// The id of a job's newest event (0 when it has none): where a client that has just read the job
/// starts following its stream.
pub async fn latest_id(pool: &SqlitePool, job_id: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM events WHERE job_id = ?").bind(job_id).fetch_one(pool).await
}

/// The newest event of `kind` of a job.
pub async fn latest_of_kind(pool: &SqlitePool, job_id: &str, kind: &str) -> sqlx::Result<Option<StoredEvent>> {
    let row = sqlx::query("SELECT * FROM events WHERE job_id = ? AND kind = ? ORDER BY id DESC LIMIT 1")
        .bind(job_id)
        .bind(kind)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(from_row).transpose()
}
