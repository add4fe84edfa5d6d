//! Kafka → lake, exactly once.
//!
//! - [`offsets`]: where each partition resumes, read from the lake's manifests.
//! - [`align`]: each owned partition's lane, holding back messages whose event time runs ahead
//!   of the slowest partition's, so a batch spans one stretch of time across partitions.
//! - [`writer`]: the open batch, buffered per partition, and its Parquet encoding.
//! - [`commit`]: writing a batch's files and creating its manifest, safe against other writers.
//! - [`metrics`]: what the loop counts, for `--metrics-bind`.
//! - this module: the poll loop and the rebalance handling that tie them to a Kafka consumer.
//!
//! The loop runs on its own thread around a `BaseConsumer`, because librdkafka calls the
//! rebalance callback from inside `poll`, and the callback must read the lake (to tell Kafka
//! where a newly assigned partition resumes) before the first message of that partition is
//! fetched. Per message: parse it against the pipeline's columns (a bad one becomes a dead
//! letter naming the field at fault), skip it if the lake already holds its offset, hold it in
//! its partition's lane, and move what the lanes release into the open batch.
//! The lake is the pipeline's folder inside the `--lake` root. A batch closes on `batch_rows`, on `batch_interval`, and on
//! shutdown; closing commits it ([`commit::commit_batch`]) and then, for Kafka tools' sake only,
//! commits the group offsets. On revocation a partition's buffered messages are dropped unwritten:
//! its new owner resumes from the lake.

pub mod align;
pub mod commit;
pub mod metrics;
pub mod offsets;
pub mod writer;

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lensflow_core::pipeline::event::{Event, EventError};
use lensflow_core::{DeadLetter, Lake, Pipeline, StorageOptions};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use self::align::Lanes;
use self::metrics::ConsumerMetrics;
use self::offsets::LakeOffsets;
use self::writer::Batch;
use crate::kafka::KafkaOptions;
use crate::{JobError, Result};

/// What to consume, and where to land it.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// The pipeline whose events the topic carries.
    pub pipeline: Pipeline,
    /// Broker and client settings.
    pub kafka: KafkaOptions,
    /// Topic to read [default: the pipeline's topic].
    pub topic: String,
    /// Consumer group; consumers in one group split the partitions.
    pub group: String,
    /// The lake's root: `file:///abs/path`, a local path, or `s3://bucket/prefix`. The
    /// pipeline's events land in its folder `<root>/<pipeline name>/`.
    pub lake: String,
    /// Object-store settings for an `s3://` lake.
    pub storage: StorageOptions,
    /// A batch closes once it holds this many messages.
    pub batch_rows: usize,
    /// A batch closes once its first message is this old.
    pub batch_interval: Duration,
    /// Stop (after committing) when no message arrived for this long.
    pub exit_when_idle: Option<Duration>,
    /// Stop (after committing) once every partition this consumer owns is read to its end:
    /// land what the topic holds now, then exit, with no idle wait.
    pub until_end: bool,
    /// Read every partition of the topic without joining the group's rebalancing: for a lone
    /// consumer, which then starts at once instead of waiting for the group to form. The lake
    /// still decides where each partition resumes.
    pub all_partitions: bool,
    /// How long a batch commit keeps retrying a failing object store before the run fails.
    pub store_retry_for: Duration,
    /// How far (in the units of the pipeline's time column) one partition's events may run
    /// ahead of the slowest partition's before they are held back; `None`: land messages in
    /// the order they arrive. A pipeline without a time column is never aligned.
    pub max_skew: Option<i64>,
    /// Messages held back over all partitions before the partitions running ahead are paused.
    pub max_held: usize,
    /// Where the loop counts what it does.
    pub metrics: Arc<ConsumerMetrics>,
    /// Show a progress line.
    pub progress: bool,
}

