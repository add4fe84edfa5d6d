//! The HTTP surface: `app(state)` builds the router, so tests drive it without a socket.
//!
//! Every prediction endpoint takes one request object or an array of them (a batch) and answers
//! in the same shape. Bodies are read as bytes and parsed here, so malformed JSON, wrong types,
//! missing fields and oversized bodies all get [`ApiError`]'s JSON, naming the field.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use lensflow_core::predict::{
    ErrorBody, FieldError, ModelsResponse, PipelineStatus, PredictRequest, Prediction,
};
use lensflow_jobs::lake::{Lake, StorageOptions};
use serde_json::Value;
use tower_http::timeout::TimeoutLayer;
use utoipa::OpenApi;

use crate::ApiError;
use crate::metrics::Metrics;
use crate::round::Task;
use crate::watcher::Models;

/// Limits on what one request may ask.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub body_bytes: usize,
    /// Most requests in one batch.
    pub batch: usize,
    /// Longest a request may take before it is answered 408.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes: 2 << 20,
            batch: 10_000,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The round being served.
    pub models: Arc<Models>,
    /// The API's metrics.
    pub metrics: Arc<Metrics>,
    /// Request limits.
    pub limits: Limits,
    /// The lake for `GET /status` [default: the served round's lineage names it].
    pub lake: Option<String>,
    /// Settings to open the lake with.
    pub storage: StorageOptions,
    opened_lake: Arc<Mutex<Option<Lake>>>,
}

impl AppState {
    /// State over `models`, with default limits and the lake taken from the served round.
    pub fn new(models: Arc<Models>, metrics: Arc<Metrics>) -> AppState {
        AppState {
            models,
            metrics,
            limits: Limits::default(),
            lake: None,
            storage: StorageOptions::default(),
            opened_lake: Arc::default(),
        }
    }
}

/// Most problems listed in one error answer; a batch of 10,000 bad items needs no 10,000 lines.
const MAX_LISTED_ERRORS: usize = 100;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "lensflow",
        description = "Predictions from the newest trained round: liked or not, the rating, the user's segment."
    ),
    paths(
        predict,
        predict_classification,
        predict_regression,
        predict_clustering,
        models,
        status,
        healthz,
        readyz,
        metrics
    ),
    components(schemas(
        PredictRequest,
        Prediction,
        ErrorBody,
        FieldError,
        ModelsResponse,
        PipelineStatus
    ))
)]
struct ApiDoc;

/// The OpenAPI description of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The router with every route, limit and the metrics middleware.
pub fn app(state: AppState) -> Router {
    let limits = state.limits;
    Router::new()
        .route("/", get(crate::ui::page))
        .route("/predict", post(predict))
        .route("/predict_classification", post(predict_classification))
        .route("/predict_regression", post(predict_regression))
        .route("/predict_clustering", post(predict_clustering))
        .route("/models", get(models))
        .route("/status", get(status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .route("/docs", get(|| async { Html(SWAGGER_PAGE) }))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(ErrorBody {
                    error: "no such route; see /docs".into(),
                    field: None,
                    errors: vec![],
                }),
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.timeout,
        ))
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .with_state(state)
}

/// Counts and times every request under its route pattern.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    state.metrics.request(
        &route,
        &method,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

/// A prediction body: one request object, or an array of them.
pub struct PredictBody {
    items: Vec<PredictRequest>,
    batch: bool,
}

impl FromRequest<AppState> for PredictBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge {
                    limit: state.limits.body_bytes,
                }
            } else {
                ApiError::MalformedJson(e.body_text())
            }
        })?;
        parse_body(&bytes, state.limits.batch)
    }
}

