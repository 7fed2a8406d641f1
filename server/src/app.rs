//! The router: routes, shared state, authentication and limits.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sqlx::SqlitePool;
use tower_http::limit::RequestBodyLimitLayer;

use crate::config::Config;
use crate::error::ApiError;
use crate::events::{self, StoredEvent};
use crate::jobs::routes as jobs;
use crate::workers;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: SqlitePool,
    pub config: Arc<Config>,
    /// Woken whenever a job becomes queued, for long-polling leases.
    pub queue: Arc<tokio::sync::Notify>,
    /// Every newly stored event, for SSE subscribers.
    pub events: tokio::sync::broadcast::Sender<StoredEvent>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Turns true when the server is about to stop: SSE streams end and long-polls return, so
    /// the graceful shutdown is not held open by clients that would otherwise wait for a job.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

/// The OpenAPI description served at `/openapi.yaml`, and checked against the router by tests.
pub const OPENAPI: &str = include_str!("../../openapi.yaml");

fn authorized(request: &Request, token: Option<&str>) -> bool {
    match token.filter(|t| !t.is_empty()) {
        None => true,
        Some(token) => {
            let given = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
            given.and_then(|v| v.strip_prefix("Bearer ")) == Some(token)
        }
    }
}

async fn require_api_token(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if !authorized(&request, app.config.api_token.as_deref()) {
        return ApiError::unauthorized().into_response();
    }
    next.run(request).await
}

async fn require_worker_token(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if !authorized(&request, app.config.worker_token.as_deref()) {
        return ApiError::unauthorized().into_response();
    }
    next.run(request).await
}

async fn readyz(State(app): State<AppState>) -> Result<&'static str, ApiError> {
    sqlx::query("SELECT 1").execute(&app.pool).await?;
    Ok("ready\n")
}

/// Rejections from axum's extractors and tower-http's body limit are plain text; give every client
/// error the API's JSON shape, keeping the status and the message.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let message = match axum::body::to_bytes(response.into_body(), 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    ApiError::from_rejection(status, message).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/resume", post(jobs::resume))
        .route("/v1/jobs/{id}/events", get(events::list))
        .route("/v1/jobs/{id}/events/stream", get(events::stream))
        .route("/v1/jobs/{id}/metrics", get(crate::series::metrics))
        .route("/v1/jobs/{id}/checkpoints", get(crate::series::checkpoints))
        .route("/v1/datasets", post(crate::datasets::create).get(crate::datasets::list))
        .route("/v1/datasets/{id}", get(crate::datasets::get))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_token));
    let worker = Router::new()
        .route("/v1/workers", post(workers::register))
        .route("/v1/workers/{id}/lease", post(workers::lease))
        .route("/v1/workers/{id}/heartbeat", post(workers::heartbeat))
        .route("/v1/workers/{id}/events", post(events::ingest))
        .route("/v1/workers/{id}/finish", post(workers::finish))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_worker_token));
    Router::new()
        .merge(api)
        .merge(worker)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::scrape))
        .route("/openapi.yaml", get(|| async { ([("content-type", "application/yaml")], OPENAPI) }))
        .fallback(not_found)
        .layer(RequestBodyLimitLayer::new(state.config.max_body_bytes))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), crate::metrics::track_http))
        .with_state(state)
}