impl ConsumeOptions {
    /// Options for landing `pipeline`'s topic into the lake at `lake` (a root) with every
    /// other setting at its default.
    pub fn new(kafka: KafkaOptions, lake: impl Into<String>, pipeline: Pipeline) -> Self {
        ConsumeOptions {
            kafka,
            topic: pipeline.topic().to_string(),
            pipeline,
            group: "lensflow-consumer".into(),
            lake: lake.into(),
            storage: StorageOptions::default(),
            batch_rows: 100_000,
            batch_interval: Duration::from_secs(30),
            exit_when_idle: None,
            until_end: false,
            all_partitions: false,
            store_retry_for: Duration::from_secs(120),
            max_skew: Some(0),
            max_held: 200_000,
            metrics: Arc::default(),
            progress: false,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |option, reason: &str| Err(JobError::Config { option, reason: reason.to_string() });
        if self.batch_rows == 0 {
            return bad("batch-rows", "must be at least 1");
        }
        if self.batch_interval.is_zero() {
            return bad("batch-interval", "must be longer than zero");
        }
        if self.topic.is_empty() {
            return bad("topic", "is empty");
        }
        if self.group.is_empty() {
            return bad("group", "is empty");
        }
        if self.max_skew.is_some_and(|s| s < 0) {
            return bad("max-skew", "must not be negative");
        }
        if self.max_held == 0 {
            return bad("max-held", "must be at least 1");
        }
        Ok(())
    }
}

/// What a consume run did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ConsumeSummary {
    /// This consumer's writer id (it appears in its file names and manifests).
    pub writer: String,
    /// Batches this consumer committed.
    pub batches: u64,
    /// Events this consumer landed.
    pub rows: u64,
    /// Messages this consumer dead-lettered.
    pub dead_letters: u64,
    /// Messages dropped unwritten because their partition was revoked or taken over.
    pub dropped_on_rebalance: u64,
    /// The newest batch number in the lake when the run ended.
    pub last_batch: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Events landed per second.
    pub rows_per_sec: f64,
}

/// Lands `opts.topic` into the lake until `shutdown` fires (or it is idle for
/// `exit_when_idle`), committing the open batch before it returns.
pub async fn consume(opts: ConsumeOptions, shutdown: CancellationToken) -> Result<ConsumeSummary> {
    opts.validate()?;
    let lake = Lake::open(&opts.lake, &opts.storage)?.child(opts.pipeline.name());
    // Read the lake before joining the group: a lake that cannot be read fails here, not
    // halfway through a rebalance.
    let mut offsets = LakeOffsets::new(&opts.topic);
    offsets.refresh(&lake).await?;
    tracing::info!(lake = lake.url(), pipeline = opts.pipeline.name(), batches = offsets.last_batch(), "lake opened");
    let handle = Handle::current();
    tokio::task::spawn_blocking(move || Ingest::start(opts, lake, offsets, handle)?.run(&shutdown))
        .await
        .map_err(|e| JobError::Internal(format!("consumer thread: {e}")))?
}

/// A change of assignment seen by the rebalance callback, for the loop to act on.
#[derive(Debug)]
enum Reassigned {
    /// Partitions now ours, with the offset each resumes from (`None`: from the beginning).
    Assigned(Vec<(i32, Option<i64>)>),
    /// Partitions no longer ours.
    Revoked(Vec<i32>),
}

/// State the rebalance callback and the loop share. Both run on the loop's thread (librdkafka
/// calls back from inside `poll`), so the lock is never contended; it only satisfies `Sync`.
struct Shared {
    offsets: LakeOffsets,
    events: Vec<Reassigned>,
    fatal: Option<JobError>,
    /// Each partition's end offset, as librdkafka's last statistics saw it.
    high: BTreeMap<i32, i64>,
}

struct IngestContext {
    topic: String,
    lake: Lake,
    handle: Handle,
    shared: Arc<Mutex<Shared>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic elsewhere cannot leave `Shared` half-updated in a way that matters here.
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ClientContext for IngestContext {
    /// The end offsets for the lag gauges, from librdkafka's periodic statistics (no extra
    /// round trip to the broker, and nothing that blocks while it is down).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else { return };
        let mut shared = lock(&self.shared);
        for (p, partition) in &topic.partitions {
            if *p >= 0 && partition.hi_offset >= 0 {
                shared.high.insert(*p, partition.hi_offset);
            }
        }
    }
}