/// Parses a body into requests, naming the element and field of every problem.
fn parse_body(bytes: &[u8], max_batch: usize) -> Result<PredictBody, ApiError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let (values, batch) = match value {
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::field(
                "body",
                "an empty array; send at least one request",
            ));
        }
        Value::Array(items) if items.len() > max_batch => {
            return Err(ApiError::field(
                "body",
                format!(
                    "{} requests in one batch; the most is {max_batch}",
                    items.len()
                ),
            ));
        }
        Value::Array(items) => (items, true),
        object @ Value::Object(_) => (vec![object], false),
        other => {
            return Err(ApiError::field(
                "body",
                format!(
                    "expected an object like {{\"userId\":1,\"movieId\":31}} or an array of them, got {}",
                    kind(&other)
                ),
            ));
        }
    };
    let mut items = Vec::with_capacity(values.len());
    let mut errors = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        match serde_path_to_error::deserialize::<_, PredictRequest>(value) {
            Ok(item) => items.push(item),
            Err(e) => {
                let path = e.path().to_string();
                let at = if batch {
                    format!("[{i}]")
                } else {
                    String::new()
                };
                let field = match (at.is_empty(), path.as_str()) {
                    (true, ".") => "body".to_string(),
                    (false, ".") => at,
                    (true, _) => path,
                    (false, _) => format!("{at}.{path}"),
                };
                errors.push(FieldError {
                    field,
                    message: e.into_inner().to_string(),
                });
            }
        }
    }
    if !errors.is_empty() {
        errors.truncate(MAX_LISTED_ERRORS);
        return Err(ApiError::Invalid(errors));
    }
    Ok(PredictBody { items, batch })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn answer(state: &AppState, task: Task, body: PredictBody) -> Result<Response, ApiError> {
    let round = state.models.current().ok_or(ApiError::NotReady)?;
    let mut answers = Vec::with_capacity(body.items.len());
    let mut errors = Vec::new();
    for (i, item) in body.items.iter().enumerate() {
        let at = if body.batch {
            format!("[{i}].")
        } else {
            String::new()
        };
        match round.predict(item, task, &at) {
            Ok(a) => answers.push(a),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        errors.truncate(MAX_LISTED_ERRORS);
        return Err(ApiError::Invalid(errors));
    }
    state.metrics.predictions(task.name(), answers.len() as u64);
    Ok(if body.batch {
        Json(answers).into_response()
    } else {
        Json(answers.pop()).into_response()
    })
}

/// All three answers for each (user, movie).
#[utoipa::path(post, path = "/predict", request_body(content = PredictRequest, description = "One request, or a JSON array of them (answered with an array)"),
    responses((status = 200, body = Prediction), (status = 400, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn predict(State(state): State<AppState>, body: PredictBody) -> Result<Response, ApiError> {
    answer(&state, Task::All, body)
}

/// Whether the user likes the movie: `probability_like` and `prediction_like` (0/1).
#[utoipa::path(post, path = "/predict_classification", request_body(content = PredictRequest, description = "One request, or a JSON array of them"),
    responses((status = 200, body = Prediction), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn predict_classification(
    State(state): State<AppState>,
    body: PredictBody,
) -> Result<Response, ApiError> {
    answer(&state, Task::Classification, body)
}

/// The rating the user would give the movie: `predicted_rating`, 0.5..5.
#[utoipa::path(post, path = "/predict_regression", request_body(content = PredictRequest, description = "One request, or a JSON array of them"),
    responses((status = 200, body = Prediction), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn predict_regression(
    State(state): State<AppState>,
    body: PredictBody,
) -> Result<Response, ApiError> {
    answer(&state, Task::Regression, body)
}

/// The user's segment: `cluster_id` and `segment` (a description). Needs only the user.
#[utoipa::path(post, path = "/predict_clustering", request_body(content = PredictRequest, description = "One request, or a JSON array of them"),
    responses((status = 200, body = Prediction), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn predict_clustering(
    State(state): State<AppState>,
    body: PredictBody,
) -> Result<Response, ApiError> {
    answer(&state, Task::Clustering, body)
}

/// The round being served (metrics, lineage, segments) and every round before it.
#[utoipa::path(get, path = "/models", responses((status = 200, body = ModelsResponse), (status = 503, body = ErrorBody)))]
async fn models(State(state): State<AppState>) -> Result<Json<ModelsResponse>, ApiError> {
    let round = state.models.current().ok_or(ApiError::NotReady)?;
    Ok(Json(ModelsResponse {
        serving: round.describe(),
        rounds: round.history.to_vec(),
    }))
}

/// How far the pipeline has got: batches and ratings in the lake, the round served.
#[utoipa::path(get, path = "/status", responses((status = 200, body = PipelineStatus), (status = 503, body = ErrorBody)))]
async fn status(State(state): State<AppState>) -> Result<Json<PipelineStatus>, ApiError> {
    let round = state.models.current();
    let lake = match state.opened_lake.lock().ok().and_then(|l| l.clone()) {
        Some(lake) => lake,
        None => {
            let url = state
                .lake
                .clone()
                .or_else(|| round.as_ref().map(|r| r.artifact.lineage.lake.clone()))
                .ok_or(ApiError::NotReady)?;
            let lake = Lake::open(&url, &state.storage)?;
            if let Ok(mut opened) = state.opened_lake.lock() {
                *opened = Some(lake.clone());
            }
            lake
        }
    };
    let manifests = lake.manifests().await?;
    let mut partitions = std::collections::BTreeMap::new();
    for m in &manifests {
        for (p, range) in &m.partitions {
            partitions
                .entry(*p)
                .and_modify(|r: &mut lensflow_core::OffsetRange| r.last = r.last.max(range.last))
                .or_insert(*range);
        }
    }
    let batches = manifests.len() as u64;
    let served = round.as_ref().map(|r| r.round());
    Ok(Json(PipelineStatus {
        lake: lake.url().to_string(),
        batches,
        ratings: manifests.iter().map(|m| m.rows).sum(),
        dead_letters: manifests.iter().map(|m| m.dead_letter_count).sum(),
        partitions,
        last_batch_at_ms: manifests.last().map(|m| m.created_at_ms),
        round: served,
        round_created_at_ms: round.as_ref().map(|r| r.artifact.created_at_ms),
        batches_behind: batches.saturating_sub(served.unwrap_or(0)),
    }))
}

/// Up: answers as long as the process runs.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The server is up")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready once a round is loaded (503 before).
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "A round is loaded"), (status = 503, body = ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> Result<String, ApiError> {
    let round = state.models.current().ok_or(ApiError::NotReady)?;
    Ok(format!("ready: round {}", round.round()))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
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
