//! Prometheus metrics of the API, served at `GET /metrics`: requests by route, status and
//! pipeline, a latency histogram per route and pipeline, predictions by task and pipeline, and
//! per pipeline the round being served, swaps and refusals.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabels {
    pipeline: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The API's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    predictions: Family<TaskLabels, Counter>,
    round: Family<PipelineLabels, Gauge>,
    swaps: Family<PipelineLabels, Counter>,
    refused: Family<PipelineLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~1.6 s: predictions take microseconds, a batch of thousands takes milliseconds.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lensflow");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests answered, by route, method, status and pipeline (empty for routes of no pipeline)", requests.clone());
        let latency = HistogramFamily::new_with_constructor(latency_histogram);
        registry.register("http_request_duration_seconds", "Time to answer an HTTP request, by route and pipeline", latency.clone());
        let predictions = Family::<TaskLabels, Counter>::default();
        registry.register("predictions", "Predictions made (a batch counts each item), by task and pipeline", predictions.clone());
        let round = Family::<PipelineLabels, Gauge>::default();
        registry.register("model_round", "The training round being served, by pipeline", round.clone());
        let swaps = Family::<PipelineLabels, Counter>::default();
        registry.register("model_swaps", "Rounds swapped in, by pipeline", swaps.clone());
        let refused = Family::<PipelineLabels, Counter>::default();
        registry.register("model_refused", "Rounds refused as corrupt or incomplete, by pipeline", refused.clone());
        Metrics { registry, requests, latency, predictions, round, swaps, refused }
    }
}

impl Metrics {
    /// Records one answered request; `pipeline` is empty for routes of no pipeline.
    pub fn request(&self, route: &str, method: &str, status: u16, pipeline: &str, seconds: f64) {
        self.requests.get_or_create(&RequestLabels { route: route.to_string(), method: method.to_string(), status, pipeline: pipeline.to_string() }).inc();
        self.latency.get_or_create(&RouteLabels { route: route.to_string(), pipeline: pipeline.to_string() }).observe(seconds);
    }

    /// Records `n` predictions of `task` by `pipeline`.
    pub fn predictions(&self, task: &'static str, pipeline: &str, n: u64) {
        self.predictions.get_or_create(&TaskLabels { task, pipeline: pipeline.to_string() }).inc_by(n);
    }

    /// Starts `pipeline`'s series at 0 when the pipeline is found, so a dashboard (or a
    /// `rate()`) sees a round, swaps and refusals from the start rather than a missing series.
    pub fn pipeline_found(&self, pipeline: &str) {
        let labels = PipelineLabels { pipeline: pipeline.to_string() };
        // Creating the series is the point; the guards are released at once.
        let _ = self.round.get_or_create(&labels);
        let _ = self.swaps.get_or_create(&labels);
        let _ = self.refused.get_or_create(&labels);
    }

    /// Records that `pipeline` now serves `round`.
    pub fn round_swapped(&self, pipeline: &str, round: u64) {
        let labels = PipelineLabels { pipeline: pipeline.to_string() };
        self.round.get_or_create(&labels).set(round as i64);
        self.swaps.get_or_create(&labels).inc();
    }

    /// Records a refused round of `pipeline`.
    pub fn round_refused(&self, pipeline: &str) {
        self.refused.get_or_create(&PipelineLabels { pipeline: pipeline.to_string() }).inc();
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        encode(&self.registry)
    }
}

/// `registry`'s metrics in the OpenMetrics text format: the API's, and the trainer's endpoint's.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
