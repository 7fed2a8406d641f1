//! `GET /v1/jobs/{id}/events/stream`: every event after `Last-Event-ID` (or `?after=`), then new ones
//! as they arrive, ending after the job reaches a final state.
//!
//! The database is the only source of what is sent: the live channel just wakes the stream. SQLite
//! assigns event ids in commit order, so reading everything after the last id sent, page by page
//! until nothing is left, skips nothing however far behind a client is.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};

use super::routes::ListQuery;
use super::store::{self, StoredEvent};
use crate::error::ApiError;
use crate::jobs::store as jobs;
use crate::AppState;

const PAGE: i64 = 500;

fn sse(event: &StoredEvent) -> SseEvent {
    let data = serde_json::to_string(&event.envelope).unwrap_or_default();
    SseEvent::default().id(event.id.to_string()).event(event.envelope.event.kind()).data(data)
}

pub async fn stream(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl futures_core::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    jobs::existing(&app.pool, &id).await?;
    let header = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok());
    let mut last = header.or(query.after).unwrap_or(0);
    // Subscribe before the first read, so nothing stored in between goes unnoticed.
    let mut live = app.events.subscribe();
    let stream = async_stream::stream! {
        loop {
            // Whether the job had ended (or paused) before this drain: then the drain holds its
            // last events.
            let ended = match jobs::get(&app.pool, &id).await {
                Ok(Some(job)) => job.state.is_at_rest(),
                Ok(None) => true,
                Err(error) => { tracing::error!(%error, "reading a job"); break; }
            };
            loop {
                let page = match store::page(&app.pool, &id, last, None, PAGE).await {
                    Ok(page) => page,
                    Err(error) => { tracing::error!(%error, "reading events"); return; }
                };
                let full = page.len() as i64 == PAGE;
                for event in page {
                    last = event.id;
                    yield Ok(sse(&event));
                }
                if !full { break; }
            }
            if ended || *app.closing.borrow() {
                break;
            }
            // Wake for this job's events, for a lag (something was missed: the database has it),
            // or once a second to notice the job's end.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                match tokio::time::timeout_at(deadline, live.recv()).await {
                    Ok(Ok(event)) if event.job_id != id => continue,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return,
                    _ => break,
                }
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
