//! What a job makes once, as a resource of its own: a dataset (`/v1/datasets`, jobs of kind
//! `prepare`) or an extended vocabulary (`/v1/vocabularies`, kind `extend_vocab`). A product's id is
//! its job's id; the worker writes it to `<data-dir>/<collection>/<id>` and reports it with an event
//! carrying its path and its report ([`cpt_protocol::Event::product`]).

pub mod datasets;
pub mod vocabularies;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cpt_protocol::JobKind;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::events::store as events;
use crate::jobs::paths::expand_inputs as expand_inputs_in_roots;
use crate::jobs::routes::{idempotency, page_query};
use crate::jobs::store::{self, Job, NewJob};
use crate::AppState;

/// One kind of product.
#[derive(Clone, Copy)]
pub struct Collection {
    kind: JobKind,
    /// The URL segment, the directory under the data dir, and the list's field.
    name: &'static str,
    /// One of them, in messages.
    singular: &'static str,
    /// The event that reports a finished product.
    event: &'static str,
    /// The view's field holding the product's report.
    report: &'static str,
}

pub const DATASETS: Collection =
    Collection { kind: JobKind::Prepare, name: "datasets", singular: "dataset", event: "prepared", report: "manifest" };
pub const VOCABULARIES: Collection = Collection {
    kind: JobKind::ExtendVocab,
    name: "vocabularies",
    singular: "vocabulary",
    event: "vocabulary_extended",
    report: "report",
};

/// The product routes (behind the API token).
pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for (collection, create) in [(DATASETS, post(datasets::create)), (VOCABULARIES, post(vocabularies::create))] {
        let list = move |State(app): State<AppState>, Query(query): Query<ListQuery>| list(app, query, collection);
        let one = move |State(app): State<AppState>, UrlPath(id): UrlPath<String>| get_one(app, id, collection);
        router = router
            .route(&format!("/v1/{}", collection.name), create.get(list))
            .route(&format!("/v1/{}/{{id}}", collection.name), get(one));
    }
    router
}

/// Queues the job that makes a product from its resolved spec, and answers with the product's view
/// (200 instead of 201 when an `Idempotency-Key` names an earlier identical request).
async fn submit(
    app: &AppState,
    headers: &HeaderMap,
    collection: Collection,
    request: &impl serde::Serialize,
    name: &str,
    spec: &impl serde::Serialize,
) -> Result<Response, ApiError> {
    let idempotency = idempotency(headers, request)?;
    let spec = serde_json::to_value(spec).map_err(ApiError::internal)?;
    let new = NewJob {
        kind: collection.kind,
        name,
        spec: &spec,
        plan: None,
        total_steps: None,
        max_attempts: app.config.max_attempts,
        idempotency: idempotency.as_ref().map(|(key, hash)| (key.as_str(), hash.clone())),
        parent_id: None,
        sweep: None,
    };
    let (job, created) = store::create(&app.pool, new).await?;
    app.queue.notify_waiters();
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(view(app, job, collection).await?)).into_response())
}

/// A product: its job, where it lives, and its report once there is one.
async fn view(app: &AppState, job: Job, collection: Collection) -> Result<Value, ApiError> {
    let made = events::latest_of_kind(&app.pool, &job.id, collection.event).await?.map(|e| e.envelope.event);
    let (path, report) = match made.as_ref().and_then(|event| event.product()) {
        Some((path, report)) => (path.to_string(), Some(report.clone())),
        None => (app.config.data_dir.join(collection.name).join(&job.id).display().to_string(), None),
    };
    let mut view = json!({
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "path": path,
        "error": job.error,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    });
    view[collection.report] = report.into();
    Ok(view)
}

#[derive(Deserialize)]
pub struct ListQuery {
    cursor: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/<collection>`: newest first; `next_cursor` fetches the following page.
async fn list(app: AppState, query: ListQuery, collection: Collection) -> Result<Json<Value>, ApiError> {
    let (cursor, limit) = page_query(query.cursor.as_deref(), query.limit)?;
    let (jobs, next) = store::list(&app.pool, Some(collection.kind), None, cursor, limit).await?;
    let mut products = Vec::with_capacity(jobs.len());
    for job in jobs {
        products.push(view(&app, job, collection).await?);
    }
    let mut page = json!({"next_cursor": next.map(|n| n.to_string())});
    page[collection.name] = products.into();
    Ok(Json(page))
}

/// `GET /v1/<collection>/{id}`.
async fn get_one(app: AppState, id: String, collection: Collection) -> Result<Json<Value>, ApiError> {
    let job = store::get(&app.pool, &id).await?.filter(|j| j.kind == collection.kind);
    let job = job.ok_or_else(|| ApiError::not_found(format!("no {} {id}", collection.singular)))?;
    Ok(Json(view(&app, job, collection).await?))
}

/// Every input (a file, a directory or a pattern) resolved inside the data roots, patterns expanded
/// on a blocking thread (they walk the disk); errors name `field[i]`.
async fn expand_inputs(app: &AppState, field: &'static str, inputs: Vec<String>) -> Result<Vec<String>, ApiError> {
    let config = app.config.clone();
    tokio::task::spawn_blocking(move || expand_inputs_in_roots(&config.data_roots, field, &inputs))
        .await
        .map_err(ApiError::internal)?
}
