//! Who may call what: bearer tokens for the user API and the worker protocol, and what a browser
//! page elsewhere may not do to a server it can reach (cross-site writes, untyped bodies, rebound
//! host names).

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::{AppState, Config};

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

/// What a browser may not do to a server it can reach (every check answers 403 `cross_site` or
/// 415, before any handler runs):
/// - a POST with a body must say `application/json`: browsers send every cross-site request they
///   make without asking (a "simple" request, `no-cors` included) as `text/plain`, a form,
///   multipart, or with no type at all (a Blob), never as JSON;
/// - a request that changes anything must come from the page's own origin: `Sec-Fetch-Site` other
///   than `same-origin` or `none` (typed by hand, curl), or an `Origin` naming another host, is
///   refused (this also covers bodiless POSTs such as `/cancel`);
/// - without tokens, the `Host` must be a loopback name or one given with `--allowed-hosts`, so a
///   page whose domain was rebound to 127.0.0.1 cannot read or drive the server.
pub async fn guard_browsers(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if let Err(error) = check_request(&app.config, &request) {
        return error.into_response();
    }
    next.run(request).await
}

fn check_request(config: &Config, request: &Request) -> Result<(), ApiError> {
    let headers = request.headers();
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let host = header("host");
    if config.api_token.as_deref().is_none_or(str::is_empty) && !host.is_none_or(|h| host_allowed(config, h)) {
        return Err(ApiError::cross_site("Host", "this server answers only to loopback names and --allowed-hosts"));
    }
    if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    if header("sec-fetch-site").is_some_and(|site| !matches!(site, "same-origin" | "none")) {
        return Err(ApiError::cross_site("Sec-Fetch-Site", "requests from other sites are refused"));
    }
    if let Some(origin) = header("origin") {
        let origin_host = origin.split_once("://").map(|(_, rest)| rest.trim_end_matches('/'));
        if origin_host.is_none() || origin_host != host {
            return Err(ApiError::cross_site("Origin", "requests from other origins are refused"));
        }
    }
    let has_body = headers.contains_key("transfer-encoding")
        || header("content-length").is_some_and(|length| length.trim() != "0");
    let content_type = header("content-type");
    if *request.method() == Method::POST && (content_type.is_some() || has_body) && !content_type.is_some_and(is_json) {
        return Err(ApiError::unsupported_media_type());
    }
    Ok(())
}

/// Whether a `Host` header names this server: a loopback name or address, or a configured name.
fn host_allowed(config: &Config, host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let loopback =
        name == "localhost" || name.ends_with(".localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    loopback || config.allowed_hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(&name))
}

/// Whether a Content-Type value names JSON (`application/json`, parameters and case aside).
pub fn is_json(content_type: &str) -> bool {
    content_type.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use clap::Parser;

    fn config(token: Option<&str>) -> Config {
        let mut config = Config::parse_from(["cpt-server", "--allowed-hosts", "cpt.internal"]);
        config.api_token = token.map(str::to_string);
        config
    }

    fn request(method: Method, headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::builder().method(method).uri("/v1/jobs");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Body::empty()).unwrap()
    }

    fn refused_by(config: &Config, method: Method, headers: &[(&str, &str)]) -> Option<String> {
        check_request(config, &request(method, headers)).err().map(|e| e.field.unwrap_or_else(|| e.code.into()))
    }

    #[test]
    fn cross_site_writes_untyped_bodies_and_foreign_hosts_are_refused() {
        let open = config(None);
        let local = ("host", "127.0.0.1:8080");
        let post = Method::POST;
        assert_eq!(refused_by(&open, post.clone(), &[local, ("content-type", "application/json")]), None);
        assert_eq!(refused_by(&open, post.clone(), &[local]), None, "curl -X POST …/cancel");
        assert_eq!(
            refused_by(&open, post.clone(), &[local, ("content-length", "12")]).as_deref(),
            Some("unsupported_media_type")
        );
        assert_eq!(
            refused_by(&open, post.clone(), &[local, ("content-type", "text/plain")]).as_deref(),
            Some("unsupported_media_type")
        );
        let cross = ("sec-fetch-site", "cross-site");
        assert_eq!(refused_by(&open, post.clone(), &[local, cross]).as_deref(), Some("Sec-Fetch-Site"));
        assert_eq!(
            refused_by(&open, post.clone(), &[local, ("sec-fetch-site", "same-site")]).as_deref(),
            Some("Sec-Fetch-Site")
        );
        assert_eq!(refused_by(&open, post.clone(), &[local, ("sec-fetch-site", "same-origin")]), None);
        assert_eq!(refused_by(&open, Method::GET, &[local, cross]), None, "a link followed from elsewhere");
        let evil = ("origin", "http://evil.example");
        assert_eq!(refused_by(&open, post.clone(), &[local, evil]).as_deref(), Some("Origin"));
        assert_eq!(refused_by(&open, post.clone(), &[local, ("origin", "null")]).as_deref(), Some("Origin"));
        assert_eq!(refused_by(&open, post.clone(), &[local, ("origin", "http://127.0.0.1:8080")]), None);
        for host in ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "10.0.0.1:8080"] {
            assert_eq!(refused_by(&open, Method::GET, &[("host", host)]).as_deref(), Some("Host"), "{host}");
        }
        for host in ["localhost:8080", "LOCALHOST", "[::1]:8080", "127.0.0.2", "cpt.internal:8080", "app.localhost"] {
            assert_eq!(refused_by(&open, Method::GET, &[("host", host)]), None, "{host}");
        }
        let guarded = config(Some("secret"));
        assert_eq!(refused_by(&guarded, Method::GET, &[("host", "cpt.example.com")]), None, "tokens guard it");
        assert_eq!(
            refused_by(&guarded, post, &[("host", "cpt.example.com"), cross]).as_deref(),
            Some("Sec-Fetch-Site")
        );
    }
}
