//! The one error type of the API: an HTTP status, a stable machine-readable code, a message, and
//! the offending field when there is one. Rendered as `{"error": {"code", "message", "field"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::jobs::store::JobError;

/// An API failure. Client mistakes are 4xx with a stable `code`; only our own faults are 500.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None }
    }

    /// A body that is not valid JSON or has the wrong shape.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A well-formed request whose field value is unacceptable.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message) }
    }

    /// A pattern that would make the server look at too much of its disk, or expand to too much.
    pub fn too_broad(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "pattern_too_broad", message) }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    /// The job is in a state that does not allow the request.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_state", message)
    }

    /// The request body is larger than the server accepts.
    pub fn payload_too_large() -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the request body is too large")
    }

    /// A plain-text rejection from the HTTP stack, in the API's shape.
    pub fn from_rejection(status: StatusCode, message: String) -> Self {
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => return Self::payload_too_large(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_field",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            _ => "bad_request",
        };
        Self::new(status, code, message)
    }

    /// The body must be JSON (`Content-Type: application/json`).
    pub fn unsupported_media_type() -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "send the body as application/json")
    }

    /// The server cannot take writes now (its storage failed a probe or is nearly full).
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// A request a browser made on another site's behalf (the header that shows it is the field).
    pub fn cross_site(header: &str, message: impl Into<String>) -> Self {
        Self { field: Some(header.into()), ..Self::new(StatusCode::FORBIDDEN, "cross_site", message) }
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
    }

    /// Our fault: logged with its cause, reported without internals.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }
}

/// SQLite's primary result codes that are not our bug but the storage's state.
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;
const SQLITE_IOERR: i64 = 10;
const SQLITE_FULL: i64 = 13;

impl From<sqlx::Error> for ApiError {
    /// Storage trouble is a 5xx with a stable code a client can act on (retry later, alert on a full
    /// disk); anything else is our fault.
    fn from(error: sqlx::Error) -> Self {
        let primary_code = match &error {
            sqlx::Error::Database(e) => e.code().and_then(|c| c.parse::<i64>().ok()).map(|c| c & 0xff),
            _ => None,
        };
        let (status, code, message) = match (&error, primary_code) {
            (_, Some(SQLITE_FULL)) => {
                (StatusCode::INSUFFICIENT_STORAGE, "storage_full", "the server's disk is full; nothing was stored")
            }
            (_, Some(SQLITE_IOERR)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_error", "the server could not write its database")
            }
            (_, Some(SQLITE_BUSY | SQLITE_LOCKED)) | (sqlx::Error::PoolTimedOut, _) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_busy", "the database is busy; retry")
            }
            _ => return ApiError::internal(error),
        };
        tracing::error!(%error, code, "storage error");
        Self::new(status, code, message)
    }
}

impl From<JobError> for ApiError {
    fn from(error: JobError) -> Self {
        match error {
            JobError::NotFound(_) => ApiError::not_found(error.to_string()),
            JobError::Illegal { .. } | JobError::NotHolder { .. } => ApiError::conflict(error.to_string()),
            JobError::KeyReused => Self {
                field: Some("Idempotency-Key".into()),
                ..Self::new(StatusCode::CONFLICT, "idempotency_key_reused", error.to_string())
            },
            JobError::Database(error) => error.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message, "field": self.field}});
        (self.status, Json(body)).into_response()
    }
}

/// A JSON body (`Content-Type: application/json` required) parsed into `T`; a shape error names the
/// offending field (`events[3].step`).
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let content_type = request.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        if !content_type.is_some_and(crate::auth::is_json) {
            return Err(ApiError::unsupported_media_type());
        }
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::from_rejection(rejection.status(), rejection.body_text()))?;
        parse_json(&bytes).map(Body)
    }
}

/// Parses `bytes` as `T`, naming the field that does not fit.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ApiError::bad_request(inner.to_string())
            }
            _ if path == "." => ApiError::bad_request(inner.to_string()),
            _ => ApiError::invalid_field(path, inner.to_string()),
        }
    })
}
