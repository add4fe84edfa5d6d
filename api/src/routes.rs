//! The HTTP surface: `app(state)` builds the router, so tests drive it without a socket.
//!
//! Every pipeline in the model store has its routes under `/pipelines/{name}/`; the seed's
//! routes (`/predict`, `/predict_classification`, `/predict_regression`, `/predict_clustering`,
//! `/models`, `/status`) answer for the default pipeline, with the seed's request and answer
//! shapes when that is MovieLens. Every prediction endpoint takes one request object or an array
//! of them (a batch) and answers in the same shape. Bodies are read as bytes and parsed here, so
//! malformed JSON, wrong types, missing fields and oversized bodies all get [`ApiError`]'s JSON,
//! naming the field.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use lensflow_core::predict::{
    ErrorBody, FieldError, ModelsResponse, PipelineStatus, PipelineSummary, PipelinesResponse, Prediction, RoundSummary, ServingRound,
};
use lensflow_core::{Lake, StorageOptions};
use serde_json::Value;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa::OpenApi;

use crate::ApiError;
use crate::metrics::Metrics;
use crate::round::Task;
use crate::watcher::Models;
use lensflow_core::pipeline::event::kind;

mod openapi;

pub use openapi::openapi;

/// Limits on what one request may ask, and on how many are worked on at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub body_bytes: usize,
    /// Most requests in one batch.
    pub batch: usize,
    /// Longest a request may take before it is answered 408, waiting for its turn included.
    pub timeout: Duration,
    /// Most requests handled at once, over every route; more wait for a turn (up to
    /// `timeout`), so a burst queues instead of taking all memory and CPU.
    pub concurrent: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // 1024 in flight is far above what 2 cores answer at ~50k requests/s (each takes
        // ~20 µs), so the limit only bites on a flood of slow or large requests.
        Limits { body_bytes: 2 << 20, batch: 10_000, timeout: Duration::from_secs(10), concurrent: 1024 }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The pipelines and the rounds being served.
    pub models: Arc<Models>,
    /// The API's metrics.
    pub metrics: Arc<Metrics>,
    /// Request limits.
    pub limits: Limits,
    /// The lake's root for `GET /status` (a pipeline's lake is `<lake>/<name>`) [default: the
    /// served round's lineage names it].
    pub lake: Option<String>,
    /// Settings to open the lake with.
    pub storage: StorageOptions,
    opened_lakes: Arc<Mutex<HashMap<String, Lake>>>,
    /// Each pipeline's lake as last read, for a `/status` while the lake cannot be read.
    lake_seen: Arc<Mutex<HashMap<String, PipelineStatus>>>,
}

impl AppState {
    /// State over `models`, with default limits and each pipeline's lake taken from its round.
    pub fn new(models: Arc<Models>, metrics: Arc<Metrics>) -> AppState {
        AppState {
            models,
            metrics,
            limits: Limits::default(),
            lake: None,
            storage: StorageOptions::default(),
            opened_lakes: Arc::default(),
            lake_seen: Arc::default(),
        }
    }
}

/// Most problems listed in one error answer; a batch of 10,000 bad items needs no 10,000 lines.
const MAX_LISTED_ERRORS: usize = 100;

/// The routes that answer for the default pipeline (for the metrics' `pipeline` label).
const SEED_ROUTES: [&str; 6] = ["/predict", "/predict_classification", "/predict_regression", "/predict_clustering", "/models", "/status"];

/// The part of the description that does not depend on the pipelines.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "lensflow",
        description = "Predictions from the newest trained round of each pipeline in the model store. Each pipeline has its routes under /pipelines/{name}/; /predict, /predict_classification, /predict_regression, /predict_clustering, /models and /status answer for the default pipeline."
    ),
    paths(pipelines, healthz, readyz, metrics),
    components(schemas(ErrorBody, FieldError, ModelsResponse, ServingRound, RoundSummary, PipelineStatus, PipelinesResponse, PipelineSummary, Prediction))
)]
struct ApiDoc;

