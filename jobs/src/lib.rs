//! lensflow's pipeline jobs as a library; the `lensflow` binary only parses flags and calls in.
//!
//! - [`generate`]: a deterministic generator of MovieLens-like ratings CSV.
//! - [`produce`]: CSV → Kafka. Reads the file line by line ([`ratings_csv`]), rejects bad lines to
//!   a rejects file, sends good ones keyed by user and waits for every delivery report.
//! - [`consume`]: Kafka → lake, exactly once. Buffers ratings per partition, writes one Parquet
//!   file per partition per batch, dead-letters bad messages, then commits the batch by creating
//!   its manifest. The manifests, not the consumer group, say where each partition resumes.
//! - [`lake`]: the object store behind a lake URL (`file://` or `s3://`), manifest listing and
//!   the conditional create that makes a commit atomic; also reads batch files back.
//! - [`kafka`]: client settings and topic creation shared by producer and consumer.
//! - [`train`]: one cumulative round per batch on Ballista (standalone or a cluster): the feature
//!   SQL in `jobs/sql/`, solvers whose passes over the ratings are cluster aggregates, k-means
//!   segments, and the round's artifacts with `LATEST` written last.
//!
//! ```text
//! generate ─▶ CSV ─▶ produce ─▶ Kafka ─▶ consume ─▶ lake: ratings/*.parquet, _dead_letters/*, _batches/N.json
//!                                                     │ train (Ballista)
//!                                                     ▼
//!                                        models: round-N/{model.json, users.parquet, movies.parquet}, LATEST
//! ```

pub mod consume;
pub mod error;
pub mod generate;
pub mod kafka;
pub mod lake;
pub mod produce;
pub mod ratings_csv;
pub mod train;

pub use error::JobError;

/// Result type of every job.
pub type Result<T, E = JobError> = std::result::Result<T, E>;

/// A progress bar for work a person watches; hidden when stderr is not a terminal.
pub(crate) fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what:>10} [{{bar:30}}] {{human_pos}}/{{human_len}} {{per_sec}} eta {{eta}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar
}
