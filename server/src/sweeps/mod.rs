//! `/v1/sweeps`: a base spec and a grid make one training job per point (queued together, run as
//! workers free up); the sweep compares them — a table of learning and forgetting per job, and a
//! plot of one against the other — and cancels or resumes them as one.

pub mod plot;
pub mod report;
pub mod store;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cpt_protocol::sweep::SweepRequest;
use cpt_protocol::JobState;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::events::series::eval_courses;
use crate::jobs::routes::{idempotency, page_query, parse_spec, plan_job, CreateQuery, TrainJob};
use crate::jobs::store::{self as jobs, Job, JobError};
use crate::{now_ms, AppState};
use store::{NewSweep, Sweep};

/// The sweep routes (behind the API token).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/sweeps", post(create).get(list))
        .route("/v1/sweeps/{id}", get(get_sweep))
        .route("/v1/sweeps/{id}/plot.svg", get(plot_svg))
        .route("/v1/sweeps/{id}/cancel", post(cancel))
        .route("/v1/sweeps/{id}/resume", post(resume))
}

/// A job spec's error, said of the sweep: a field the grid varies is `grid.<path>` (with the value
/// that failed), any other `base.<field>`.
fn in_sweep(mut error: ApiError, request: &SweepRequest, point: &serde_json::Map<String, Value>) -> ApiError {
    if let Some(field) = error.field.take() {
        // Spec errors index lists as `train_data[1]`; grid paths as `train_data.1`.
        let dotted = field.replace('[', ".").replace(']', "");
        let varied = request.grid.keys().find(|path| dotted == **path || dotted.starts_with(&format!("{path}.")));
        error.field = Some(match varied {
            Some(path) => {
                error.message = format!("with {path} = {}: {}", point[path.as_str()], error.message);
                format!("grid.{path}")
            }
            None => format!("base.{field}"),
        });
    }
    error
}

/// `POST /v1/sweeps`: every job is checked and planned as `POST /v1/jobs` would; all are queued in
/// one transaction, or none. `?dry_run=true` answers with each job's plan instead.
async fn create(
    State(app): State<AppState>,
    Query(query): Query<CreateQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SweepRequest = crate::error::parse_json(&body)?;
    let points = request.expand().map_err(|e| ApiError::invalid_field(e.field, e.message))?;
    let mut planned = Vec::with_capacity(points.len());
    for point in &points {
        let spec = parse_spec(&point.spec.to_string()).map_err(|e| in_sweep(e, &request, &point.values))?;
        let (spec, plan) = plan_job(&app, spec).await.map_err(|e| in_sweep(e, &request, &point.values))?;
        planned.push((point, spec, plan));
    }
    if query.dry_run {
        let jobs: Vec<Value> = planned
            .iter()
            .map(|(point, _, plan)| json!({"name": point.name, "point": point.values, "plan": plan}))
            .collect();
        return Ok(Json(json!({"jobs": jobs})).into_response());
    }
    let rows = planned.iter().map(|(_, spec, plan)| TrainJob::new(spec, plan)).collect::<Result<Vec<_>, _>>()?;
    let points_json: Vec<Value> = points.iter().map(|p| Value::Object(p.values.clone())).collect();
    let id = uuid::Uuid::new_v4().to_string();
    let request_json = serde_json::to_value(&request).map_err(ApiError::internal)?;
    let idempotency = idempotency(&headers, &request_json)?;
    let new = NewSweep {
        id: &id,
        name: &request.name,
        request: &request_json,
        idempotency: idempotency.as_ref().map(|(key, hash)| (key.as_str(), hash.clone())),
        jobs: rows
            .iter()
            .zip(&points)
            .zip(&points_json)
            .map(|((row, point), values)| jobs::NewJob { sweep: Some((&id, values)), ..row.row(&app, &point.name) })
            .collect(),
    };
    let (sweep, created) = store::create(&app.pool, new).await?;
    app.queue.notify_waiters();
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(view(&app, sweep).await?)).into_response())
}

async fn existing(app: &AppState, id: &str) -> Result<Sweep, ApiError> {
    store::get(&app.pool, id).await?.ok_or_else(|| ApiError::not_found(format!("no sweep {id}")))
}

/// Counts of the jobs per state, every state present.
fn counts(jobs: &[Job]) -> Value {
    let count = |state: JobState| Value::from(jobs.iter().filter(|j| j.state == state).count());
    JobState::ALL.into_iter().map(|s| (s.as_str().to_string(), count(s))).collect()
}

