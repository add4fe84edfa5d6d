//! The one error type of the jobs library: each variant says what failed and on which input.

use std::path::PathBuf;

use lensflow_core::LakeError;
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
    /// The object store behind the lake failed (worth retrying: storage may be down).
    #[error("lake storage, {path}: {source}")]
    Store {
        /// The object's path in the lake.
        path: String,
        /// What the store said.
        source: object_store::Error,
    },
    /// A manifest in the lake is unreadable or breaks the manifest rules.
    #[error(transparent)]
    Manifest(#[from] LakeError),
    /// The lake's content contradicts itself (not worth retrying: it needs a person).
    #[error("lake content: {0}")]
    LakeContent(String),
    /// A batch file named by a manifest cannot be decoded.
    #[error("batch file {path}: {reason}")]
    BatchFile {
        /// The file's path in the lake.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
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
    /// A query on the training engine failed.
    #[error("training query `{what}`: {reason}")]
    Engine {
        /// Which step of the round.
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
    /// A consumer background thread stopped unexpectedly.
    #[error("internal: {0}")]
    Internal(String),
}

impl JobError {
    /// Whether trying again later may succeed (storage or broker unavailable), as opposed to a
    /// problem with the input or the configuration.
    pub fn is_retryable(&self) -> bool {
        matches!(self, JobError::Store { .. } | JobError::Kafka { .. } | JobError::Undelivered { .. } | JobError::Engine { .. })
    }

    pub(crate) fn kafka(operation: impl Into<String>) -> impl FnOnce(KafkaError) -> JobError {
        let operation = operation.into();
        move |source| JobError::Kafka { operation, source }
    }

    pub(crate) fn store(path: impl std::fmt::Display) -> impl FnOnce(object_store::Error) -> JobError {
        let path = path.to_string();
        move |source| JobError::Store { path, source }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> JobError {
        let path = path.into();
        move |source| JobError::Io { path, source }
    }
}
