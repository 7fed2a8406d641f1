//! The job page: `/` (jobs and sweeps), `/jobs/{id}` (live curves, checkpoints, samples, cancel and
//! resume) and `/sweeps/{id}` (the comparison and its plot). One HTML shell and one script, both
//! compiled in; the script reads everything from the API with the token the user gives it, so the
//! pages themselves hold no data and need no token, and what the page may do is what the API allows.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AppState;

const PAGE: &str = include_str!("../assets/page.html");
const SCRIPT: &str = include_str!("../assets/cpt.js");
const STYLE: &str = include_str!("../assets/cpt.css");

/// Only our own script and style run; nothing is framed (a framed page's buttons could be
/// clicked by another site); the API is the only thing it talks to.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                      base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("content-security-policy", HeaderValue::from_static(POLICY));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// The page routes (no token: they carry no data).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/jobs/{id}", get(page))
        .route("/sweeps/{id}", get(page))
        .route("/assets/cpt.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/assets/cpt.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
}
