//! The one `lensflow` binary: parses the command line, sets up logging and Ctrl-C, and calls the
//! library. Every flag also reads an environment variable (shown in `--help`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lensflow::demo::DemoOptions;
use lensflow::report;
use lensflow_api::{Limits, ServeOptions};
use lensflow_executor::ExecutorOptions;
use lensflow_jobs::compact::{CompactOptions, compact};
use lensflow_jobs::consume::{ConsumeOptions, ConsumeSummary, consume};
use lensflow_jobs::generate::{GenerateOptions, generate};
use lensflow_jobs::kafka::KafkaOptions;
use lensflow_jobs::produce::{Pace, ProduceOptions, ProduceSummary, produce};
use lensflow_jobs::train::{RoundReport, TrainOptions, train};
use lensflow_jobs::{Pipeline, StorageOptions};
use lensflow_scheduler::SchedulerOptions;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "lensflow", version, about = "Ratings from Kafka into a Parquet lake, models trained on Ballista, served over REST")]
struct Cli {
    /// Log filter, e.g. `info`, `lensflow_jobs=debug`.
    #[arg(long, global = true, env = "LENSFLOW_LOG", default_value = "info")]
    log: String,
    /// Log lines as `text` (coloured only on a terminal) or `json` (one object per line, for log shippers).
    #[arg(long, global = true, env = "LENSFLOW_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a MovieLens-like ratings CSV (deterministic for a seed).
    Generate(GenerateArgs),
    /// Send a pipeline's CSV to Kafka, one JSON message per event, keyed by its key column.
    Produce(ProduceArgs),
    /// Land a pipeline's events from Kafka in the Parquet lake, exactly once.
    Consume(ConsumeArgs),
    /// List the built-in pipelines, or check a pipeline folder (`pipelines check PATH`).
    Pipelines(PipelinesArgs),
    /// Train the three models, one cumulative round per batch (DataFusion in-process or Ballista).
    Train(TrainArgs),
    /// Run SQL over the lake's committed batches and the served rounds' lookup tables, like spark-sql.
    Sql(SqlArgs),
    /// Run a Ballista scheduler with lensflow's setup.
    Scheduler(SchedulerArgs),
    /// Run a Ballista executor with lensflow's setup.
    Executor(ExecutorArgs),
    /// Serve predictions from the newest round over REST, with a web page at `/`.
    Serve(ServeArgs),
    /// Everything on one machine: ratings → embedded Kafka → lake → 3 rounds → API and page.
    Demo(DemoArgs),
    /// Look after a lake (`lake compact`).
    Lake(LakeArgs),
}

#[derive(Args)]
struct LakeArgs {
    #[command(subcommand)]
    action: LakeAction,
}

#[derive(Subcommand)]
enum LakeAction {
    /// Rewrite the small event files of trained batches into one file per partition; readers
    /// see the same events. Safe beside a running consumer and trainer.
    Compact(CompactArgs),
}

