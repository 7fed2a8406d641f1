//! `POST /v1/jobs/{id}/continue`: a child job that starts from its parent's newest checkpoint —
//! weights, optimizer state, data position and step-0 perplexities — with the parent's spec
//! amended (more steps or tokens, a new schedule phase and peak, new mixture weights, …).

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use cpt_protocol::spec::limits::NAME_BYTES;
use cpt_protocol::{Event, JobKind};
use serde_json::{json, Map, Value};

use super::routes::{idempotency, parse_spec, submit, CreateQuery};
use super::store;
use crate::error::ApiError;
use crate::events::store as events;
use crate::AppState;

/// The spec fields a continuation may change; the model, adapter, eval sets and the rest stay
/// the parent's, so the lineage's curves stay comparable.
const AMENDABLE: [&str; 14] = [
    "name",
    "max_steps",
    "max_tokens",
    "lr",
    "schedule",
    "warmup_steps",
    "warmup_ratio",
    "min_lr_ratio",
    "decay_ratio",
    "train_data",
    "eval_every",
    "checkpoint_every",
    "sample_every",
    "forgetting_budget",
];

/// Fields that replace each other: amending one drops the parent's value of both.
const EITHER: [[&str; 2]; 2] = [["max_steps", "max_tokens"], ["warmup_steps", "warmup_ratio"]];

/// `POST /v1/jobs/{id}/continue` (see the module's documentation).
pub async fn continue_job(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<CreateQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let amendments: Map<String, Value> = if body.is_empty() { Map::new() } else { crate::error::parse_json(&body)? };
    if let Some(key) = amendments.keys().find(|key| !AMENDABLE.contains(&key.as_str())) {
        let message = format!("cannot be changed by a continuation (these can: {})", AMENDABLE.join(", "));
        return Err(ApiError::invalid_field(key.as_str(), message));
    }
    let parent = store::existing(&app.pool, &id).await?;
    if parent.kind != JobKind::Train {
        return Err(ApiError::conflict(format!(
            "job {id} is a {} job; only training jobs continue",
            parent.kind.as_str()
        )));
    }
    if !parent.state.is_at_rest() {
        let state = parent.state.as_str();
        return Err(ApiError::conflict(format!(
            "cannot continue a job that is {state}; wait for it to end, or pause or cancel it"
        )));
    }
    let checkpoint = events::latest_of_kind(&app.pool, &id, "checkpoint").await?.and_then(|e| match e.envelope.event {
        Event::Checkpoint { path, .. } => Some(path),
        _ => None,
    });
    let checkpoint =
        checkpoint.ok_or_else(|| ApiError::conflict(format!("job {id} has no checkpoint to continue from")))?;

    let mut spec = parent.spec.clone();
    let fields = spec.as_object_mut().ok_or_else(|| ApiError::internal("a stored spec is not an object"))?;
    let parent_datasets: Vec<Value> =
        fields["train_data"].as_array().into_iter().flatten().map(|source| source["dataset"].clone()).collect();
    for pair in EITHER {
        if pair.iter().any(|key| amendments.contains_key(*key)) {
            for key in pair {
                fields.remove(key);
            }
        }
    }
    if !amendments.contains_key("name") {
        let mut name = format!("{} (continued)", parent.name);
        while name.len() as u64 > NAME_BYTES {
            name.pop();
        }
        fields.insert("name".into(), name.into());
    }
    fields.extend(amendments.clone());
    fields.insert("continue_from".into(), json!({"checkpoint": checkpoint, "train_data": parent_datasets}));
    let spec = parse_spec(&spec.to_string())?;
    let idempotency = idempotency(&headers, &json!({"continue": id, "amendments": amendments}))?;
    submit(&app, spec, query.dry_run, idempotency, Some(&id)).await
}