/// The router with every route, limit and the metrics middleware.
pub fn app(state: AppState) -> Router {
    let routes = Router::new()
        .route("/", get(crate::ui::page))
        .route("/predict", post(predict))
        .route("/predict_classification", post(predict_classification))
        .route("/predict_regression", post(predict_regression))
        .route("/predict_clustering", post(predict_clustering))
        .route("/models", get(models))
        .route("/status", get(status))
        .route("/pipelines", get(pipelines))
        .route("/pipelines/{name}/predict", post(pipeline_predict))
        .route("/pipelines/{name}/predict_classification", post(pipeline_predict_classification))
        .route("/pipelines/{name}/predict_regression", post(pipeline_predict_regression))
        .route("/pipelines/{name}/predict_clustering", post(pipeline_predict_clustering))
        .route("/pipelines/{name}/models", get(pipeline_models))
        .route("/pipelines/{name}/status", get(pipeline_status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|State(state): State<AppState>| async move { Json(openapi(&state.models, state.limits.batch)) }))
        .route("/docs", get(|| async { Html(SWAGGER_PAGE) }))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(ErrorBody { error: "no such route; see /docs".into(), field: None, errors: vec![] })) });
    limited(routes, state)
}

/// `routes` under the limits and the metrics, from the outside in: the body limit, the
/// timeout, the metrics, then the limit on requests in flight. The timeout is outside the
/// concurrency limit so that waiting for a turn counts against it: a request waits, never is
/// refused for being one too many, and is answered 408 if its turn does not come in time.
fn limited(routes: Router<AppState>, state: AppState) -> Router {
    let limits = state.limits;
    routes
        // `Router::layer` gives each route its own copy of a layer; this one's copies share
        // one semaphore, so the limit holds over every route together.
        .layer(GlobalConcurrencyLimitLayer::new(limits.concurrent))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.timeout))
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .with_state(state)
}

/// Counts and times every request under its route pattern and pipeline.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let pipeline = if route.starts_with("/pipelines/{name}") {
        // Only names the store has become label values: a client cannot grow the label set.
        let name = req.uri().path().split('/').nth(2).unwrap_or_default();
        if state.models.pipeline(name).is_some() || name == state.models.default_pipeline() { name.to_string() } else { "unknown".into() }
    } else if SEED_ROUTES.contains(&route.as_str()) {
        state.models.default_pipeline().to_string()
    } else {
        String::new()
    };
    let method = req.method().to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    state.metrics.request(&route, &method, response.status().as_u16(), &pipeline, start.elapsed().as_secs_f64());
    response
}

/// A prediction body: one request object, or an array of them. The objects are checked
/// against the pipeline's request fields once the pipeline is known.
pub struct PredictBody {
    items: Vec<Value>,
    batch: bool,
}

impl FromRequest<AppState> for PredictBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge { limit: state.limits.body_bytes }
            } else {
                ApiError::MalformedJson(e.body_text())
            }
        })?;
        parse_body(&bytes, state.limits.batch)
    }
}

/// Parses a body into request objects (checked later, against the pipeline).
fn parse_body(bytes: &[u8], max_batch: usize) -> Result<PredictBody, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    match value {
        Value::Array(items) if items.is_empty() => Err(ApiError::field("body", "an empty array; send at least one request")),
        Value::Array(items) if items.len() > max_batch => {
            Err(ApiError::field("body", format!("{} requests in one batch; the most is {max_batch}", items.len())))
        }
        Value::Array(items) => Ok(PredictBody { items, batch: true }),
        object @ Value::Object(_) => Ok(PredictBody { items: vec![object], batch: false }),
        other => {
            Err(ApiError::field("body", format!("expected a request object (e.g. {{\"userId\":1,\"movieId\":31}}) or an array of them, got {}", kind(&other))))
        }
    }
}

fn answer(state: &AppState, pipeline: &str, task: Task, body: PredictBody) -> Result<Response, ApiError> {
    let round = state.models.serving(pipeline)?;
    let answers = round.predict(&body.items, task, body.batch).map_err(|e| match e {
        ApiError::Invalid(mut errors) => {
            errors.truncate(MAX_LISTED_ERRORS);
            ApiError::Invalid(errors)
        }
        other => other,
    })?;
    state.metrics.predictions(task.name(), pipeline, answers.len() as u64);
    Ok(if body.batch { Json(answers).into_response() } else { Json(answers.first()).into_response() })
}

/// All three answers for each request (the default pipeline).
async fn predict(State(state): State<AppState>, body: PredictBody) -> Result<Response, ApiError> {
    answer(&state, state.models.default_pipeline(), Task::All, body)
}