#[derive(Args)]
struct CompactArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The lake's root (as for consume).
    #[arg(long, env = "LENSFLOW_LAKE", default_value = "data/lake")]
    lake: String,
    /// The model store's root: only batches its LATEST round has trained on are compacted.
    #[arg(long, env = "LENSFLOW_MODELS", default_value = "data/models")]
    models: String,
    /// Compact only when at least this many event files would be replaced.
    #[arg(long, env = "LENSFLOW_COMPACT_MIN_FILES", default_value_t = 32)]
    min_files: usize,
    /// Remove replaced files once their compaction is older than this (longer than any round
    /// or query that may still read them).
    #[arg(long, env = "LENSFLOW_COMPACT_GRACE", value_parser = humantime::parse_duration, default_value = "15m")]
    grace: Duration,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Folder for the lake (`lake/`), the models (`models/`) and generated ratings.
    #[arg(long, env = "LENSFLOW_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// A CSV of the pipeline's events [default: generated ratings, for movielens].
    #[arg(long, env = "LENSFLOW_INPUT")]
    input: Option<PathBuf>,
    /// Ratings to generate when there is no --input.
    #[arg(long, env = "LENSFLOW_RATINGS", default_value_t = 300_000)]
    ratings: u64,
    /// Seed of the generated ratings.
    #[arg(long, env = "LENSFLOW_SEED", default_value_t = 42)]
    seed: u64,
    /// Training rounds: the ratings land in this many batches, one round each.
    #[arg(long, env = "LENSFLOW_ROUNDS", default_value_t = 3)]
    rounds: u64,
    /// Delete an earlier run's lake and models and start over [default: keep and reuse them].
    #[arg(long, env = "LENSFLOW_FRESH")]
    fresh: bool,
    /// Address of the API and web page.
    #[arg(long, env = "LENSFLOW_API_BIND", default_value = "127.0.0.1:5000")]
    bind: std::net::SocketAddr,
    /// Stop once the rounds are trained instead of serving (for scripts and tests).
    #[arg(long, env = "LENSFLOW_EXIT_AFTER_TRAIN")]
    exit_after_train: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// The model store's root `lensflow train` writes to (as for train); every pipeline found
    /// there is served.
    #[arg(long, env = "LENSFLOW_MODELS", default_value = "data/models")]
    models: String,
    /// The pipeline the original routes (`/predict`, `/models`, `/status`, …) answer for; the
    /// others answer under `/pipelines/<name>/…`.
    #[arg(long, alias = "pipeline", env = "LENSFLOW_PIPELINE", default_value = "movielens")]
    default_pipeline: String,
    /// The lake's root, for the pipeline status [default: the lake each served round was trained on].
    #[arg(long, env = "LENSFLOW_LAKE")]
    lake: Option<String>,
    /// Address to serve on (loopback by default; bind wider on purpose, e.g. 0.0.0.0:5000).
    #[arg(long, env = "LENSFLOW_API_BIND", default_value = "127.0.0.1:5000")]
    bind: std::net::SocketAddr,
    /// How often to look for a new round (e.g. 2s).
    #[arg(long, env = "LENSFLOW_MODEL_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "2s")]
    poll_interval: Duration,
    /// Largest request body in bytes.
    #[arg(long, env = "LENSFLOW_API_BODY_LIMIT", default_value_t = 2 << 20)]
    body_limit: usize,
    /// Most requests in one batch.
    #[arg(long, env = "LENSFLOW_API_MAX_BATCH", default_value_t = 10_000)]
    max_batch: usize,
    /// Answer 408 to a request that takes longer than this (e.g. 10s).
    #[arg(long, env = "LENSFLOW_API_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    request_timeout: Duration,
    /// Most requests handled at once; more wait for a turn, up to the request timeout.
    #[arg(long, env = "LENSFLOW_MAX_CONCURRENT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent: u32,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The lake's root to read batches from (as for consume).
    #[arg(long, env = "LENSFLOW_LAKE", default_value = "data/lake")]
    lake: String,
    /// The model store's root: a local path, file:///abs/path or s3://bucket/prefix; the
    /// pipeline's rounds go to `<root>/<pipeline>/`.
    #[arg(long, env = "LENSFLOW_MODELS", default_value = "data/models")]
    models: String,
    /// A Ballista scheduler, df://HOST:PORT, or `standalone` for Ballista in-process
    /// [default: DataFusion in-process, the same SQL without Ballista's job overhead].
    #[arg(long, env = "LENSFLOW_SCHEDULER")]
    scheduler: Option<String>,
    /// Print one JSON object per round instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep training as new batches land (until Ctrl-C).
    #[arg(long, env = "LENSFLOW_WATCH")]
    watch: bool,
    /// How often --watch looks for new batches (e.g. 5s).
    #[arg(long, env = "LENSFLOW_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    poll_interval: Duration,
    /// Query partitions per stage.
    #[arg(long, env = "LENSFLOW_TRAIN_PARTITIONS", default_value_t = 4)]
    partitions: usize,
    /// Fail a round whose single query runs longer than this (e.g. 10m).
    #[arg(long, env = "LENSFLOW_QUERY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10m")]
    query_timeout: Duration,
    /// Recompute every event's features instead of carrying state from the last round (the
    /// state is rebuilt, and later rounds carry it again).
    #[arg(long, env = "LENSFLOW_TRAIN_FULL")]
    full: bool,
    /// Recompute everything when late events change more than this share of the stored
    /// state rows (carrying state then costs as much).
    #[arg(long, env = "LENSFLOW_TRAIN_FULL_ABOVE", default_value_t = 0.5)]
    full_above: f64,
    /// Fit and evaluate the models on the newest this many batches only: rounds then cost
    /// about the same however large the lake grows. Features and lookup tables still read
    /// every batch. [default: every batch, as a full refit and Spark do]
    #[arg(long, env = "LENSFLOW_TRAIN_WINDOW", value_parser = clap::value_parser!(u64).range(1..))]
    window: Option<u64>,
    /// Serve the trainer's Prometheus metrics at http://ADDR/metrics (empty: none). An address
    /// already taken (another trainer) is logged and training goes on.
    #[arg(long, env = "LENSFLOW_TRAIN_METRICS_BIND", default_value = "127.0.0.1:9465")]
    metrics_bind: String,
}

