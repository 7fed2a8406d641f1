//! `POST /v1/vocabularies`: a vocabulary extension run by a worker as a job of kind
//! `extend_vocab`, into `<data-dir>/vocabularies/<id>` (a model directory a training job can name
//! as its `base_model`); its report (added tokens, fertility) arrives as a `vocabulary_extended` event.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use cpt_protocol::vocabulary::VocabularySpec;

use crate::error::ApiError;
use crate::jobs::paths::inside_roots;
use crate::AppState;

/// Paths are resolved inside the data roots and patterns expanded here, as for datasets; the base
/// model must be a model directory with a tokenizer.
pub async fn create(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let request: VocabularySpec = crate::error::parse_json(&body)?;
    request.validate().map_err(|e| ApiError::invalid_field(e.field, e.message))?;
    let mut spec = request.clone();
    let roots = &app.config.data_roots;
    let base = inside_roots(roots, "base_model", &spec.base_model)?;
    for file in ["config.json", "tokenizer.json"] {
        if !base.join(file).is_file() {
            let message = format!("{} is not a model directory (no {file})", spec.base_model);
            return Err(ApiError::invalid_field("base_model", message));
        }
    }
    spec.base_model = base.display().to_string();
    spec.corpus = super::expand_inputs(&app, "corpus", std::mem::take(&mut spec.corpus)).await?;
    for (i, text) in spec.report_texts.iter_mut().enumerate() {
        let field = format!("report_texts[{i}]");
        let path = inside_roots(roots, &field, text)?;
        if !path.is_file() {
            return Err(ApiError::invalid_field(field, format!("{text} is not a file")));
        }
        *text = path.display().to_string();
    }
    super::submit(&app, &headers, super::VOCABULARIES, &request, &spec.name, &spec).await
}
