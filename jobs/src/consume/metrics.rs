//! The consumer's Prometheus metrics: messages in, events landed, dead letters, batches
//! committed, lag per partition, store retries, when the last batch was committed, and the
//! messages held back for event-time alignment.
//! `lensflow consume --metrics-bind` serves them at `GET /metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

/// The consumer's metrics and the registry that renders them.
#[derive(Debug)]
pub struct ConsumerMetrics {
    registry: Registry,
    messages: Counter,
    landed: Counter,
    dead_letters: Counter,
    batches: Counter,
    retries: Counter,
    last_commit: Gauge<f64, AtomicU64>,
    lag: Family<PartitionLabels, Gauge>,
    held: Gauge,
    paused: Gauge,
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lensflow_consumer");
        let messages = Counter::default();
        registry.register("messages", "Messages read from Kafka", messages.clone());
        let landed = Counter::default();
        registry.register("events_landed", "Events committed to the lake", landed.clone());
        let dead_letters = Counter::default();
        registry.register("dead_letters", "Messages committed to the lake as dead letters", dead_letters.clone());
        let batches = Counter::default();
        registry.register("batches_committed", "Batches committed to the lake", batches.clone());
        let retries = Counter::default();
        registry.register("store_retries", "Batch commits retried because the object store failed", retries.clone());
        let last_commit = Gauge::<f64, AtomicU64>::default();
        registry.register("last_commit_seconds", "When the last batch was committed, in unix seconds", last_commit.clone());
        let lag = Family::<PartitionLabels, Gauge>::default();
        registry.register("lag", "Messages in the partition not yet committed to the lake, by topic and partition", lag.clone());
        let held = Gauge::default();
        registry.register("held_messages", "Messages held back because their event time runs ahead of the slowest partition's", held.clone());
        let paused = Gauge::default();
        registry.register("paused_partitions", "Partitions paused at the broker because they hold their share of held messages", paused.clone());
        ConsumerMetrics { registry, messages, landed, dead_letters, batches, retries, last_commit, lag, held, paused }
    }
}

impl ConsumerMetrics {
    /// Counts a message read.
    pub fn message(&self) {
        self.messages.inc();
    }

    /// Records a committed batch.
    pub fn committed(&self, events: u64, dead_letters: u64) {
        self.batches.inc();
        self.landed.inc_by(events);
        self.dead_letters.inc_by(dead_letters);
        self.last_commit.set(lensflow_core::now_ms() as f64 / 1000.0);
    }

    /// Counts a batch commit retried after a store failure.
    pub fn retried(&self) {
        self.retries.inc();
    }

    /// Sets a partition's lag: its end offset minus the next offset the lake lacks.
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag.get_or_create(&PartitionLabels { topic: topic.to_string(), partition }).set(lag.max(0));
    }

    /// Sets how many messages are held back and how many partitions are paused.
    pub fn set_held(&self, held: usize, paused: usize) {
        self.held.set(held as i64);
        self.paused.set(paused as i64);
    }

    /// Forgets a partition this consumer no longer owns.
    pub fn forget(&self, topic: &str, partition: i32) {
        self.lag.remove(&PartitionLabels { topic: topic.to_string(), partition });
    }

    /// The registry holding them, for the endpoint that renders it.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