impl IngestContext {
    /// Sets each partition of `tpl` to resume where the lake says (not where the group's
    /// committed offset says), and tells the loop they are ours.
    fn resume_from_lake(&self, tpl: &mut TopicPartitionList) {
        let partitions: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        let mut shared = lock(&self.shared);
        if let Err(e) = self.handle.block_on(shared.offsets.refresh(&self.lake)) {
            tracing::error!(error = %e, "cannot read the lake's offsets during a rebalance");
            shared.fatal.get_or_insert(e);
        }
        let mut assigned = Vec::new();
        for (topic, p) in &partitions {
            let next = shared.offsets.next_offset(*p);
            let offset = next.map(Offset::Offset).unwrap_or(Offset::Beginning);
            if let Err(e) = tpl.set_partition_offset(topic, *p, offset) {
                shared.fatal.get_or_insert(JobError::kafka(format!("seek partition {p}"))(e));
            }
            assigned.push((*p, next));
        }
        tracing::info!(?assigned, "partitions assigned (partition, lake offset)");
        shared.events.push(Reassigned::Assigned(assigned));
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.resume_from_lake(tpl);
                if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
                tracing::info!(?revoked, "partitions revoked");
                lock(&self.shared).events.push(Reassigned::Revoked(revoked));
                if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                lock(&self.shared).events.push(Reassigned::Revoked(partitions.iter().map(|(_, p)| *p).collect()));
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            lock(&self.shared).fatal.get_or_insert(JobError::kafka("apply a rebalance")(e));
        }
    }
}

/// Shortest idle limit before the consumer has joined its group.
const JOIN_GRACE: Duration = Duration::from_secs(30);

/// How often the lag gauges are brought up to date.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// The longest wait between two tries of a batch commit.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(8);

/// One incoming message, judged, with nothing borrowed from the consumer.
struct Incoming {
    partition: i32,
    offset: i64,
    parsed: std::result::Result<Event, DeadLetter>,
}

impl Incoming {
    fn judge(m: &BorrowedMessage<'_>, pipeline: &Pipeline) -> Incoming {
        let (partition, offset) = (m.partition(), m.offset());
        let payload = m.payload().unwrap_or_default();
        let parsed = match m.payload() {
            None => Err(EventError::NotJson("empty message".into())),
            Some(bytes) => pipeline.event_from_json(bytes),
        }
        .map_err(|reason| {
            let (raw, raw_encoding) = match std::str::from_utf8(payload) {
                Ok(text) => (text.to_string(), "utf8"),
                Err(_) => (payload.iter().map(|b| format!("{b:02x}")).collect(), "hex"),
            };
            DeadLetter {
                partition,
                offset,
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                raw,
                raw_encoding: raw_encoding.into(),
                field: reason.field().map(str::to_string),
                reason: reason.to_string(),
            }
        });
        Incoming { partition, offset, parsed }
    }
}

struct Ingest {
    opts: ConsumeOptions,
    lake: Lake,
    handle: Handle,
    consumer: BaseConsumer<IngestContext>,
    shared: Arc<Mutex<Shared>>,
    writer: String,
    batch: Batch,
    /// Partitions we own: the next offset each expects, and what each holds back.
    lanes: Lanes<Incoming>,
    summary: ConsumeSummary,
    bar: indicatif::ProgressBar,
}

