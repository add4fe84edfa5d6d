//! lensflow's pipeline jobs as a library; the `lensflow` binary only parses flags and calls in.
//! Every job works on a [`Pipeline`] (a definition loaded by `lensflow_core`): nothing here
//! knows the columns of any particular data set.
//!
//! - [`generate`]: a deterministic generator of MovieLens-like ratings CSV (a test and demo tool).
//! - [`produce`]: CSV → Kafka. Reads the file record by record ([`events_csv`]) against the
//!   pipeline's columns, rejects bad records to a rejects file, sends good ones as JSON keyed by
//!   the pipeline's key column and waits for every delivery report.
//! - [`consume`]: Kafka → lake, exactly once. Buffers events per partition as Arrow columns,
//!   writes one Parquet file per partition per batch, dead-letters bad messages, then commits
//!   the batch by creating its manifest. The manifests, not the consumer group, say where each
//!   partition resumes. The lake is `lensflow_core`'s [`Lake`], in the pipeline's folder.
//! - [`kafka`]: client settings and topic creation shared by producer and consumer.
//! - [`train`]: one cumulative round per batch, on DataFusion in-process or Ballista (standalone
//!   or a cluster): the pipeline's feature SQL, solvers whose passes over the events are
//!   aggregate queries, k-means segments, and the round's artifacts with `LATEST` written last.
//! - [`sql`]: ad-hoc SQL and SQL job files over the lake's committed batches, on the same
//!   engines, streamed to stdout or written to a folder.
//! - [`compact`]: rewrites the small event files of trained batches into one file per
//!   partition behind a compaction record, which every reader resolves manifests through.
//!
//! ```text
//! generate ─▶ CSV ─▶ produce ─▶ Kafka ─▶ consume ─▶ <lake>/<pipeline>/{events/*.parquet, _dead_letters/*, _batches/N.json}
//!                                                     │ train, sql (DataFusion / Ballista)
//!                                                     ▼
//!                                        <models>/<pipeline>/round-N/…, LATEST
//! ```

pub mod compact;
pub mod consume;
pub mod error;
pub mod events_csv;
pub mod generate;
pub mod kafka;
pub mod produce;
pub mod sql;
pub mod train;

/// The contracts the jobs' options take, re-exported so a caller needs no second dependency.
pub use lensflow_core::{Lake, Pipeline, PipelineError, StorageOptions, StoreError};

pub use error::JobError;

/// Result type of every job.
pub type Result<T, E = JobError> = std::result::Result<T, E>;

/// A progress bar for work a person watches; hidden when stderr is not a terminal.
pub(crate) fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(&format!("{what:>10} [{{bar:30}}] {{human_pos}}/{{human_len}} {{per_sec}} eta {{eta}}"))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar
}
