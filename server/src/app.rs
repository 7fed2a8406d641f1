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
use crate::jobs::routes as jobs;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: SqlitePool,
    pub config: Arc<Config>,
}

/// The OpenAPI description served at `/openapi.yaml`, and checked against the router by tests.
pub const OPENAPI: &str = include_str!("../../openapi.yaml");

async fn require_token(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(token) = app.config.api_token.as_deref().filter(|t| !t.is_empty()) {
        let given =
            request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn readyz(State(app): State<AppState>) -> Result<&'static str, ApiError> {
    sqlx::query("SELECT 1").execute(&app.pool).await?;
    Ok("ready\n")
}

/// Body-limit rejections come from tower-http as plain text; give them the API's error shape.
async fn json_errors(response: Response) -> Response {
    if response.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::payload_too_large().into_response();
    }
    response
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
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/openapi.yaml", get(|| async { ([("content-type", "application/yaml")], OPENAPI) }))
        .fallback(not_found)
        .layer(RequestBodyLimitLayer::new(state.config.max_body_bytes))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}
