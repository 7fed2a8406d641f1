//! `POST /v1/datasets`: a preparation run by a worker as a job of kind `prepare`, into
//! `<data-dir>/datasets/<id>`; its report (the manifest) arrives as a `prepared` event.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use cpt_protocol::prepare::PrepareConfig;
use cpt_protocol::prepare::PrepareSpec;
use cpt_protocol::spec::check_name;
use serde_json::json;

use crate::error::ApiError;
use crate::jobs::paths::inside_roots;
use crate::AppState;

/// At most this many inputs (each may be a directory or a pattern).
const MAX_INPUTS: usize = 1000;

/// Paths are resolved and patterns expanded here, inside the data roots; the stored spec names the
/// resolved paths, so every worker reads the same files.
pub async fn create(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let request: PrepareSpec = crate::error::parse_json(&body)?;
    let mut spec = request.clone();
    check_name("name", &spec.name).map_err(|e| ApiError::invalid_field(e.field, e.message))?;
    if spec.inputs.is_empty() || spec.inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid_field("inputs", format!("needs 1 to {MAX_INPUTS} paths")));
    }
    let config = if spec.config.is_null() { json!({}) } else { spec.config.clone() };
    let config: PrepareConfig =
        serde_json::from_value(config).map_err(|e| ApiError::invalid_field("config", e.to_string()))?;
    config.validate().map_err(|e| ApiError::invalid_field(format!("config.{}", e.field), e.message))?;
    spec.tokenizer = inside_roots(&app.config.data_roots, "tokenizer", &spec.tokenizer)?.display().to_string();
    spec.inputs = super::expand_inputs(&app, "inputs", std::mem::take(&mut spec.inputs)).await?;
    super::submit(&app, &headers, super::DATASETS, &request, &spec.name, &spec).await
}