#[derive(Args)]
struct SchedulerArgs {
    /// Address to serve on (loopback by default: the scheduler runs any SQL it is sent, with the
    /// executors' credentials, and has no authentication).
    #[arg(long, env = "LENSFLOW_SCHEDULER_BIND", default_value = "127.0.0.1:50050")]
    bind: std::net::SocketAddr,
    /// Host name executors and clients reach the scheduler by.
    #[arg(long, env = "LENSFLOW_SCHEDULER_EXTERNAL_HOST", default_value = "localhost")]
    external_host: String,
    /// Seconds without a heartbeat before an executor counts as lost (its tasks rerun elsewhere).
    #[arg(long, env = "LENSFLOW_EXECUTOR_TIMEOUT", default_value_t = 20)]
    executor_timeout: u64,
}

#[derive(Args)]
struct ExecutorArgs {
    /// The scheduler, HOST:PORT.
    #[arg(long, env = "LENSFLOW_SCHEDULER_ADDR", default_value = "127.0.0.1:50050")]
    scheduler: String,
    /// Address of the executor's Flight service (loopback by default; a cluster binds wider on purpose).
    #[arg(long, env = "LENSFLOW_EXECUTOR_BIND", default_value = "127.0.0.1:50051")]
    bind: std::net::SocketAddr,
    /// Port of the executor's gRPC service.
    #[arg(long, env = "LENSFLOW_EXECUTOR_GRPC_PORT", default_value_t = 50052)]
    grpc_port: u16,
    /// Host name others reach this executor by [default: its address as the scheduler sees it].
    #[arg(long, env = "LENSFLOW_EXECUTOR_EXTERNAL_HOST")]
    external_host: Option<String>,
    /// Tasks run at once (0: one per core).
    #[arg(long, env = "LENSFLOW_CONCURRENT_TASKS", default_value_t = 0)]
    concurrent_tasks: usize,
    /// Folder for shuffle files [default: a temporary folder].
    #[arg(long, env = "LENSFLOW_EXECUTOR_WORK_DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    /// Number of ratings.
    #[arg(long, env = "LENSFLOW_RATINGS", default_value_t = 100_000)]
    ratings: u64,
    /// Random seed; the same seed gives the same file.
    #[arg(long, env = "LENSFLOW_SEED", default_value_t = 42)]
    seed: u64,
    /// Output CSV file.
    #[arg(long, env = "LENSFLOW_OUT")]
    out: PathBuf,
    /// Number of users [default: ratings / 150].
    #[arg(long, env = "LENSFLOW_USERS")]
    users: Option<u32>,
    /// Number of movies [default: ratings / 11, at most 30,000].
    #[arg(long, env = "LENSFLOW_MOVIES")]
    movies: Option<u32>,
}

#[derive(Args, Clone)]
struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "LENSFLOW_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Topic of the events [default: the pipeline's topic].
    #[arg(long, env = "LENSFLOW_TOPIC")]
    topic: Option<String>,
    /// Extra librdkafka setting, KEY=VALUE (repeatable), e.g. `-X security.protocol=ssl`.
    #[arg(short = 'X', long = "kafka-config", value_parser = parse_key_value, env = "LENSFLOW_KAFKA_CONFIG", value_delimiter = ';')]
    kafka_config: Vec<(String, String)>,
}

impl KafkaArgs {
    fn options(&self) -> KafkaOptions {
        KafkaOptions { brokers: self.brokers.clone(), extra: self.kafka_config.clone() }
    }
}

