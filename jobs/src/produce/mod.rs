//! CSV → Kafka. Each good record becomes one JSON message (the pipeline's wire names) keyed by
//! the pipeline's key column, so one key's events stay in order on one partition; bad records
//! go to the rejects file. Every message's delivery report is awaited: the run fails if any
//! message was not acknowledged.
//!
//! - [`resume`]: the source and line every message carries, and how `--resume` finds the
//!   lines a topic already holds.

pub mod resume;

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::kafka::{KafkaOptions, ensure_topic};
use lensflow_core::Pipeline;

use crate::events_csv::{CsvLine, EventsCsv, RejectsFile};
use crate::{JobError, Result};

/// How fast to send.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Pace {
    /// As fast as the broker takes them.
    #[default]
    Unlimited,
    /// A fixed number of messages per second.
    Rate(f64),
    /// Replay the file's own timeline, `x` times faster than real time (needs a time column).
    Replay(f64),
}

/// What to produce, and where.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// The pipeline whose events the CSV holds.
    pub pipeline: Pipeline,
    /// The CSV, with a header naming the pipeline's columns by their wire names.
    pub input: PathBuf,
    /// Broker and client settings.
    pub kafka: KafkaOptions,
    /// Topic to send to [default: the pipeline's topic].
    pub topic: String,
    /// Partitions of the topic if it has to be created.
    pub partitions: i32,
    /// Replication factor of the topic if it has to be created.
    pub replication: i32,
    /// Sending pace.
    pub pace: Pace,
    /// Where rejected lines go; default `<input>.rejects.csv`.
    pub rejects: Option<PathBuf>,
    /// The name messages carry as their source [default: the input's file name].
    pub source: String,
    /// Send only the lines the topic does not hold yet (after a crash or an interrupted run).
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
}

impl ProduceOptions {
    /// Options for sending `pipeline`'s events in `input` to its topic, every other setting at
    /// its default.
    pub fn new(input: impl Into<PathBuf>, kafka: KafkaOptions, pipeline: Pipeline) -> Self {
        let input: PathBuf = input.into();
        ProduceOptions {
            source: input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            resume: false,
            input,
            kafka,
            topic: pipeline.topic().to_string(),
            pipeline,
            partitions: 3,
            replication: 1,
            pace: Pace::Unlimited,
            rejects: None,
            progress: false,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |option, reason: String| Err(JobError::Config { option, reason });
        match self.pace {
            Pace::Rate(r) if !(r.is_finite() && r > 0.0) => return bad("rate", format!("{r} is not a positive number")),
            Pace::Replay(x) if !(x.is_finite() && x > 0.0) => {
                return bad("replay-speed", format!("{x} is not a positive number"));
            }
            Pace::Replay(_) if self.pipeline.definition.events.time.is_none() => {
                return bad("replay-speed", format!("pipeline {} has no time column to replay", self.pipeline.name()));
            }
            _ => {}
        }
        if self.topic.is_empty() {
            return bad("topic", "is empty".into());
        }
        if self.source.is_empty() {
            return bad("source", "is empty".into());
        }
        if !self.input.is_file() {
            return bad("input", format!("{} is not a readable file", self.input.display()));
        }
        // A header without the pipeline's columns fails here, before any connection is opened.
        EventsCsv::open(&self.input, &self.pipeline)?;
        Ok(())
    }
}

/// What a produce run did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProduceSummary {
    /// Lines read, header and rejects included.
    pub lines: u64,
    /// Messages handed to the producer.
    pub sent: u64,
    /// Good lines not sent because the topic held them already (with `resume`, or after a
    /// failed delivery).
    pub skipped: u64,
    /// Times deliveries failed and the run resumed from what the topic held.
    pub resumes: u32,
    /// Messages the broker acknowledged.
    pub delivered: u64,
    /// Messages that failed delivery.
    pub failed: u64,
    /// Lines rejected as malformed.
    pub rejected: u64,
    /// The rejects file, if any line was rejected.
    pub rejects_file: Option<PathBuf>,
    /// Whether the run was stopped early (Ctrl-C).
    pub interrupted: bool,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Delivered messages per second.
    pub messages_per_sec: f64,
}

/// Counts delivery reports and keeps the first failure with its CSV line.
#[derive(Default)]
struct DeliveryCounter {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    /// The CSV line number, so a failure can be traced to its input.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, line: usize) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((err, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_failure.lock() {
                    first.get_or_insert_with(|| format!("line {line}: {err}"));
                }
            }
        }
    }
}

/// Sends the events of `opts.input` to Kafka; stops early (after flushing) when `shutdown` fires.
pub async fn produce(opts: ProduceOptions, shutdown: CancellationToken) -> Result<ProduceSummary> {
    opts.validate()?;
    ensure_topic(&opts.kafka, &opts.topic, opts.partitions, opts.replication).await?;
    tokio::task::spawn_blocking(move || produce_blocking(&opts, &shutdown)).await.map_err(|e| JobError::Internal(format!("producer thread: {e}")))?
}

