//! `lensflow demo`: the whole pipeline on one machine with nothing installed.
//!
//! ```text
//! generate (or --input) ─▶ embedded Kafka (librdkafka's mock cluster) ─▶ consume ─▶ <data-dir>/lake
//!     ─▶ train, one round per batch (DataFusion in-process) ─▶ <data-dir>/models ─▶ serve on --bind
//! ```
//!
//! Any pipeline runs the same way (`--pipeline`): its events come from `--input`, or, for a
//! pipeline whose events are MovieLens-shaped ratings, from the built-in generator. The events
//! are split into `rounds` batches, so the rounds are cumulative as in production.
//! A second run finds the lake and models of the first: by default it keeps them (training any
//! batch that lacks its round) and serves; `--fresh` deletes them and starts over. It never
//! re-sends ratings into a lake that has them, because the new embedded broker's offsets start
//! again at zero and would be taken for ones the lake already holds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lensflow_api::{ApiError, ServeOptions};
use lensflow_core::{Lake, Pipeline, StorageOptions};
use lensflow_jobs::JobError;
use lensflow_jobs::consume::{ConsumeOptions, consume};
use lensflow_jobs::generate::{GenerateOptions, generate};
use lensflow_jobs::kafka::KafkaOptions;
use lensflow_jobs::produce::{ProduceOptions, produce};
use lensflow_jobs::train::{RoundReport, TrainOptions, train};
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::report;

/// Settings of `lensflow demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The pipeline to run.
    pub pipeline: Pipeline,
    /// Where the lake, the models and generated ratings go.
    pub data_dir: PathBuf,
    /// A ratings CSV to use instead of generated ratings.
    pub input: Option<PathBuf>,
    /// How many ratings to generate when there is no input.
    pub ratings: u64,
    /// Seed of the generated ratings.
    pub seed: u64,
    /// Training rounds (= batches the ratings are split into).
    pub rounds: u64,
    /// Delete an earlier run's lake and models first.
    pub fresh: bool,
    /// Where the API and page listen.
    pub bind: SocketAddr,
    /// Stop once the rounds are trained instead of serving.
    pub exit_after_train: bool,
    /// Show progress bars.
    pub progress: bool,
}

impl DemoOptions {
    /// Defaults: 300,000 generated ratings in 3 rounds, served on 127.0.0.1:5000.
    pub fn new(pipeline: Pipeline, data_dir: impl Into<PathBuf>) -> DemoOptions {
        DemoOptions {
            pipeline,
            data_dir: data_dir.into(),
            input: None,
            ratings: 300_000,
            seed: 42,
            rounds: 3,
            fresh: false,
            bind: SocketAddr::from(([127, 0, 0, 1], 5000)),
            exit_after_train: false,
            progress: false,
        }
    }
}