impl Ingest {
    fn start(opts: ConsumeOptions, lake: Lake, offsets: LakeOffsets, handle: Handle) -> Result<Ingest> {
        let shared = Arc::new(Mutex::new(Shared { offsets, events: Vec::new(), fatal: None, high: BTreeMap::new() }));
        let context = IngestContext { topic: opts.topic.clone(), lake: lake.clone(), handle: handle.clone(), shared: shared.clone() };
        // A pipeline without a time column has no event time to align partitions by.
        let max_skew = opts.max_skew.filter(|_| opts.pipeline.definition.events.time.is_some());
        // Alignment and `until_end` both need to know when a partition is read to its end.
        let eof = if opts.until_end || max_skew.is_some() { "true" } else { "false" };
        let consumer: BaseConsumer<IngestContext> = opts
            .kafka
            .client_config(&[
                ("group.id", opts.group.as_str()),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                // Eager assignment: every rebalance is a clean revoke-all then assign.
                ("partition.assignment.strategy", "range,roundrobin"),
                // A consumer killed without leaving is noticed in seconds, not the default 45.
                ("session.timeout.ms", "6000"),
                ("heartbeat.interval.ms", "1500"),
                // librdkafka says when a partition is read to its end.
                ("enable.partition.eof", eof),
                // End offsets for the lag gauges, once a second.
                ("statistics.interval.ms", "1000"),
            ])
            .create_with_context(context)
            .map_err(JobError::kafka("create consumer"))?;
        if opts.all_partitions {
            let metadata = consumer
                .fetch_metadata(Some(&opts.topic), Duration::from_secs(30))
                .map_err(JobError::kafka(format!("list the partitions of {}", opts.topic)))?;
            let mut tpl = TopicPartitionList::new();
            for t in metadata.topics().iter().filter(|t| t.name() == opts.topic) {
                for p in t.partitions() {
                    tpl.add_partition(&opts.topic, p.id());
                }
            }
            if tpl.count() == 0 {
                return Err(JobError::Config { option: "topic", reason: format!("{} has no partitions at the broker", opts.topic) });
            }
            consumer.context().resume_from_lake(&mut tpl);
            consumer.assign(&tpl).map_err(JobError::kafka(format!("assign the partitions of {}", opts.topic)))?;
        } else {
            consumer.subscribe(&[&opts.topic]).map_err(JobError::kafka(format!("subscribe to {}", opts.topic)))?;
        }
        let writer = format!("{:08x}", std::collections::hash_map::RandomState::new().build_hasher().finish() as u32);
        let bar = if opts.progress {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        tracing::info!(writer, topic = opts.topic, group = opts.group, pipeline = opts.pipeline.name(), "consumer started");
        let summary = ConsumeSummary { writer: writer.clone(), ..Default::default() };
        let batch = Batch::new(&opts.pipeline);
        let lanes = Lanes::new(max_skew, opts.max_held);
        Ok(Ingest { opts, lake, handle, consumer, shared, writer, batch, lanes, summary, bar })
    }

    fn run(mut self, shutdown: &CancellationToken) -> Result<ConsumeSummary> {
        let start = Instant::now();
        let mut last_activity = Instant::now();
        // Joining the group can take seconds (a broker's initial rebalance delay): that is not
        // idleness, so until the first assignment the idle limit is at least JOIN_GRACE.
        let mut joined = false;
        let mut last_lag = Instant::now();
        while !shutdown.is_cancelled() {
            let incoming = match self.consumer.poll(Duration::from_millis(100)) {
                None => None,
                Some(Ok(m)) => Some(Incoming::judge(&m, &self.opts.pipeline)),
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    self.lanes.end(p);
                    None
                }
                Some(Err(e)) => {
                    self.on_kafka_error(e)?;
                    None
                }
            };
            if self.apply_reassignments()? {
                last_activity = Instant::now();
                joined = true;
            }
            if let Some(incoming) = incoming {
                self.opts.metrics.message();
                last_activity = Instant::now();
                self.arrive(incoming);
            }
            loop {
                let room = self.opts.batch_rows.saturating_sub(self.batch.messages());
                let released = self.release(room);
                let full = self.batch.messages() >= self.opts.batch_rows;
                let old = self.batch.opened_at().is_some_and(|t| t.elapsed() >= self.opts.batch_interval);
                if full || old {
                    self.flush()?;
                }
                if released < room {
                    break;
                }
            }
            self.flow();
            if last_lag.elapsed() >= LAG_EVERY {
                self.update_lag();
                last_lag = Instant::now();
            }
            let idle_limit = self.opts.exit_when_idle.map(|idle| if joined { idle } else { idle.max(JOIN_GRACE) });
            if idle_limit.is_some_and(|idle| last_activity.elapsed() >= idle) {
                tracing::info!("idle; stopping");
                break;
            }
            if self.opts.until_end && joined && !self.lanes.is_empty() && self.lanes.all_at_end() {
                tracing::info!("every partition is read to its end; stopping");
                break;
            }
        }
        // Ctrl-C or idle: what is buffered is committed before we leave the group.
        self.flush()?;
        self.consumer.unsubscribe();
        self.bar.finish_and_clear();
        self.summary.last_batch = lock(&self.shared).offsets.last_batch();
        self.summary.seconds = start.elapsed().as_secs_f64();
        self.summary.rows_per_sec = self.summary.rows as f64 / self.summary.seconds.max(1e-9);
        Ok(self.summary)
    }