/// The classification answer (the default pipeline).
async fn predict_classification(State(state): State<AppState>, body: PredictBody) -> Result<Response, ApiError> {
    answer(&state, state.models.default_pipeline(), Task::Classification, body)
}

/// The regression answer (the default pipeline).
async fn predict_regression(State(state): State<AppState>, body: PredictBody) -> Result<Response, ApiError> {
    answer(&state, state.models.default_pipeline(), Task::Regression, body)
}

/// The segment (the default pipeline); needs only the clustered entity's fields.
async fn predict_clustering(State(state): State<AppState>, body: PredictBody) -> Result<Response, ApiError> {
    answer(&state, state.models.default_pipeline(), Task::Clustering, body)
}

/// All three answers for each request to pipeline `name`.
async fn pipeline_predict(State(state): State<AppState>, Path(name): Path<String>, body: PredictBody) -> Result<Response, ApiError> {
    answer(&state, &name, Task::All, body)
}

/// Pipeline `name`'s classification answer.
async fn pipeline_predict_classification(State(state): State<AppState>, Path(name): Path<String>, body: PredictBody) -> Result<Response, ApiError> {
    answer(&state, &name, Task::Classification, body)
}

/// Pipeline `name`'s regression answer.
async fn pipeline_predict_regression(State(state): State<AppState>, Path(name): Path<String>, body: PredictBody) -> Result<Response, ApiError> {
    answer(&state, &name, Task::Regression, body)
}

/// Pipeline `name`'s segment.
async fn pipeline_predict_clustering(State(state): State<AppState>, Path(name): Path<String>, body: PredictBody) -> Result<Response, ApiError> {
    answer(&state, &name, Task::Clustering, body)
}

fn models_of(state: &AppState, name: &str) -> Result<Json<ModelsResponse>, ApiError> {
    let round = state.models.serving(name)?;
    Ok(Json(ModelsResponse { serving: round.describe(), rounds: round.history.to_vec() }))
}

/// The default pipeline's round (metrics, lineage, request fields, segments) and every round
/// before it.
async fn models(State(state): State<AppState>) -> Result<Json<ModelsResponse>, ApiError> {
    models_of(&state, state.models.default_pipeline())
}