#[derive(Args)]
struct SqlArgs {
    /// Pipelines whose tables to register, by name or folder, comma-separated [default: every built-in pipeline].
    #[arg(long = "pipeline", env = "LENSFLOW_PIPELINE", value_delimiter = ',')]
    pipelines: Vec<String>,
    /// The lake's root (as for train).
    #[arg(long, env = "LENSFLOW_LAKE", default_value = "data/lake")]
    lake: String,
    /// The model store's root, for the served rounds' lookup tables (`lookup_<name>`); a local
    /// folder that does not exist is skipped.
    #[arg(long, env = "LENSFLOW_MODELS", default_value = "data/models")]
    models: String,
    /// A Ballista scheduler, df://HOST:PORT, or `standalone` [default: DataFusion in-process].
    #[arg(long, env = "LENSFLOW_SCHEDULER")]
    scheduler: Option<String>,
    /// The SQL to run (statements separated by `;`; the last one's rows are the result).
    #[arg(short = 'e', long = "execute", conflicts_with = "file", required_unless_present = "file")]
    execute: Option<String>,
    /// A file of SQL to run (a SQL job).
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// A variable for `${NAME}` in the SQL, as spark-sql's --define (repeatable; `SET NAME=VALUE;` in the SQL works too).
    #[arg(short = 'd', long = "define", value_name = "NAME=VALUE", env = "LENSFLOW_SQL_DEFINE", value_delimiter = ',')]
    define: Vec<String>,
    /// How the result is written: table, csv, json (stdout or --out), parquet (--out only).
    #[arg(long, env = "LENSFLOW_SQL_FORMAT", value_parser = ["table", "csv", "json", "parquet"])]
    format: Option<String>,
    /// Write the result as files into this folder (a local path or s3://bucket/prefix) [default format: parquet].
    #[arg(long, env = "LENSFLOW_SQL_OUT")]
    out: Option<String>,
    /// The job's name on a scheduler [default: the file's name, or lensflow-sql].
    #[arg(long, env = "LENSFLOW_JOB_NAME")]
    job_name: Option<String>,
    /// Query partitions per stage.
    #[arg(long, env = "LENSFLOW_SQL_PARTITIONS", default_value_t = 4)]
    partitions: usize,
    /// Most rows a table shows (the rest are counted).
    #[arg(long, env = "LENSFLOW_SQL_MAX_ROWS", default_value_t = 1000)]
    max_rows: usize,
}

/// `--pipeline`: flatten this into a command's arguments to give it one.
#[derive(Args, Clone)]
struct PipelineArgs {
    /// The pipeline: a built-in name (`lensflow pipelines` lists them) or a folder with a
    /// pipeline.toml.
    #[arg(long, env = "LENSFLOW_PIPELINE", default_value = "movielens")]
    pipeline: String,
}

impl PipelineArgs {
    /// Loads the pipeline (a definition error names its file and key).
    fn load(&self) -> anyhow::Result<Pipeline> {
        Ok(Pipeline::resolve(&self.pipeline)?)
    }
}