/// Tries of one run: the first, then resumptions after failed deliveries.
const ATTEMPTS: u32 = 6;

/// Sends the file, and when deliveries fail (a broker restarting or failing over) resumes from
/// what the topic holds, with backoff, before giving up.
fn produce_blocking(opts: &ProduceOptions, shutdown: &CancellationToken) -> Result<ProduceSummary> {
    let start = Instant::now();
    let mut resume = opts.resume;
    let mut delay = Duration::from_secs(1);
    let mut attempt = 1;
    loop {
        match send_file(opts, shutdown, resume, start) {
            Ok(summary) => return Ok(ProduceSummary { resumes: attempt - 1, ..summary }),
            Err(e @ JobError::Undelivered { .. }) if attempt < ATTEMPTS && !shutdown.is_cancelled() => {
                tracing::warn!(error = %e, attempt, retry_in = ?delay, "deliveries failed; resuming from the lines the topic holds");
                std::thread::sleep(delay);
                delay *= 2;
                resume = true;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One pass over the file, skipping the lines the topic holds when `resume` is set.
fn send_file(opts: &ProduceOptions, shutdown: &CancellationToken, resume: bool, start: Instant) -> Result<ProduceSummary> {
    let producer: ThreadedProducer<DeliveryCounter> = opts
        .kafka
        .client_config(&[
            // Idempotence: a retried send can never land twice in the topic.
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "200000"),
            ("message.timeout.ms", "120000"),
        ])
        .create_with_context(DeliveryCounter::default())
        .map_err(JobError::kafka("create producer"))?;

    let total_bytes = std::fs::metadata(&opts.input).map(|m| m.len()).unwrap_or(0);
    let landed = match resume {
        // A line takes at least two bytes, so no line number exceeds the file's size.
        true => resume::find_landed(&opts.kafka, &opts.topic, &opts.source, total_bytes + 1)?,
        false => resume::Landed::default(),
    };
    let source_json = serde_json::Value::from(opts.source.as_str()).to_string();
    let pipeline = &opts.pipeline;
    let mut csv = EventsCsv::open(&opts.input, pipeline)?;
    let mut rejects = RejectsFile::new(opts.rejects.clone().unwrap_or_else(|| RejectsFile::beside(&opts.input)));
    let bar = if opts.progress { crate::progress_bar(total_bytes, "produce") } else { indicatif::ProgressBar::hidden() };
    let (mut lines, mut sent, mut skipped) = (0u64, 0u64, 0u64);
    let mut first_ts: Option<i64> = None;
    let mut interrupted = false;

    while let Some(line) = csv.next_line()? {
        lines += 1;
        let (line_no, event) = match line {
            CsvLine::Event { line, event } => (line, event),
            CsvLine::Reject(reject) => {
                tracing::warn!(line = reject.line, reason = %reject.reason, "rejected CSV record");
                rejects.write(&reject)?;
                continue;
            }
        };
        if shutdown.is_cancelled() {
            interrupted = true;
            break;
        }
        // Pacing: sleep until this message's slot on the chosen timeline.
        let due = match opts.pace {
            Pace::Unlimited => None,
            Pace::Rate(r) => Some(Duration::from_secs_f64(sent as f64 / r)),
            Pace::Replay(x) => {
                // validate() refused replay without a time column; every event has its time.
                let ts = pipeline.event_time(&event).unwrap_or(0);
                let t0 = *first_ts.get_or_insert(ts);
                Some(Duration::from_secs_f64((ts - t0).max(0) as f64 / x))
            }
        };
        if let Some(wait) = due.and_then(|d| d.checked_sub(start.elapsed())) {
            std::thread::sleep(wait.min(Duration::from_secs(1)));
        }
        if landed.holds(line_no) {
            skipped += 1;
            continue;
        }
        // A failed delivery (a broker restarting) ends this attempt early: the next one
        // resumes from what the topic holds instead of sending into the failure.
        if sent % 1024 == 0 && producer.context().failed.load(Ordering::Relaxed) > 0 {
            break;
        }
        let key = pipeline.event_key(&event);
        let payload = pipeline.event_to_json(&event);
        let payload = resume::labelled(payload, &source_json, line_no);
        let mut record = BaseRecord::with_opaque_to(&opts.topic, line_no as usize).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                // The local queue is full: let deliveries drain, then try the same record again.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => return Err(JobError::kafka(format!("send line {line_no}"))(e)),
            }
        }
        sent += 1;
        if sent % 4096 == 0 {
            bar.set_position(csv.bytes_read());
        }
    }
    bar.finish_and_clear();
    // Wait for every delivery report; a broker that stops answering fails the run, not hangs it.
    producer.flush(Duration::from_secs(300)).map_err(JobError::kafka("flush producer"))?;
    let ctx = producer.context();
    let delivered = ctx.delivered.load(Ordering::Relaxed);
    let reported_failed = ctx.failed.load(Ordering::Relaxed);
    // A message with no report at all after the flush counts as failed too.
    let failed = reported_failed + sent.saturating_sub(delivered + reported_failed);
    let first_failure = ctx.first_failure.lock().ok().and_then(|f| f.clone());
    let rejected = rejects.count();
    let rejects_file = rejects.finish()?;
    let seconds = start.elapsed().as_secs_f64();
    if failed > 0 {
        return Err(JobError::Undelivered { failed, sent, first: first_failure.unwrap_or_else(|| "no delivery report before the flush timeout".into()) });
    }
    Ok(ProduceSummary {
        lines,
        sent,
        skipped,
        resumes: 0,
        delivered,
        failed,
        rejected,
        rejects_file,
        interrupted,
        seconds,
        messages_per_sec: if seconds > 0.0 { delivered as f64 / seconds } else { 0.0 },
    })
}

#[cfg(test)]
mod tests {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::mocking::MockCluster;

    use super::*;

    fn builtin(name: &str) -> Pipeline {
        Pipeline::builtin(name).unwrap().unwrap()
    }

    #[test]
    fn the_topic_defaults_to_the_pipelines_and_bad_settings_are_refused_early() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("h.csv");
        std::fs::write(&input, "x,y\n1,2\n").unwrap();
        let opts = ProduceOptions::new(&input, KafkaOptions::default(), builtin("smart-home"));
        assert_eq!(opts.topic, "smart-home-devices");
        let err = opts.validate().unwrap_err().to_string();
        assert!(err.contains("h.csv: line 1: bad header") && err.contains("UserID,DeviceType"), "{err}");
        let replay = ProduceOptions { pace: Pace::Replay(10.0), ..opts };
        assert!(replay.validate().unwrap_err().to_string().contains("no time column"));
    }

    /// What the consumer parses is exactly what the producer read: 17-digit floats included
    /// (serde_json's default parser is one ULP off on this one from the smart-home file).
    #[test]
    fn payloads_round_trip_floats_exactly() {
        let p = builtin("smart-home");
        let header: Vec<&str> = p.csv_header();
        let layout = p.csv_layout(header.iter().map(|s| s.as_bytes())).unwrap();
        let row = ["1008", "Lights", "12.460537449918117", "2.0346836077196553", "0", "0", "40", "0"];
        let event = p.event_from_csv(&layout, row.iter().map(|s| s.as_bytes())).unwrap();
        assert_eq!(event.0[2], lensflow_core::pipeline::event::Value::Float(12.460537449918117));
        assert_eq!(p.event_from_json(p.event_to_json(&event).as_bytes()).unwrap(), event);
    }

    /// Against librdkafka's in-process mock broker: keys and payloads follow the pipeline, and
    /// a bad record is rejected naming its line and field while the good ones still go out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_each_good_record_keyed_by_the_pipelines_key() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("smart-home-devices", 1, 1).unwrap();
        let kafka = KafkaOptions { brokers: cluster.bootstrap_servers(), extra: vec![] };
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("h.csv");
        std::fs::write(
            &input,
            "UserID,DeviceType,UsageHoursPerDay,EnergyConsumption,UserPreferences,MalfunctionIncidents,DeviceAgeMonths,SmartHomeEfficiency\n\
             7,Lights,1.5,2.25,1,0,12,1\n\
             8,Toaster,1.5,2.25,1,0,12,1\n\
             9,Camera,3,4,0,2,30,0\n",
        )
        .unwrap();
        let mut opts = ProduceOptions::new(&input, kafka.clone(), builtin("smart-home"));
        opts.partitions = 1;
        let summary = produce(opts, CancellationToken::new()).await.unwrap();
        assert_eq!((summary.sent, summary.delivered, summary.rejected), (2, 2, 1));
        let rejects = std::fs::read_to_string(summary.rejects_file.unwrap()).unwrap();
        // The reason lists the allowed values, with commas, so the CSV writer quotes it.
        assert!(rejects.lines().nth(1).is_some_and(|l| l.starts_with("3,\"field `DeviceType`: Toaster is out of range")), "{rejects}");

        let consumer: BaseConsumer = kafka.client_config(&[("group.id", "t"), ("auto.offset.reset", "earliest")]).create().unwrap();
        consumer.subscribe(&["smart-home-devices"]).unwrap();
        let mut got = vec![];
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < 2 && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                got.push((m.key().map(|k| String::from_utf8_lossy(k).into_owned()), m.payload().map(|p| String::from_utf8_lossy(p).into_owned())));
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0.as_deref(), Some("7"));
        let first: serde_json::Value = serde_json::from_str(got[0].1.as_deref().unwrap()).unwrap();
        assert_eq!(first["DeviceType"], "Lights");
        assert_eq!(first["EnergyConsumption"], 2.25);
        assert_eq!(got[1].0.as_deref(), Some("9"));
    }
}
