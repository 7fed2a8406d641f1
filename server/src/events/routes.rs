//! `/v1/workers/{id}/events` (ingest) and `/v1/jobs/{id}/events[/stream]`, `/metrics`,
//! `/checkpoints` (read).

use axum::extract::{Path as UrlPath, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use cpt_protocol::worker::{BatchReply, EventBatch, MAX_BATCH_EVENTS};
use cpt_protocol::Event;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{charts, series, store, stream};
use crate::db::WriteTx;
use crate::error::{ApiError, Body};
use crate::jobs::store::{self as jobs, Sender};
use crate::AppState;

/// The read routes (behind the API token).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs/{id}/events", get(list))
        .route("/v1/jobs/{id}/events/stream", get(stream::stream))
        .route("/v1/jobs/{id}/metrics", get(series::metrics))
        .route("/v1/jobs/{id}/plot.svg", get(charts::plot))
        .route("/v1/jobs/{id}/checkpoints", get(series::checkpoints))
}

/// The ingest route (behind the worker token).
pub fn worker_routes() -> Router<AppState> {
    Router::new().route("/v1/workers/{id}/events", post(ingest))
}

/// Refuses events a worker cannot have produced for a job of `total_steps` steps.
fn check_steps(batch: &EventBatch, total_steps: Option<i64>) -> Result<(), ApiError> {
    let Some(total) = total_steps else { return Ok(()) };
    for (i, envelope) in batch.events.iter().enumerate() {
        if envelope.event.step().is_some_and(|step| step > total as u64) {
            return Err(ApiError::invalid_field(format!("events[{i}].step"), "beyond the job's total steps"));
        }
    }
    Ok(())
}

/// `POST /v1/workers/{id}/events`: stores a batch; re-sent events are counted as duplicates, not
/// stored twice. The running attempt's step events update the job's progress; events of an attempt
/// that lost its lease are stored as history.
pub async fn ingest(
    State(app): State<AppState>,
    UrlPath(worker): UrlPath<String>,
    Body(batch): Body<EventBatch>,
) -> Result<Json<BatchReply>, ApiError> {
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::invalid_field("events", format!("at most {MAX_BATCH_EVENTS} events per batch")));
    }
    let job = jobs::existing(&app.pool, &batch.job_id).await?;
    // The chain a continued job belongs to labels its series.
    let root = job.root_id.clone();
    let mut tx = WriteTx::begin(&app.pool).await?;
    let sender = jobs::event_sender(tx.conn(), &job.id, batch.attempt, &worker).await?;
    let current = matches!(sender, Sender::Current { .. });
    if let Sender::Current { total_steps } = sender {
        check_steps(&batch, total_steps)?;
    }
    let stored = store::insert(tx.conn(), &job.id, batch.attempt, &batch.events).await?;
    let last_step = stored.iter().rev().find_map(|e| match &e.envelope.event {
        Event::Step(metrics) => Some(metrics),
        _ => None,
    });
    if let (true, Some(metrics)) = (current, last_step) {
        let latest = serde_json::to_value(metrics).map_err(ApiError::internal)?;
        jobs::record_progress(tx.conn(), &job.id, metrics.step, metrics.tokens_total, &latest).await?;
    }
    let evals: Vec<(&str, Value)> = stored
        .iter()
        .filter_map(|e| match &e.envelope.event {
            Event::Eval { step, set, perplexity, bits_per_byte, perplexity_change, .. } if current => Some((
                set.as_str(),
                json!({"step": step, "perplexity": perplexity, "bits_per_byte": bits_per_byte,
                       "perplexity_change": perplexity_change}),
            )),
            _ => None,
        })
        .collect();
    jobs::record_evals(tx.conn(), &job.id, &evals).await?;
    tx.commit().await?;
    let reply = BatchReply { stored: stored.len() as u64, duplicates: (batch.events.len() - stored.len()) as u64 };
    for event in stored {
        if current {
            app.metrics.observe(&event, &job.name, &root);
        }
        // No subscriber is fine: the events are in the database for whoever asks later.
        let _ = app.events.send(event);
    }
    Ok(Json(reply))
}

#[derive(Deserialize)]
pub struct ListQuery {
    pub after: Option<i64>,
    kind: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/jobs/{id}/events`: oldest first after the cursor `after`, optionally of one kind.
pub async fn list(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    jobs::existing(&app.pool, &id).await?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid_field("limit", "must be between 1 and 1000"));
    }
    let events = store::page(&app.pool, &id, query.after.unwrap_or(0), query.kind.as_deref(), limit).await?;
    let next = (events.len() as i64 == limit).then(|| events.last().map(|e| e.id)).flatten();
    let events: Vec<Value> = events.iter().map(store::StoredEvent::to_json).collect();
    Ok(Json(json!({"events": events, "next_cursor": next})))
}