/// A sweep with its state, its jobs' counts and the comparison table.
async fn view(app: &AppState, sweep: Sweep) -> Result<Value, ApiError> {
    let jobs = jobs::of_sweep(&app.pool, &sweep.id).await?;
    let courses = eval_courses(&store::evals_of(&app.pool, &sweep.id).await?);
    let now = now_ms();
    let lines: Vec<report::Line> = jobs.iter().map(|job| report::line(job, &courses, now)).collect();
    Ok(json!({
        "id": sweep.id,
        "name": sweep.name,
        "state": report::state(&jobs),
        "counts": counts(&jobs),
        "created_at": sweep.created_at,
        "grid": sweep.request["grid"],
        "base": sweep.request["base"],
        "jobs": lines,
    }))
}

#[derive(Deserialize)]
struct ListQuery {
    cursor: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/sweeps`: newest first, each with its state and counts (the table is on the sweep).
async fn list(State(app): State<AppState>, Query(query): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let (cursor, limit) = page_query(query.cursor.as_deref(), query.limit)?;
    let (sweeps, next) = store::list(&app.pool, cursor, limit).await?;
    let mut items = Vec::with_capacity(sweeps.len());
    for sweep in sweeps {
        let jobs = jobs::of_sweep(&app.pool, &sweep.id).await?;
        items.push(json!({"id": sweep.id, "name": sweep.name, "state": report::state(&jobs), "counts": counts(&jobs),
                          "created_at": sweep.created_at, "grid": sweep.request["grid"]}));
    }
    Ok(Json(json!({"sweeps": items, "next_cursor": next.map(|n| n.to_string())})))
}

/// `GET /v1/sweeps/{id}`.
async fn get_sweep(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let sweep = existing(&app, &id).await?;
    Ok(Json(view(&app, sweep).await?))
}

#[derive(Deserialize)]
struct PlotQuery {
    x: Option<String>,
    y: Option<String>,
}

/// `GET /v1/sweeps/{id}/plot.svg?x=domain&y=general`.
async fn plot_svg(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<PlotQuery>,
) -> Result<Response, ApiError> {
    let sweep = existing(&app, &id).await?;
    let jobs = jobs::of_sweep(&app.pool, &sweep.id).await?;
    let courses = eval_courses(&store::evals_of(&app.pool, &sweep.id).await?);
    let (x, y) = match (query.x, query.y) {
        (Some(x), Some(y)) => (x, y),
        (x, y) => {
            let (dx, dy) = report::default_axes(&courses).ok_or_else(|| {
                ApiError::conflict("the sweep's jobs have not evaluated two sets yet; name them with ?x=…&y=…")
            })?;
            (x.unwrap_or(dx), y.unwrap_or(dy))
        }
    };
    let curves: Vec<plot::Curve> = jobs
        .iter()
        .map(|job| plot::Curve { label: job.name.clone(), points: report::curve(&courses, &job.id, &x, &y) })
        .collect();
    let chart = plot::learning_vs_forgetting(&sweep.name, &x, &y, curves);
    let svg = crate::plots::render_off_runtime(chart).await.map_err(ApiError::internal)?;
    Ok(crate::plots::svg_response(svg))
}

/// What a sweep does to each of its jobs.
#[derive(Clone, Copy)]
enum Action {
    Cancel,
    Resume,
}

/// Applies `action` to every job of the sweep; the store's guarded update leaves those in a state it
/// does not accept (ended, or changed by a race) as they are.
async fn for_each_job(app: &AppState, id: &str, action: Action) -> Result<Value, ApiError> {
    let sweep = existing(app, id).await?;
    for job in jobs::of_sweep(&app.pool, id).await? {
        let done = match action {
            Action::Cancel => jobs::cancel(&app.pool, &job.id).await,
            Action::Resume => jobs::resume(&app.pool, &job.id).await,
        };
        match done {
            Ok(job) if job.state.is_terminal() => crate::metrics::forget_later(app, job.id.clone()),
            Ok(_) | Err(JobError::Illegal { .. }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    app.queue.notify_waiters();
    view(app, sweep).await
}

/// `POST /v1/sweeps/{id}/cancel`: every queued, running or paused job is cancelled (a running one
/// after its worker has checkpointed, as for a job).
async fn cancel(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(for_each_job(&app, &id, Action::Cancel).await?))
}

/// `POST /v1/sweeps/{id}/resume`: every failed, cancelled or paused job is queued again, each
/// continuing from its newest checkpoint.
async fn resume(State(app): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(for_each_job(&app, &id, Action::Resume).await?))
}
