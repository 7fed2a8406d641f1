//! Job events: ingested from workers in batches (idempotent on job, attempt and sequence number),
//! listed with a cursor, and streamed live over SSE with `Last-Event-ID` resumption.

use std::convert::Infallible;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;
use tokio::sync::broadcast;

use crate::app::AppState;
use crate::error::ApiError;
use crate::jobs::routes::existing;
use crate::jobs::store;

/// A stored event, as listed and streamed.
#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    /// Global, increasing: the cursor and the SSE id.
    pub id: i64,
    pub job_id: String,
    pub attempt: i64,
    pub seq: i64,
    pub kind: String,
    pub time: i64,
    pub data: Value,
}

fn from_row(row: &sqlx::sqlite::SqliteRow) -> StoredEvent {
    let data: String = row.get("data");
    StoredEvent {
        id: row.get("id"),
        job_id: row.get("job_id"),
        attempt: row.get("attempt"),
        seq: row.get("seq"),
        kind: row.get("kind"),
        time: row.get("time"),
        data: serde_json::from_str(&data).unwrap_or(Value::Null),
    }
}

#[derive(Deserialize)]
pub struct Batch {
    job_id: String,
    attempt: i64,
    events: Vec<Value>,
}

/// `POST /v1/workers/{id}/events`: stores a batch; re-sent events are counted as duplicates, not
/// stored twice. Step events update the job's progress and latest metrics.
pub async fn ingest(
    State(app): State<AppState>,
    UrlPath(worker): UrlPath<String>,
    Json(batch): Json<Batch>,
) -> Result<Json<Value>, ApiError> {
    let job = existing(&app, &batch.job_id).await?;
    if job.worker_id.as_deref() != Some(worker.as_str()) || job.attempt != batch.attempt {
        return Err(ApiError::conflict(format!(
            "job {} attempt {} is not leased by worker {worker}",
            job.id, batch.attempt
        )));
    }
    let mut parsed = Vec::with_capacity(batch.events.len());
    for (i, event) in batch.events.iter().enumerate() {
        let seq = event.get("seq").and_then(Value::as_i64).filter(|s| *s >= 0);
        let kind = event.get("kind").and_then(Value::as_str).filter(|k| !k.is_empty() && k.len() <= 32);
        let (Some(seq), Some(kind)) = (seq, kind) else {
            return Err(ApiError::invalid_field(format!("events[{i}]"), "each event needs `seq` (≥ 0) and `kind`"));
        };
        let time = event.get("time").and_then(Value::as_i64).unwrap_or_else(store::now_ms);
        parsed.push((seq, kind.to_string(), time, event));
    }
    let mut transaction = app.pool.begin().await?;
    let mut stored = Vec::new();
    for (seq, kind, time, event) in &parsed {
        let row = sqlx::query(
            "INSERT INTO events (job_id, attempt, seq, kind, time, data) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (job_id, attempt, seq) DO NOTHING RETURNING *",
        )
        .bind(&job.id)
        .bind(batch.attempt)
        .bind(seq)
        .bind(kind)
        .bind(time)
        .bind(event.to_string())
        .fetch_optional(&mut *transaction)
        .await?;
        if let Some(row) = row {
            stored.push(from_row(&row));
        }
    }
    if let Some(step) = stored.iter().rev().find(|e| e.kind == "step") {
        sqlx::query("UPDATE jobs SET step = MAX(step, ?), tokens_total = MAX(tokens_total, ?), latest_metrics = ?, updated_at = ? WHERE id = ?")
            .bind(step.data.get("step").and_then(Value::as_i64).unwrap_or(0))
            .bind(step.data.get("tokens_total").and_then(Value::as_i64).unwrap_or(0))
            .bind(step.data.to_string())
            .bind(store::now_ms())
            .bind(&job.id)
            .execute(&mut *transaction)
            .await?;
    }
    transaction.commit().await?;
    let duplicates = parsed.len() - stored.len();
    let count = stored.len();
    for event in stored {
        app.metrics.observe(&event, &job.name);
        // No subscriber is fine: the events are in the database for whoever asks later.
        let _ = app.events.send(event);
    }
    Ok(Json(json!({"stored": count, "duplicates": duplicates})))
}

#[derive(Deserialize)]
pub struct ListQuery {
    after: Option<i64>,
    kind: Option<String>,
    limit: Option<i64>,
}

async fn page(app: &AppState, job: &str, after: i64, kind: Option<&str>, limit: i64) -> sqlx::Result<Vec<StoredEvent>> {
    let rows =
        sqlx::query("SELECT * FROM events WHERE job_id = ? AND id > ? AND (? IS NULL OR kind = ?) ORDER BY id LIMIT ?")
            .bind(job)
            .bind(after)
            .bind(kind)
            .bind(kind)
            .bind(limit)
            .fetch_all(&app.pool)
            .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// `GET /v1/jobs/{id}/events`: oldest first after the cursor `after`, optionally of one kind.
pub async fn list(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    existing(&app, &id).await?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid_field("limit", "must be between 1 and 1000"));
    }
    let events = page(&app, &id, query.after.unwrap_or(0), query.kind.as_deref(), limit).await?;
    let next = (events.len() as i64 == limit).then(|| events.last().map(|e| e.id)).flatten();
    Ok(Json(json!({"events": events, "next_cursor": next})))
}

fn sse(event: &StoredEvent) -> SseEvent {
    SseEvent::default().id(event.id.to_string()).event(event.kind.clone()).data(event.data.to_string())
}

/// `GET /v1/jobs/{id}/events/stream`: every event after `Last-Event-ID` (or `?after=`), then new
/// ones as they arrive; the stream ends after the job reaches a final state.
pub async fn stream(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl futures_core::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    existing(&app, &id).await?;
    let header = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok());
    let mut last = header.or(query.after).unwrap_or(0);
    // Subscribe before replaying, so nothing stored in between is missed; ids dedupe the overlap.
    let mut live = app.events.subscribe();
    let stream = async_stream::stream! {
        loop {
            let backlog = match page(&app, &id, last, None, 500).await {
                Ok(events) => events,
                Err(error) => { tracing::error!(%error, "reading events"); break; }
            };
            let caught_up = backlog.len() < 500;
            for event in backlog {
                last = event.id;
                yield Ok(sse(&event));
            }
            if caught_up { break; }
        }
        loop {
            if *app.closing.borrow() {
                break;
            }
            match store::get(&app.pool, &id).await {
                Ok(Some(job)) if job.state.is_terminal() => {
                    // Drain what arrived before the final state, then end.
                    if let Ok(events) = page(&app, &id, last, None, 1000).await {
                        for event in events { yield Ok(sse(&event)); }
                    }
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
            match tokio::time::timeout(std::time::Duration::from_secs(1), live.recv()).await {
                Ok(Ok(event)) if event.job_id == id && event.id > last => { last = event.id; yield Ok(sse(&event)); }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    // Too slow for the live channel: fall back to the database.
                    if let Ok(events) = page(&app, &id, last, None, 1000).await {
                        for event in events { last = event.id; yield Ok(sse(&event)); }
                    }
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => break,
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