/// Pipeline `name`'s round and every round before it.
async fn pipeline_models(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<ModelsResponse>, ApiError> {
    models_of(&state, &name)
}

/// How far the default pipeline has got.
async fn status(State(state): State<AppState>) -> Result<Json<PipelineStatus>, ApiError> {
    let name = state.models.default_pipeline().to_owned();
    status_of(&state, &name).await
}

/// How far pipeline `name` has got.
async fn pipeline_status(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<PipelineStatus>, ApiError> {
    status_of(&state, &name).await
}

/// Batches and events in the pipeline's lake, the round served.
async fn status_of(state: &AppState, name: &str) -> Result<Json<PipelineStatus>, ApiError> {
    let round = match state.models.serving(name) {
        Ok(round) => Some(round),
        // Without a round, the status still shows what the lake holds, if the lake is known.
        Err(ApiError::NotReady(_)) if state.lake.is_some() => None,
        Err(e) => return Err(e),
    };
    let opened = state.opened_lakes.lock().ok().and_then(|l| l.get(name).cloned());
    let lake = match opened {
        Some(lake) => lake,
        None => {
            let lake = match (&state.lake, &round) {
                (Some(root), _) => Lake::open(root, &state.storage)?.child(name),
                (None, Some(round)) => Lake::open(&round.artifact.lineage.lake, &state.storage)?,
                (None, None) => return Err(ApiError::NotReady(name.to_string())),
            };
            if let Ok(mut opened) = state.opened_lakes.lock() {
                opened.insert(name.to_string(), lake.clone());
            }
            lake
        }
    };
    let trained = round.as_ref().map(|r| r.artifact.lineage.batches.iter().copied().max().unwrap_or(r.round()));
    let mut status = match lake.manifests().await {
        Ok(manifests) => {
            let mut partitions = std::collections::BTreeMap::new();
            for m in &manifests {
                for (p, range) in &m.partitions {
                    partitions.entry(*p).and_modify(|r: &mut lensflow_core::OffsetRange| r.last = r.last.max(range.last)).or_insert(*range);
                }
            }
            let status = PipelineStatus {
                pipeline: name.to_string(),
                lake: lake.url().to_string(),
                batches: manifests.len() as u64,
                // Saturating: manifests are checked one by one, not against each other.
                events: manifests.iter().fold(0u64, |n, m| n.saturating_add(m.rows)),
                dead_letters: manifests.iter().fold(0u64, |n, m| n.saturating_add(m.dead_letter_count)),
                partitions,
                last_batch_at_ms: manifests.last().map(|m| m.created_at_ms),
                ..PipelineStatus::default()
            };
            if let Ok(mut seen) = state.lake_seen.lock() {
                seen.insert(name.to_string(), status.clone());
            }
            status
        }
        // The lake's store being down is no reason to fail the answer: the served round is
        // known, and the lake's counts from the last read say how far it had got.
        Err(e) => {
            tracing::warn!(pipeline = name, error = %e, "cannot read the lake for /status; answering with the last counts read");
            let seen = state.lake_seen.lock().ok().and_then(|s| s.get(name).cloned());
            PipelineStatus {
                lake_error: Some(e.to_string()),
                ..seen.unwrap_or_else(|| PipelineStatus { pipeline: name.to_string(), lake: lake.url().to_string(), ..PipelineStatus::default() })
            }
        }
    };
    status.round = round.as_ref().map(|r| r.round());
    status.round_created_at_ms = round.as_ref().map(|r| r.artifact.created_at_ms);
    status.batches_behind = status.batches.saturating_sub(trained.unwrap_or(0));
    Ok(Json(status))
}

/// Every pipeline in the model store, with the round each serves.
#[utoipa::path(get, path = "/pipelines", responses((status = 200, body = PipelinesResponse)))]
async fn pipelines(State(state): State<AppState>) -> Json<PipelinesResponse> {
    let default = state.models.default_pipeline().to_string();
    let found = state.models.pipelines();
    let mut list: Vec<PipelineSummary> = found
        .values()
        .map(|p| {
            let round = p.current();
            PipelineSummary {
                name: p.name().to_string(),
                description: round.as_ref().map(|r| r.pipeline().definition.description.clone()).unwrap_or_default(),
                round: round.as_ref().map(|r| r.round()),
                default: p.name() == default,
            }
        })
        .collect();
    if !found.contains_key(&default) {
        // Listed even before its first round, so clients see what the seed routes wait for.
        list.push(PipelineSummary { name: default.clone(), description: String::new(), round: None, default: true });
    }
    // The default first, then by name.
    list.sort_by(|a, b| b.default.cmp(&a.default).then_with(|| a.name.cmp(&b.name)));
    Json(PipelinesResponse { default, pipelines: list })
}

/// Up: answers as long as the process runs.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The server is up")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready once every pipeline in the model store has a round loaded (503 before). The body
/// names the default pipeline's round first, unnamed (`ready: round 3`), then the others'
/// (`, smart-home round 2`).
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "Every pipeline has a round loaded"), (status = 503, body = ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> Result<String, ApiError> {
    let default = state.models.default_pipeline();
    let found = state.models.pipelines();
    if found.is_empty() {
        return Err(ApiError::NotReady(default.to_string()));
    }
    let mut parts = Vec::with_capacity(found.len());
    for (name, p) in found.iter() {
        let round = p.current().ok_or_else(|| ApiError::NotReady(name.clone()))?;
        if name == default {
            parts.insert(0, format!("round {}", round.round()));
        } else {
            parts.push(format!("{name} round {}", round.round()));
        }
    }
    Ok(format!("ready: {}", parts.join(", ")))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
}

/// Swagger UI over `/openapi.json`. Its script and style load from a CDN in the reader's browser,
/// so no third-party file ships in this repository.
const SWAGGER_PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lensflow API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="https://unpkg.com/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"><p>The interactive API page loads Swagger UI from unpkg.com; the description itself is at <a href="/openapi.json">/openapi.json</a>.</p></div>
<script src="https://unpkg.com/swagger-ui-dist@5/swagger-ui-bundle.js" crossorigin></script>
<script>window.onload = () => { window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui" }); };</script>
</body></html>"##;

#[cfg(test)]
mod tests;
