//! The router: every route, with authentication, limits and the API's error shape.

use axum::extract::State;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::auth::{guard_browsers, require_api_token, require_worker_token};
use crate::error::ApiError;
use crate::AppState;

/// The OpenAPI description served at `/openapi.yaml`, and checked against the router by tests.
pub const OPENAPI: &str = include_str!("../../openapi.yaml");

/// Below this many free bytes on the data directory's file system the server says it is not ready:
/// writes would soon fail, and a full disk must be noticed before it loses anything.
const MIN_FREE_BYTES: u64 = 16 << 20;

/// Ready when the database takes a write now and its disk has room for more.
async fn readyz(State(app): State<AppState>) -> Result<&'static str, ApiError> {
    let free = crate::db::free_bytes(&app.config.data_dir).map_err(ApiError::internal)?;
    if free < MIN_FREE_BYTES {
        return Err(ApiError::unavailable("storage_low", format!("{free} bytes free on the data directory's disk")));
    }
    crate::db::probe_write(&app.pool).await?;
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
        .merge(crate::jobs::routes::routes())
        .merge(crate::events::routes::routes())
        .merge(crate::products::routes())
        .merge(crate::sweeps::routes())
        .route("/metrics", get(crate::metrics::scrape))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_token));
    let worker = crate::workers::routes()
        .merge(crate::events::routes::worker_routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_worker_token));
    Router::new()
        .merge(api)
        .merge(worker)
        .merge(crate::pages::routes())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/openapi.yaml", get(|| async { ([("content-type", "application/yaml")], OPENAPI) }))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard_browsers))
        .layer(RequestBodyLimitLayer::new(state.config.max_body_bytes))
        .layer(RequestBodyTimeoutLayer::new(std::time::Duration::from_secs(state.config.body_timeout_seconds)))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), crate::metrics::track_http))
        .with_state(state)
}
