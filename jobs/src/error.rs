//! The one error type of the jobs library: each variant says what failed and on which input.

use std::path::PathBuf;

use lensflow_core::{PipelineError, StoreError};
use rdkafka::error::KafkaError;

/// What can go wrong in a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// An option's value cannot work; caught before any connection is opened.
    #[error("invalid --{option}: {reason}")]
    Config {
        /// The flag's name.
        option: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The lake or the model store failed, or holds something it should not.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The pipeline definition cannot be used.
    #[error("pipeline {0}")]
    Pipeline(#[from] PipelineError),
    /// Kafka refused or failed an operation.
    #[error("kafka, {operation}: {source}")]
    Kafka {
        /// What was being done.
        operation: String,
        /// What librdkafka said.
        source: KafkaError,
    },
    /// Some produced messages were never acknowledged by the broker.
    #[error("{failed} of {sent} messages were not delivered; first failure: {first}")]
    Undelivered {
        /// Messages without a successful delivery report.
        failed: u64,
        /// Messages handed to the producer.
        sent: u64,
        /// The first failure, with its CSV line.
        first: String,
    },
    /// A query on the engine (training or `lensflow sql`) failed.
    #[error("query `{what}`: {reason}")]
    Engine {
        /// Which step of the round, or which part of the SQL.
        what: String,
        /// What DataFusion or Ballista said.
        reason: String,
    },
    /// A round cannot be trained on this data (too little of it, a solver that did not converge).
    #[error("round {round}: {reason}")]
    Round {
        /// The round number.
        round: u64,
        /// Why.
        reason: String,
    },
    /// The object store stayed unreachable for longer than the consumer's retry budget.
    #[error(
        "gave up committing a batch of {messages} messages after {attempts} tries over {seconds} s (nothing of it was recorded; a restart resumes from the lake): {source}"
    )]
    StoreDown {
        /// How long the commit was retried.
        seconds: u64,
        /// Tries made.
        attempts: u32,
        /// Messages in the batch that could not be committed.
        messages: usize,
        /// The last failure.
        source: Box<JobError>,
    },
    /// A consumer background thread stopped unexpectedly.
    #[error("internal: {0}")]
    Internal(String),
}

impl JobError {
    /// Whether trying again later may succeed (storage or broker unavailable), as opposed to a
    /// problem with the input or the configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            // Content and settings need a person; the store itself being down does not.
            JobError::Store(e) => !matches!(e, StoreError::LakeContent(_) | StoreError::BatchFile { .. } | StoreError::Manifest(_) | StoreError::Config { .. }),
            JobError::Kafka { .. } | JobError::Undelivered { .. } | JobError::Engine { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn kafka(operation: impl Into<String>) -> impl FnOnce(KafkaError) -> JobError {
        let operation = operation.into();
        move |source| JobError::Kafka { operation, source }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> JobError {
        let path = path.into();
        move |source| JobError::Io { path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_outages_are_retried_and_lake_content_is_not() {
        let down = StoreError::store("_batches/x")(object_store::Error::Generic { store: "test", source: "connection refused".into() });
        assert!(JobError::from(down).is_retryable());
        assert!(!JobError::from(StoreError::LakeContent("batch 3 is missing".into())).is_retryable());
        let bad = StoreError::BatchFile { path: "events/x".into(), reason: "bad".into() };
        assert!(!JobError::from(bad).is_retryable());
        let pipeline = PipelineError { file: "p/pipeline.toml".into(), key: "name".into(), fault: "bad".into() };
        let err = JobError::from(pipeline);
        assert!(!err.is_retryable());
        assert_eq!(err.to_string(), "pipeline p/pipeline.toml: name: bad");
    }
}