    /// Sets each owned partition's lag (its end offset less the next offset the lake lacks) and
    /// the held-message gauges; once a second, not per message.
    fn update_lag(&self) {
        self.opts.metrics.set_held(self.lanes.held(), self.lanes.paused());
        let shared = lock(&self.shared);
        for p in self.lanes.partitions() {
            if let Some(high) = shared.high.get(&p) {
                let landed = shared.offsets.next_offset(p).unwrap_or(0);
                self.opts.metrics.set_lag(&self.opts.topic, p, high - landed);
            }
        }
    }

    fn on_kafka_error(&self, e: KafkaError) -> Result<()> {
        if let Some((code, reason)) = self.consumer.client().fatal_error() {
            return Err(JobError::Kafka { operation: format!("consume ({reason})"), source: KafkaError::MessageConsumption(code) });
        }
        // Transient: a broker restarting, a topic not created yet. librdkafka retries on its own.
        tracing::warn!(error = %e, "kafka");
        Ok(())
    }

    /// Acts on what the rebalance callback saw; returns whether anything changed.
    fn apply_reassignments(&mut self) -> Result<bool> {
        let (events, fatal) = {
            let mut shared = lock(&self.shared);
            (std::mem::take(&mut shared.events), shared.fatal.take())
        };
        if let Some(e) = fatal {
            return Err(e);
        }
        let changed = !events.is_empty();
        for event in events {
            match event {
                Reassigned::Revoked(partitions) => {
                    for p in partitions {
                        let held = self.lanes.revoke(p).map(|lane| self.dropped_lane(p, lane)).unwrap_or(0);
                        self.opts.metrics.forget(&self.opts.topic, p);
                        let dropped = self.batch.drop_partition(p) + held;
                        if dropped > 0 {
                            tracing::info!(partition = p, dropped, "revoked: dropping what was buffered, unwritten");
                        }
                        self.summary.dropped_on_rebalance += dropped as u64;
                    }
                }
                Reassigned::Assigned(partitions) => {
                    for (p, next) in partitions {
                        // Anything still buffered for it predates the lake's newest offsets.
                        let held = self.lanes.assign(p, next).map(|lane| self.dropped_lane(p, lane)).unwrap_or(0);
                        self.summary.dropped_on_rebalance += (self.batch.drop_partition(p) + held) as u64;
                    }
                }
            }
        }
        Ok(changed)
    }

    /// A lane dropped on a rebalance: resumes its partition if it was paused (the pause would
    /// outlive the assignment), and returns how many messages it held.
    fn dropped_lane(&self, partition: i32, lane: align::Lane<Incoming>) -> usize {
        if lane.is_paused() {
            self.set_paused(&[partition], false);
        }
        lane.held()
    }