#[derive(Args)]
struct ProduceArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// CSV whose header names the pipeline's columns (movielens: `userId,movieId,rating,timestamp`).
    #[arg(long, env = "LENSFLOW_INPUT")]
    input: PathBuf,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Partitions of the topic when it has to be created.
    #[arg(long, env = "LENSFLOW_PARTITIONS", default_value_t = 3)]
    partitions: i32,
    /// Replication factor of the topic when it has to be created.
    #[arg(long, env = "LENSFLOW_REPLICATION_FACTOR", default_value_t = 1)]
    replication_factor: i32,
    /// Send at most this many messages per second [default: as fast as the broker takes them].
    #[arg(long, env = "LENSFLOW_RATE", conflicts_with = "replay_speed")]
    rate: Option<f64>,
    /// Replay the events' own timeline this many times faster than real time (needs a time column).
    #[arg(long, env = "LENSFLOW_REPLAY_SPEED")]
    replay_speed: Option<f64>,
    /// Where rejected lines go [default: <input>.rejects.csv].
    #[arg(long, env = "LENSFLOW_REJECTS")]
    rejects: Option<PathBuf>,
    /// Send only the lines the topic does not hold yet: rerun a crashed or interrupted produce
    /// with this and every line lands exactly once.
    #[arg(long, env = "LENSFLOW_RESUME")]
    resume: bool,
    /// The source name each message carries in its `_source` field, which --resume
    /// looks for [default: the input's file name].
    #[arg(long, env = "LENSFLOW_SOURCE")]
    source: Option<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConsumeArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Consumer group; consumers in one group split the partitions.
    #[arg(long, env = "LENSFLOW_GROUP", default_value = "lensflow-consumer")]
    group: String,
    /// The lake's root: file:///abs/path, a local path, or s3://bucket/prefix (S3 settings from
    /// AWS_*); the pipeline's events land in `<root>/<pipeline>/`.
    #[arg(long, env = "LENSFLOW_LAKE", default_value = "data/lake")]
    lake: String,
    /// Close a batch once it holds this many messages.
    #[arg(long, env = "LENSFLOW_BATCH_ROWS", default_value_t = 100_000)]
    batch_rows: usize,
    /// Close a batch once its first message is this old (e.g. 30s, 5m).
    #[arg(long, env = "LENSFLOW_BATCH_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    batch_interval: Duration,
    /// Commit and exit when no message arrived for this long (e.g. 10s).
    #[arg(long, env = "LENSFLOW_EXIT_WHEN_IDLE", value_parser = humantime::parse_duration)]
    exit_when_idle: Option<Duration>,
    /// Commit and exit once every partition is read to its end (land what the topic holds now).
    #[arg(long, env = "LENSFLOW_UNTIL_END")]
    until_end: bool,
    /// Read every partition without joining the group's rebalancing (a lone consumer starts at once).
    #[arg(long, env = "LENSFLOW_ALL_PARTITIONS")]
    all_partitions: bool,
    /// Keep retrying a batch commit this long while the object store fails, then exit with an
    /// error (nothing of that batch is recorded; a restart resumes from the lake).
    #[arg(long, env = "LENSFLOW_STORE_RETRY_FOR", value_parser = humantime::parse_duration, default_value = "2m")]
    store_retry_for: Duration,
    /// Hold back a partition's messages while their event time runs more than this ahead of
    /// the slowest partition's, in the units of the pipeline's time column (MovieLens: seconds),
    /// so each batch spans one stretch of time and the trainer sees few late events; `off`
    /// lands messages in arrival order. Pipelines without a time column are never aligned.
    #[arg(long, env = "LENSFLOW_MAX_SKEW", value_parser = parse_max_skew, default_value = "0")]
    max_skew: MaxSkew,
    /// Messages held back over all partitions before the partitions running ahead are paused
    /// at the broker (and fetched again once their held messages drain).
    #[arg(long, env = "LENSFLOW_MAX_HELD", default_value_t = 200_000)]
    max_held: usize,
    /// Serve the consumer's Prometheus metrics at http://ADDR/metrics (empty: none). An address
    /// other than loopback exposes them to the network: a deliberate choice.
    #[arg(long, env = "LENSFLOW_CONSUMER_METRICS_BIND", default_value = "127.0.0.1:9466")]
    metrics_bind: String,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// `--max-skew`: a non-negative number, or `off`.
#[derive(Debug, Clone, Copy)]
struct MaxSkew(Option<i64>);

fn parse_max_skew(text: &str) -> Result<MaxSkew, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(MaxSkew(None));
    }
    match text.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(MaxSkew(Some(n))),
        _ => Err(format!("{text:?} is neither a non-negative whole number (in the time column's units) nor `off`")),
    }
}

