//! `lensflow serve`: the REST API and web page over the newest trained round of every pipeline
//! in the model store.
//!
//! - [`watcher`]: finds the store's pipelines (`ROOT/<name>/LATEST`), loads and checks each new
//!   round off the request path ([`round`]), and swaps it in atomically; a bad round is refused
//!   and the previous one keeps serving.
//! - [`round`]: one loaded round (artifact, lookup tables, the pipeline's feature expressions
//!   compiled once) and the prediction itself: a batch of requests becomes Arrow rows that the
//!   feature SQL's own expressions are evaluated on.
//! - [`routes`]: the router: `/pipelines/{name}/…` prediction endpoints (one request or a
//!   batch), `/models` and `/status` per pipeline, the seed's routes for the default pipeline,
//!   health, `/metrics`, `/openapi.json` (generated from the definitions) and `/docs`.
//! - [`ui`]: the web page at `/`, which calls the same public endpoints.
//! - [`metrics`]: Prometheus counters and histograms; [`error`]: the one error type, which
//!   answers 4xx with the field at fault.
//!
//! ```text
//! model store: <name>/LATEST ─▶ watcher ─▶ round (checked, compiled) ─▶ ArcSwap per pipeline
//!                                                                        ─▶ handlers ─▶ JSON / page
//! ```

pub mod error;
pub mod metrics;
pub mod round;
pub mod routes;
pub mod ui;
pub mod watcher;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lensflow_core::pipeline::DEFAULT_PIPELINE;
use lensflow_core::{Lake, StorageOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use routes::{AppState, Limits, app};

/// Settings of `lensflow serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The model store's root `lensflow train` writes to (path, file:// or s3:// URL); each
    /// pipeline's rounds are in its folder `<models>/<name>/`.
    pub models: String,
    /// The lake's root, for `/status`: a pipeline's lake is `<lake>/<name>` [default: the lake
    /// the served round was trained on].
    pub lake: Option<String>,
    /// Object-store settings (`AWS_*`).
    pub storage: StorageOptions,
    /// How often to look for a new round.
    pub poll_interval: Duration,
    /// Request limits.
    pub limits: Limits,
    /// How long in-flight requests get to finish after Ctrl-C.
    pub drain: Duration,
    /// The pipeline the seed's routes (`/predict`, `/models`, `/status`, …) answer for.
    pub default_pipeline: String,
}

impl ServeOptions {
    /// Options for the model store at `models`, with defaults for the rest.
    pub fn new(models: impl Into<String>) -> ServeOptions {
        ServeOptions {
            models: models.into(),
            lake: None,
            storage: StorageOptions::default(),
            poll_interval: Duration::from_secs(2),
            limits: Limits::default(),
            drain: Duration::from_secs(10),
            default_pipeline: DEFAULT_PIPELINE.to_string(),
        }
    }
}

/// Opens the model store and builds the app state; the first look at every `LATEST` happens
/// here, so a server with rounds ready is ready the moment it listens.
pub async fn state(opts: &ServeOptions) -> Result<AppState, ApiError> {
    let store = Lake::open(&opts.models, &opts.storage)?;
    let metrics = Arc::new(metrics::Metrics::default());
    let models = Arc::new(watcher::Models::new(store, opts.default_pipeline.clone(), metrics.clone()));
    match models.refresh().await {
        Ok(r) if r.swapped.is_empty() => tracing::warn!(models = models.store_url(), "no round loaded at start; watching for one"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot list the model store at start; watching it"),
    }
    let mut state = AppState::new(models, metrics);
    state.limits = opts.limits;
    state.lake = opts.lake.clone();
    state.storage = opts.storage.clone();
    Ok(state)
}

/// Serves on `listener` until `shutdown`, then lets requests in flight finish (up to the drain
/// time) and returns.
pub async fn serve(opts: ServeOptions, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ApiError> {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let state = state(&opts).await?;
    let watcher = tokio::spawn(state.models.clone().watch(opts.poll_interval, shutdown.clone()));
    tracing::info!(%addr, models = state.models.store_url(), "serving");
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let drained = async {
        shutdown.cancelled().await;
        tokio::time::sleep(opts.drain).await;
    };
    tokio::select! {
        r = server => r.map_err(|source| ApiError::Serve { addr: addr.clone(), source })?,
        _ = drained => tracing::warn!(drain = ?opts.drain, "requests still in flight after the drain time; closing"),
    }
    watcher.abort();
    Ok(())
}

/// Binds `addr` and [`serve`]s.
pub async fn run(opts: ServeOptions, addr: SocketAddr, shutdown: CancellationToken) -> Result<(), ApiError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| ApiError::Serve { addr: addr.to_string(), source })?;
    serve(opts, listener, shutdown).await
}

/// Serves `GET /metrics` on `addr` until `shutdown`, answering with what `render` gives (in the
/// OpenMetrics text format): the endpoint of the services that are not the API (the trainer).
pub async fn serve_metrics(addr: &str, render: Arc<dyn Fn() -> String + Send + Sync>, shutdown: CancellationToken) -> Result<(), ApiError> {
    use axum::http::header;
    let listener = TcpListener::bind(addr).await.map_err(|source| ApiError::Serve { addr: addr.to_string(), source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = render();
            async move { ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body) }
        }),
    );
    tracing::info!(addr, "metrics at /metrics");
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await.map_err(|source| ApiError::Serve { addr: addr.to_string(), source })
}

#[cfg(test)]
mod testing;
