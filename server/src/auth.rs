//! Who may call what: bearer tokens for the user API and the worker protocol, and JSON-only bodies
//! (a browser page can POST `text/plain` to a loopback server from anywhere, but not JSON without
//! the server's consent).

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

/// Whether `request` carries `token` as a bearer token (any required token; none configured lets
/// everyone in). The scheme is case-insensitive (RFC 9110); the comparison takes the same time
/// whatever the given token shares with the real one.
fn authorized(request: &Request, token: Option<&str>) -> bool {
    let Some(token) = token.filter(|t| !t.is_empty()) else { return true };
    let given = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let Some((scheme, credentials)) = given.split_once(' ') else { return false };
    scheme.eq_ignore_ascii_case("bearer") && bool::from(credentials.trim().as_bytes().ct_eq(token.as_bytes()))
}

/// `/v1/jobs`, `/v1/datasets`, `/v1/vocabularies`, `/v1/sweeps` and `/metrics`: the API token.
pub async fn require_api_token(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if !authorized(&request, app.config.api_token.as_deref()) {
        return ApiError::unauthorized().into_response();
    }
    next.run(request).await
}

/// `/v1/workers`: the worker token.
pub async fn require_worker_token(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if !authorized(&request, app.config.worker_token.as_deref()) {
        return ApiError::unauthorized().into_response();
    }
    next.run(request).await
}

/// A POST body must be JSON. Browsers send every cross-site request they make without asking
/// (a "simple" request) with a Content-Type of `text/plain`, a form or multipart, so refusing any
/// type but JSON refuses them all; a body without a type (scripts) is read as JSON.
pub async fn require_json(request: Request, next: Next) -> Response {
    let content_type = request.headers().get(CONTENT_TYPE).map(|v| v.to_str().unwrap_or("invalid"));
    if request.method() == Method::POST && content_type.is_some_and(|v| !is_json(v)) {
        return ApiError::unsupported_media_type().into_response();
    }
    next.run(request).await
}

/// Whether a Content-Type value names JSON (`application/json`, parameters and case aside).
pub fn is_json(content_type: &str) -> bool {
    content_type.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json")
}