    /// Pauses or resumes fetching `partitions`.
    fn set_paused(&self, partitions: &[i32], pause: bool) {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.opts.topic, p);
        }
        let result = if pause { self.consumer.pause(&tpl) } else { self.consumer.resume(&tpl) };
        match result {
            Ok(()) => tracing::debug!(?partitions, pause, "partitions paused or resumed: their messages run ahead in event time"),
            Err(e) => tracing::warn!(?partitions, pause, error = %e, "pause or resume failed"),
        }
    }

    /// Pauses the partitions whose lanes hold their share of messages, and resumes the drained.
    fn flow(&mut self) {
        let flow = self.lanes.flow();
        if !flow.pause.is_empty() {
            self.set_paused(&flow.pause, true);
        }
        if !flow.resume.is_empty() {
            self.set_paused(&flow.resume, false);
        }
    }

    /// Checks a message's offset against its lane and holds it there.
    fn arrive(&mut self, m: Incoming) {
        let Some(lane) = self.lanes.get_mut(m.partition) else {
            tracing::debug!(partition = m.partition, offset = m.offset, "message of a partition we do not own");
            return;
        };
        let expected = &mut lane.next;
        if expected.is_some_and(|next| m.offset < next) {
            // Already in the lake (a fetch from before the seek took effect).
            return;
        }
        // Offsets the broker no longer has cannot land: say so rather than skip them silently.
        // (Transaction markers and compaction also leave gaps; an idempotent producer does not.)
        let first = expected.unwrap_or(0);
        if m.offset > first {
            tracing::warn!(partition = m.partition, missing_from = first, missing_to = m.offset - 1, "offsets missing at the broker (retention?)");
        }
        *expected = Some(m.offset + 1);
        let time = m.parsed.as_ref().ok().and_then(|event| self.opts.pipeline.event_time(event));
        self.lanes.hold(m.partition, time, m);
    }

    /// Moves up to `room` messages the lanes release into the open batch; returns how many.
    fn release(&mut self, room: usize) -> usize {
        let batch = &mut self.batch;
        self.lanes.release(room, |partition, m| Self::accept(batch, partition, m))
    }

    fn accept(batch: &mut Batch, partition: i32, m: Incoming) {
        let buf = batch.partition(partition);
        match m.parsed {
            Ok(event) => buf.push_event(m.offset, &event),
            Err(dead) => {
                tracing::warn!(partition = dead.partition, offset = dead.offset, reason = dead.reason, "dead letter");
                buf.push_dead(dead)
            }
        }
    }

    /// Commits the open batch, retrying storage failures with backoff for up to
    /// `store_retry_for`; the batch stays in memory until it is committed, so a store outage
    /// delays ingest but loses nothing. Polling pauses meanwhile, which is the backpressure:
    /// librdkafka's prefetch queue and the lanes' held messages are bounded.
    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut delay = Duration::from_millis(250);
        let mut attempts = 0u32;
        let outcome = loop {
            attempts += 1;
            let result = {
                let mut shared = lock(&self.shared);
                self.handle.block_on(commit::commit_batch(&self.lake, &mut shared.offsets, &self.batch, &self.opts.topic, &self.writer))
            };
            match result {
                Ok(outcome) => {
                    if attempts > 1 {
                        tracing::info!(attempts, after = ?started.elapsed(), "batch committed after the object store recovered");
                    }
                    break outcome;
                }
                Err(e) if e.is_retryable() && started.elapsed() + delay <= self.opts.store_retry_for => {
                    tracing::warn!(error = %e, attempt = attempts, retry_in = ?delay, "batch commit failed (the batch stays in memory, no offset recorded); retrying");
                    self.opts.metrics.retried();
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
                Err(e) if e.is_retryable() => {
                    return Err(JobError::StoreDown { seconds: started.elapsed().as_secs(), attempts, messages: self.batch.messages(), source: Box::new(e) });
                }
                Err(e) => return Err(e),
            }
        };
        let batch = std::mem::replace(&mut self.batch, Batch::new(&self.opts.pipeline));
        for p in &outcome.dropped {
            self.summary.dropped_on_rebalance += batch.partitions.get(p).map(|b| b.rows() + b.dead.len()).unwrap_or(0) as u64;
            // Still ours (a zombie moment)? Resume where the lake now says.
            if self.lanes.get_mut(*p).is_some() {
                let next = lock(&self.shared).offsets.next_offset(*p);
                self.summary.dropped_on_rebalance += self.lanes.restart(*p, next) as u64;
                if let Some(next) = next
                    && let Err(e) = self.consumer.seek(&self.opts.topic, *p, Offset::Offset(next), Duration::from_secs(10))
                {
                    tracing::warn!(partition = p, error = %e, "seek after losing a commit race failed");
                }
            }
        }
        let Some(manifest) = outcome.manifest else { return Ok(()) };
        self.summary.batches += 1;
        self.summary.rows += manifest.rows;
        self.summary.dead_letters += manifest.dead_letter_count;
        self.opts.metrics.committed(manifest.rows, manifest.dead_letter_count);
        self.update_lag();
        tracing::info!(batch = manifest.batch, rows = manifest.rows, dead_letters = manifest.dead_letter_count, "batch committed");
        self.bar.set_message(format!("landed {} events in {} batches", self.summary.rows, self.summary.batches));
        // Only so that Kafka tools show the lag: the lake is what a restart resumes from.
        let mut tpl = TopicPartitionList::new();
        for (p, range) in &manifest.partitions {
            if self.lanes.get_mut(*p).is_some() {
                let _ = tpl.add_partition_offset(&self.opts.topic, *p, Offset::Offset(range.next()));
            }
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Async)
        {
            tracing::debug!(error = %e, "group offset commit failed (informational only)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::Int64Array;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    use super::*;

    fn movielens() -> Pipeline {
        Pipeline::builtin("movielens").unwrap().unwrap()
    }

    /// The loop against librdkafka's in-process mock broker: fast, and enough to show that a
    /// second run resumes from the lake. The real-broker tests live in the workspace's `tests/`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lands_every_message_once_and_resumes_from_the_lake() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("r", 2, 1).unwrap();
        let kafka = KafkaOptions { brokers: cluster.bootstrap_servers(), extra: vec![] };
        let pipeline = movielens();
        let send = |range: std::ops::Range<i64>| {
            let producer: BaseProducer = kafka.client_config(&[]).create().unwrap();
            for i in range {
                let payload = format!(r#"{{"userId":{},"movieId":{},"rating":4.0,"timestamp":{i}}}"#, 1 + i % 5, 100 + i);
                let key = (i % 5).to_string();
                producer.send(BaseRecord::to("r").key(&key).payload(&payload)).unwrap();
            }
            producer.send(BaseRecord::<str, str>::to("r").key("x").payload("{oops")).unwrap();
            producer.send(BaseRecord::<str, str>::to("r").key("x").payload(r#"{"userId":1,"movieId":1,"rating":4.2,"timestamp":1}"#)).unwrap();
            producer.flush(Duration::from_secs(10)).unwrap();
        };
        send(0..500);
        let dir = tempfile::tempdir().unwrap();
        let mut opts = ConsumeOptions::new(kafka.clone(), dir.path().to_str().unwrap(), pipeline);
        assert_eq!(opts.topic, "ratings", "the pipeline's topic unless told otherwise");
        opts.topic = "r".into();
        opts.batch_rows = 200;
        opts.exit_when_idle = Some(Duration::from_secs(6));
        let first = consume(opts.clone(), CancellationToken::new()).await.unwrap();
        assert_eq!((first.rows, first.dead_letters), (500, 2));
        assert!(first.batches >= 3, "200-message batches: {first:?}");

        send(500..700);
        let second = consume(opts, CancellationToken::new()).await.unwrap();
        assert_eq!((second.rows, second.dead_letters), (200, 2), "resumes after the lake's offsets");

        // The pipeline's folder inside the root holds the events.
        let lake = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap().child("movielens");
        let mut movies: Vec<i64> = vec![];
        for b in lake.read_all().await.unwrap() {
            let col = b.column_by_name("movie_id").unwrap().as_any().downcast_ref::<Int64Array>().unwrap().clone();
            movies.extend(col.values().iter().copied());
        }
        movies.sort_unstable();
        assert_eq!(movies, (100..800).collect::<Vec<_>>());
        let dead: Vec<DeadLetter> = lake
            .manifests()
            .await
            .unwrap()
            .iter()
            .flat_map(|m| m.dead_letters.iter().map(|d| d.path.clone()).collect::<Vec<_>>())
            .flat_map(|path| {
                let text = std::fs::read_to_string(dir.path().join("movielens").join(path)).unwrap();
                text.lines().map(|l| serde_json::from_str::<DeadLetter>(l).unwrap()).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(dead.len(), 4);
        assert!(dead.iter().any(|d| d.field.as_deref() == Some("rating") && d.reason.contains("4.2 is out of range")), "{dead:?}");
    }
}
