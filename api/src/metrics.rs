//! Prometheus metrics of the API, served at `GET /metrics`: requests by route and status, a
//! latency histogram per route, predictions by task, the round being served, swaps and refusals.

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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The API's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    predictions: Family<TaskLabels, Counter>,
    round: Gauge,
    swaps: Counter,
    refused: Counter,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~1.6 s: predictions take microseconds, a batch of thousands takes milliseconds.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lensflow");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        let latency = HistogramFamily::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            latency.clone(),
        );
        let predictions = Family::<TaskLabels, Counter>::default();
        registry.register(
            "predictions",
            "Predictions made (a batch counts each item), by task",
            predictions.clone(),
        );
        let round = Gauge::default();
        registry.register(
            "model_round",
            "The training round being served (0: none yet)",
            round.clone(),
        );
        let swaps = Counter::default();
        registry.register("model_swaps", "Rounds swapped in", swaps.clone());
        let refused = Counter::default();
        registry.register(
            "model_refused",
            "Rounds refused as corrupt or incomplete",
            refused.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            predictions,
            round,
            swaps,
            refused,
        }
    }
}

impl Metrics {
    /// Records one answered request.
    pub fn request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                method: method.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(seconds);
    }

    /// Records `n` predictions of `task`.
    pub fn predictions(&self, task: &'static str, n: u64) {
        self.predictions
            .get_or_create(&TaskLabels { task })
            .inc_by(n);
    }

    /// Records that `round` is now served.
    pub fn round_swapped(&self, round: u64) {
        self.round.set(round as i64);
        self.swaps.inc();
    }

    /// Records a refused round.
    pub fn round_refused(&self) {
        self.refused.inc();
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