#[derive(Args)]
struct PipelinesArgs {
    #[command(subcommand)]
    action: Option<PipelinesAction>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum PipelinesAction {
    /// Load a pipeline folder and plan its SQL on empty tables; exit 2 with `file: key: fault`
    /// if anything is wrong.
    Check {
        /// The folder (or its pipeline.toml).
        path: PathBuf,
    },
}

/// Serves a job's metrics at `bind` (empty: nowhere) until `shutdown`; a port that cannot be
/// bound is logged and the job goes on without it.
fn spawn_metrics(bind: &str, render: impl Fn() -> String + Send + Sync + 'static, shutdown: &CancellationToken, job: &'static str) {
    if bind.is_empty() {
        return;
    }
    let (bind, stop) = (bind.to_string(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(e) = lensflow_api::serve_metrics(&bind, std::sync::Arc::new(render), stop).await {
            tracing::warn!(error = %e, "no metrics endpoint; {job} goes on");
        }
    });
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).filter(|(k, _)| !k.is_empty()).ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// `lensflow sql`: builds the options, streams the result to stdout, reports on stderr.
async fn sql(a: SqlArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    use lensflow_jobs::sql::{Format, SqlOptions, run};
    let names: Vec<String> = if a.pipelines.is_empty() { Pipeline::builtin_names().into_iter().map(String::from).collect() } else { a.pipelines };
    let pipelines = names.iter().map(|n| Pipeline::resolve(n)).collect::<Result<Vec<_>, _>>()?;
    let (text, job) = match (&a.execute, &a.file) {
        (Some(sql), _) => (sql.clone(), "lensflow-sql".to_string()),
        (None, Some(file)) => (
            std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?,
            file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "lensflow-sql".into()),
        ),
        (None, None) => anyhow::bail!("give the SQL with -e or -f FILE"),
    };
    let format = match (a.format.as_deref(), &a.out) {
        (Some("csv"), _) => Format::Csv,
        (Some("json"), _) => Format::Json,
        (Some("parquet"), _) | (None, Some(_)) => Format::Parquet,
        _ => Format::Table,
    };
    let local_missing = !a.models.contains("://") && !std::path::Path::new(&a.models).exists();
    let variables = a
        .define
        .iter()
        .map(|d| d.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).with_context(|| format!("--define {d}: expected NAME=VALUE")))
        .collect::<anyhow::Result<_>>()?;
    let opts = SqlOptions {
        pipelines,
        lake: a.lake,
        models: (!local_missing).then_some(a.models),
        storage: storage_from_env(),
        scheduler: a.scheduler,
        partitions: a.partitions,
        sql: text,
        variables,
        job_name: a.job_name.unwrap_or(job),
        format,
        out: a.out.clone(),
        table_rows: a.max_rows,
    };
    let mut stdout = std::io::BufWriter::new(std::io::stdout());
    let summary = run(opts, shutdown, &mut stdout).await?;
    std::io::Write::flush(&mut stdout)?;
    if summary.cancelled {
        eprintln!("cancelled after {} rows", summary.rows);
        return Ok(ExitCode::from(130));
    }
    match &a.out {
        Some(out) => eprintln!("wrote {} rows to {out} in {:.2} s", summary.rows, summary.seconds),
        None => tracing::info!(rows = summary.rows, seconds = summary.seconds, "query done"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The process's `AWS_*` variables: the standard way to configure S3 access and endpoints.
fn storage_from_env() -> StorageOptions {
    StorageOptions(std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).collect())
}

/// A token cancelled by Ctrl-C or SIGTERM, so every command can finish what is durable first.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        #[cfg(unix)]
        let term = async move {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutting down: finishing what is in flight");
        cancel.cancel();
    });
    token
}

fn is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

fn print_produce(s: &ProduceSummary, json: bool) -> anyhow::Result<()> {
    println!("{}", if json { serde_json::to_string(s)? } else { report::produce(s) });
    Ok(())
}

fn print_consume(s: &ConsumeSummary, json: bool) -> anyhow::Result<()> {
    println!("{}", if json { serde_json::to_string(s)? } else { report::consume(s) });
    Ok(())
}