/// What can stop the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A pipeline stage failed.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The server failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The embedded broker could not start.
    #[error("embedded Kafka broker: {0}")]
    Broker(#[from] rdkafka::error::KafkaError),
    /// A file or folder of the data directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The options make no sense.
    #[error("{0}")]
    Config(String),
    /// The generator thread died.
    #[error("generating ratings: {0}")]
    Generator(#[from] tokio::task::JoinError),
    /// Fewer messages landed than the embedded broker took.
    #[error("{delivered} messages were delivered to the embedded broker but {landed} landed in the lake")]
    Lost {
        /// Messages the broker acknowledged.
        delivered: u64,
        /// Ratings and dead letters in the lake.
        landed: u64,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io { path: path.to_path_buf(), source }
}

/// Fewest partitions of that topic, as a small production topic would have.
const MIN_PARTITIONS: i32 = 3;
/// Most messages the demo puts in one partition of the embedded broker. librdkafka's mock
/// broker keeps only about 5 MB or 100,000 messages per partition and silently drops the
/// oldest beyond that, so a big file is spread over more partitions to keep every message.
const MESSAGES_PER_PARTITION: u64 = 40_000;
/// Most bytes of messages the demo puts in one partition, well under the mock's 5 MB.
const BYTES_PER_PARTITION: u64 = 3 << 20;

/// Partitions enough that no partition of the embedded broker outgrows what it keeps. A
/// message is about three times its CSV line (JSON names) plus its source and line label.
fn demo_partitions(lines: u64, file_bytes: u64) -> i32 {
    let message_bytes = 3 * file_bytes / lines.max(1) + 48;
    let by_count = lines.div_ceil(MESSAGES_PER_PARTITION);
    let by_bytes = (lines * message_bytes).div_ceil(BYTES_PER_PARTITION);
    (by_count.max(by_bytes) as i32).max(MIN_PARTITIONS)
}

/// Runs the demo until it has served (Ctrl-C) or, with `exit_after_train`, trained. Returns the
/// rounds trained in this run.
pub async fn run(opts: DemoOptions, shutdown: CancellationToken, mut on_round: impl FnMut(&RoundReport)) -> Result<u64, DemoError> {
    if opts.rounds == 0 {
        return Err(DemoError::Config("--rounds must be at least 1".into()));
    }
    let name = opts.pipeline.name().to_string();
    let (lake_dir, models_dir) = (opts.data_dir.join("lake"), opts.data_dir.join("models"));
    if opts.fresh {
        // Only this pipeline's folders: another pipeline's lake and models stay.
        for dir in [&lake_dir.join(&name), &models_dir.join(&name)] {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(io(dir))?;
                println!("removed {}", dir.display());
            }
        }
    }
    std::fs::create_dir_all(&opts.data_dir).map_err(io(&opts.data_dir))?;
    let root = Lake::open(&lake_dir.to_string_lossy(), &StorageOptions::default()).map_err(JobError::from)?;
    let lake = root.child(&name);
    let landed = lake.manifests().await.map_err(JobError::from)?;
    if landed.is_empty() {
        ingest(&opts, root.url(), &shutdown).await?;
    } else {
        let rows: u64 = landed.iter().map(|m| m.rows).sum();
        println!("reusing {} from an earlier run: {} batches, {rows} events (run with --fresh to start over)", lake.url(), landed.len());
    }
    if shutdown.is_cancelled() {
        return Ok(0);
    }

    println!("\n== training: one cumulative round per batch, on DataFusion in-process");
    let models = models_dir.to_string_lossy().into_owned();
    let trained = train(TrainOptions::new(opts.pipeline.clone(), root.url(), models.clone()), shutdown.clone(), |r| {
        println!("{}", report::round(r));
        on_round(r);
    })
    .await?;
    if trained == 0 && !shutdown.is_cancelled() {
        println!("every batch already has its round");
    }
    if opts.exit_after_train || shutdown.is_cancelled() {
        return Ok(trained);
    }

    let mut serve = ServeOptions::new(models);
    serve.default_pipeline = name;
    serve.lake = Some(root.url().to_string());
    let listener = tokio::net::TcpListener::bind(opts.bind).await.map_err(|source| ApiError::Serve { addr: opts.bind.to_string(), source })?;
    let addr = listener.local_addr().map_err(io(Path::new("socket")))?;
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    println!("\n== serving: open http://{host}:{}/ (API docs at /docs); Ctrl-C to stop", addr.port());
    lensflow_api::serve(serve, listener, shutdown).await?;
    Ok(trained)
}

/// Events → embedded broker → lake, in `opts.rounds` batches.
async fn ingest(opts: &DemoOptions, lake: &str, shutdown: &CancellationToken) -> Result<(), DemoError> {
    let input = match &opts.input {
        Some(path) => path.clone(),
        // The generator writes MovieLens-shaped ratings: it can stand in for any pipeline whose
        // events have exactly those columns, and for no other.
        None if opts.pipeline.csv_header().join(",") != lensflow_jobs::generate::CSV_HEADER => {
            return Err(DemoError::Config(format!(
                "pipeline {} needs --input FILE: a CSV with the columns {} (the built-in generator writes MovieLens ratings)",
                opts.pipeline.name(),
                opts.pipeline.csv_header().join(",")
            )));
        }
        None => {
            let path = opts.data_dir.join("ratings.csv");
            println!("== generating {} ratings (seed {}) into {}", opts.ratings, opts.seed, path.display());
            let settings = GenerateOptions { ratings: opts.ratings, seed: opts.seed, progress: opts.progress, ..Default::default() };
            let file = std::fs::File::create(&path).map_err(io(&path))?;
            let summary = tokio::task::spawn_blocking(move || generate(&settings, file)).await??;
            println!("{} ratings by {} users of {} movies", summary.ratings, summary.users, summary.movies);
            path
        }
    };
    let lines = count_lines(&input)?;

    // librdkafka's in-process mock broker: a real Kafka protocol endpoint on loopback, gone when
    // the demo's ingest is done (the lake, not the broker, is what lasts).
    let file_bytes = std::fs::metadata(&input).map_err(io(&input))?.len();
    let partitions = demo_partitions(lines, file_bytes);
    let topic = opts.pipeline.topic().to_string();
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(&topic, partitions, 1)?;
    let kafka = KafkaOptions { brokers: cluster.bootstrap_servers(), extra: vec![] };
    println!("\n== producing {} to the embedded Kafka broker at {} ({partitions} partitions)", input.display(), kafka.brokers);
    let mut produce_opts = ProduceOptions::new(&input, kafka.clone(), opts.pipeline.clone());
    produce_opts.topic = topic.clone();
    produce_opts.partitions = partitions;
    produce_opts.rejects = Some(opts.data_dir.join(format!("{}.rejects.csv", opts.pipeline.name())));
    produce_opts.progress = opts.progress;
    let produced = produce(produce_opts, shutdown.clone()).await?;
    println!("{}", report::produce(&produced));
    if shutdown.is_cancelled() {
        return Ok(());
    }

    println!("\n== consuming into the lake at {lake}, {} batches", opts.rounds);
    let mut consume_opts = ConsumeOptions::new(kafka, lake, opts.pipeline.clone());
    consume_opts.topic = topic;
    consume_opts.batch_rows = lines.div_ceil(opts.rounds).max(1) as usize;
    // Batches close on size; the last, short one when every partition is read to its end. The
    // demo's consumer is alone: it reads every partition without waiting for a group to form.
    consume_opts.batch_interval = Duration::from_secs(3600);
    consume_opts.until_end = true;
    consume_opts.all_partitions = true;
    consume_opts.progress = opts.progress;
    let consumed = consume(consume_opts, shutdown.clone()).await?;
    println!("{}", report::consume(&consumed));
    drop(cluster);
    let landed = consumed.rows + consumed.dead_letters;
    if !shutdown.is_cancelled() && landed != produced.delivered {
        return Err(DemoError::Lost { delivered: produced.delivered, landed });
    }
    Ok(())
}

/// Data lines of a CSV (its lines but the header).
fn count_lines(path: &Path) -> Result<u64, DemoError> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut lines = 0u64;
    for line in std::io::BufReader::new(file).split(b'\n') {
        line.map_err(io(path))?;
        lines += 1;
    }
    Ok(lines.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_keep_each_under_what_the_embedded_broker_keeps() {
        // 1M generated ratings: 26 bytes a line, about 126 a message.
        let partitions = demo_partitions(1_000_000, 26_000_000) as u64;
        assert!(1_000_000 * 126 / partitions <= BYTES_PER_PARTITION, "{partitions}");
        assert!(1_000_000 / partitions <= MESSAGES_PER_PARTITION);
        // A tiny file still gets a production-like topic; an empty one does not divide by zero.
        assert_eq!(demo_partitions(10, 300), MIN_PARTITIONS);
        assert_eq!(demo_partitions(0, 0), MIN_PARTITIONS);
    }
}
