//! The trainer's Prometheus metrics: rounds published and failed, the last round and when it
//! was published, each stage's seconds in the last round, and how the state rows were found.
//! `lensflow train --metrics-bind` serves them at `GET /metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::RoundReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabels {
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    pipeline: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    pipeline: String,
    mode: String,
}

/// The trainer's metrics and the registry that renders them.
#[derive(Debug)]
pub struct TrainerMetrics {
    registry: Registry,
    rounds: Family<PipelineLabels, Counter>,
    failures: Family<PipelineLabels, Counter>,
    last_round: Family<PipelineLabels, Gauge>,
    last_published: Family<PipelineLabels, Gauge<f64, AtomicU64>>,
    stage_seconds: Family<StageLabels, Gauge<f64, AtomicU64>>,
    state_rounds: Family<StateLabels, Counter>,
    recomputed: Family<PipelineLabels, Counter>,
}

impl Default for TrainerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lensflow_trainer");
        let rounds = Family::<PipelineLabels, Counter>::default();
        registry.register("rounds", "Rounds published, by pipeline", rounds.clone());
        let failures = Family::<PipelineLabels, Counter>::default();
        registry.register("round_failures", "Rounds that failed (a watching trainer tries again at its next look), by pipeline", failures.clone());
        let last_round = Family::<PipelineLabels, Gauge>::default();
        registry.register("last_round", "The newest round this trainer published, by pipeline", last_round.clone());
        let last_published = Family::<PipelineLabels, Gauge<f64, AtomicU64>>::default();
        registry.register("last_round_published_seconds", "When the newest round was published, in unix seconds, by pipeline", last_published.clone());
        let stage_seconds = Family::<StageLabels, Gauge<f64, AtomicU64>>::default();
        registry.register("round_stage_seconds", "Seconds each stage of the newest round took, by pipeline and stage", stage_seconds.clone());
        let state_rounds = Family::<StateLabels, Counter>::default();
        registry.register("state_rounds", "Rounds by how they found their state rows (incremental or full), by pipeline", state_rounds.clone());
        let recomputed = Family::<PipelineLabels, Counter>::default();
        registry.register("state_rows_recomputed", "Stored state rows computed again because late events changed them, by pipeline", recomputed.clone());
        TrainerMetrics { registry, rounds, failures, last_round, last_published, stage_seconds, state_rounds, recomputed }
    }
}

impl TrainerMetrics {
    /// Records a published round.
    pub fn published(&self, report: &RoundReport) {
        let pipeline = PipelineLabels { pipeline: report.pipeline.clone() };
        self.rounds.get_or_create(&pipeline).inc();
        self.last_round.get_or_create(&pipeline).set(report.round as i64);
        self.last_published.get_or_create(&pipeline).set(lensflow_core::now_ms() as f64 / 1000.0);
        for (stage, seconds) in &report.seconds {
            self.stage_seconds.get_or_create(&StageLabels { pipeline: report.pipeline.clone(), stage: stage.clone() }).set(*seconds);
        }
        if let Some(state) = &report.state {
            self.state_rounds.get_or_create(&StateLabels { pipeline: report.pipeline.clone(), mode: state.mode.to_string() }).inc();
            self.recomputed.get_or_create(&pipeline).inc_by(state.recomputed);
        }
    }

    /// Records a failed round.
    pub fn failed(&self, pipeline: &str) {
        self.failures.get_or_create(&PipelineLabels { pipeline: pipeline.to_string() }).inc();
    }

    /// The registry holding them, for the endpoint that renders it.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