/// `lensflow pipelines [check PATH]`.
async fn pipelines(a: PipelinesArgs) -> anyhow::Result<ExitCode> {
    let Some(PipelinesAction::Check { path }) = a.action else {
        let all = Pipeline::builtin_names().into_iter().map(Pipeline::resolve).collect::<Result<Vec<_>, _>>()?;
        if a.json {
            let defs: Vec<_> = all.iter().map(|p| &p.definition).collect();
            println!("{}", serde_json::to_string_pretty(&defs)?);
        } else {
            let text: Vec<String> = all.iter().map(describe_pipeline).collect();
            println!("{}", text.join("\n"));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let checked = match Pipeline::load(&path) {
        Ok(p) => p.check_sql().await.map(|c| (p, c)),
        Err(e) => Err(e),
    };
    match (checked, a.json) {
        (Ok((p, c)), false) => {
            println!(
                "ok: pipeline {} ({}): {} event columns, {} features, {} lookups; a serving row has {} fields",
                p.name(),
                p.source,
                p.definition.events.columns.len(),
                p.features().len(),
                c.lookups.len(),
                c.serving.fields().len()
            );
            println!("{}", incremental_line(&p));
        }
        (Ok((p, _)), true) => {
            let incremental = p.incremental_shape().map(|s| serde_json::json!({ "keys": s.keys, "passes": s.passes, "state": s.state }));
            let incremental = incremental.unwrap_or_else(|why| serde_json::json!({ "no": why }));
            println!("{}", serde_json::json!({ "ok": true, "pipeline": p.name(), "source": p.source, "incremental": incremental }));
        }
        (Err(e), json) => {
            if json {
                println!("{}", serde_json::json!({ "ok": false, "file": e.file, "key": e.key, "fault": e.fault }));
            } else {
                eprintln!("{e}");
            }
            // 2, not 1: the definition is wrong, as opposed to the command failing to run.
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `p`'s feature SQL has the form that lets rounds carry state, in one line.
fn incremental_line(p: &Pipeline) -> String {
    match p.incremental_shape() {
        Ok(s) if s.windows.is_empty() => "incremental form: yes (every event's features are its own)".to_string(),
        Ok(s) => format!("incremental form: yes (state per {}, {} window pass(es), the final SELECT reads `{}`)", s.keys.join(" and per "), s.passes, s.state),
        Err(why) => format!("incremental form: no ({why})"),
    }
}

/// A pipeline for people: what it is, its events, its features and its three models.
fn describe_pipeline(p: &Pipeline) -> String {
    let d = &p.definition;
    let mut out = format!("{} — {}\n", d.name, d.description);
    out += &format!(
        "  topic {}, key {}, time {}, SQL table {}\n  event columns:\n",
        p.topic(),
        d.events.key,
        d.events.time.as_deref().unwrap_or("(arrival order)"),
        d.events.table
    );
    for c in &d.events.columns {
        let kind = serde_json::to_value(c.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let rule = match &c.values {
            Some(values) => format!("one of {}", values.join(", ")),
            None if c.min.is_some() || c.max.is_some() || c.step.is_some() => c.rule(),
            None => String::new(),
        };
        out += &format!("    {:<24} {:<8} wire {:<22} {:<28} {}\n", c.name, kind, c.wire(), rule, c.doc);
    }
    out += &format!("  features: {}\n", p.features().join(", "));
    out += &format!("  {}\n", incremental_line(p));
    let m = &d.models;
    out += &format!("  classification: label {} — {}\n", m.classification.label, m.classification.doc);
    out += &format!("  regression: target {} — {}\n", m.regression.target, m.regression.doc);
    out += &format!("  clustering: entity {}, k {} — {}", m.clustering.entity, m.clustering.k, m.clustering.doc);
    out
}

fn print_round(r: &RoundReport, json: bool) {
    if !json {
        println!("{}", report::round(r));
        return;
    }
    match serde_json::to_string(r) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("error: round {}: {e}", r.round),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown_on_signal();
    match cli.command {
        Command::Generate(a) => {
            let opts = GenerateOptions { ratings: a.ratings, seed: a.seed, users: a.users, movies: a.movies, progress: is_terminal(), ..Default::default() };
            let file = std::fs::File::create(&a.out).with_context(|| format!("create {}", a.out.display()))?;
            let s = tokio::task::spawn_blocking(move || generate(&opts, file)).await??;
            println!("wrote {} ratings by {} users of {} movies (mean {:.2}) to {}", s.ratings, s.users, s.movies, s.mean_rating, a.out.display());
        }
        Command::Produce(a) => {
            let mut opts = ProduceOptions::new(a.input, a.kafka.options(), a.pipeline.load()?);
            if let Some(topic) = a.kafka.topic.clone() {
                opts.topic = topic;
            }
            opts.partitions = a.partitions;
            opts.replication = a.replication_factor;
            opts.pace = match (a.rate, a.replay_speed) {
                (Some(r), _) => Pace::Rate(r),
                (None, Some(x)) => Pace::Replay(x),
                (None, None) => Pace::Unlimited,
            };
            opts.rejects = a.rejects;
            opts.resume = a.resume;
            if let Some(source) = a.source {
                opts.source = source;
            }
            opts.progress = is_terminal();
            let s = produce(opts, shutdown).await?;
            print_produce(&s, a.json)?;
            if s.interrupted {
                return Ok(ExitCode::from(130));
            }
        }
        Command::Consume(a) => {
            let mut opts = ConsumeOptions::new(a.kafka.options(), a.lake, a.pipeline.load()?);
            if let Some(topic) = a.kafka.topic.clone() {
                opts.topic = topic;
            }
            opts.group = a.group;
            opts.storage = storage_from_env();
            opts.batch_rows = a.batch_rows;
            opts.batch_interval = a.batch_interval;
            opts.exit_when_idle = a.exit_when_idle;
            opts.until_end = a.until_end;
            opts.all_partitions = a.all_partitions;
            opts.store_retry_for = a.store_retry_for;
            opts.max_skew = a.max_skew.0;
            opts.max_held = a.max_held;
            opts.progress = is_terminal();
            let metrics = opts.metrics.clone();
            spawn_metrics(&a.metrics_bind, move || lensflow_api::metrics::encode(metrics.registry()), &shutdown, "consuming");
            let s = consume(opts, shutdown).await?;
            print_consume(&s, a.json)?;
        }
        Command::Pipelines(a) => return pipelines(a).await,
        Command::Lake(LakeArgs { action: LakeAction::Compact(a) }) => {
            let mut opts = CompactOptions::new(a.pipeline.load()?, a.lake, a.models);
            opts.storage = storage_from_env();
            opts.min_files = a.min_files;
            opts.grace = a.grace;
            let s = compact(&opts).await?;
            println!("{}", if a.json { serde_json::to_string(&s)? } else { report::compact(&s) });
        }
        Command::Train(a) => {
            hand_back_large_buffers();
            let mut opts = TrainOptions::new(a.pipeline.load()?, a.lake, a.models);
            opts.storage = storage_from_env();
            opts.scheduler = a.scheduler;
            opts.watch = a.watch;
            opts.poll_interval = a.poll_interval;
            opts.partitions = a.partitions;
            opts.query_timeout = a.query_timeout;
            opts.full = a.full;
            opts.full_above = a.full_above;
            opts.window = a.window;
            let metrics = opts.metrics.clone();
            spawn_metrics(&a.metrics_bind, move || lensflow_api::metrics::encode(metrics.registry()), &shutdown, "training");
            let (json, watch) = (a.json, a.watch);
            let rounds = train(opts, shutdown.clone(), |r| print_round(r, json)).await?;
            // Ctrl-C is how --watch normally ends; a one-off run cut short says so in its exit code.
            if shutdown.is_cancelled() && !watch {
                eprintln!("interrupted after {rounds} published round(s)");
                return Ok(ExitCode::from(130));
            }
            if rounds == 0 && !json {
                println!("no new batches: every batch already has its round");
            }
        }
        Command::Sql(a) => return sql(a, shutdown).await,
        Command::Scheduler(a) => {
            let opts = SchedulerOptions { bind: a.bind, external_host: a.external_host, executor_timeout_secs: a.executor_timeout };
            lensflow_scheduler::run(opts, shutdown).await?;
        }
        Command::Executor(a) => {
            let opts = ExecutorOptions {
                scheduler: a.scheduler,
                bind: a.bind,
                grpc_port: a.grpc_port,
                external_host: a.external_host,
                concurrent_tasks: a.concurrent_tasks,
                work_dir: a.work_dir,
                ..Default::default()
            };
            lensflow_executor::run(opts, shutdown).await?;
        }
        Command::Demo(a) => {
            let opts = DemoOptions {
                pipeline: a.pipeline.load()?,
                data_dir: a.data_dir,
                input: a.input,
                ratings: a.ratings,
                seed: a.seed,
                rounds: a.rounds,
                fresh: a.fresh,
                bind: a.bind,
                exit_after_train: a.exit_after_train,
                progress: is_terminal(),
            };
            lensflow::demo::run(opts, shutdown.clone(), |_| {}).await?;
        }
        Command::Serve(a) => {
            let mut opts = ServeOptions::new(a.models);
            opts.default_pipeline = a.default_pipeline;
            opts.lake = a.lake;
            opts.storage = storage_from_env();
            opts.poll_interval = a.poll_interval;
            opts.limits = Limits { body_bytes: a.body_limit, batch: a.max_batch, timeout: a.request_timeout, concurrent: a.max_concurrent as usize };
            lensflow_api::run(opts, a.bind, shutdown).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes freed large buffers go back to the system at once.
///
/// The trainer streams tables through buffers of a few MiB (Parquet pages, Flight messages).
/// glibc raises its mmap threshold each time such a buffer is freed, after which buffers of
/// that size come from the heap, and freed ones stay resident: the trainer's peak then grew
/// with the size of the round's streams, not with what it held. A fixed threshold keeps
/// them mapped per use. It is 32 KiB, below a batch's column buffer (8k rows of 8 bytes):
/// with 128 KiB the heap stayed as large as the round's biggest stream had made it, mostly
/// freed but resident (measured in docs/scaling.md, *Measured growth*).
fn hand_back_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter, which glibc applies under its own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024);
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        // Colour codes only where a person reads them: a log file or a pipe gets plain text.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
