//! lensflow's shared contracts. Every other crate imports these instead of keeping a copy,
//! because copies drift.
//!
//! - [`rating`]: the rating event, from a CSV line or a Kafka JSON payload, validated once
//!   here so the producer, the consumer and (later) the API agree on what a rating is.
//! - [`model`]: the model artifact (models, scaling, metrics, lineage, checksums) and the
//!   feature list with the one function that turns statistics into a feature row.
//! - [`predict`]: the API's request, answer and error bodies, shared with the web page and tests.
//! - [`lake`]: the lake layout (where batch files, manifests and dead letters live and how they
//!   are named), the Arrow schema of a batch file, and the batch manifest that commits a batch.
//!
//! Data moves through them like this: a CSV line or a Kafka payload becomes a
//! [`rating::RatingEvent`]; the consumer buffers events per partition and writes them as one
//! Parquet file per partition ([`lake::batch_file_path`], [`lake::ratings_schema`]); the batch
//! is committed by writing its [`lake::BatchManifest`] last, and readers trust only what a
//! manifest lists.

pub mod lake;
pub mod model;
pub mod predict;
pub mod rating;

pub use lake::{BatchFile, BatchManifest, DeadLetter, DeadLetterFile, LakeError, OffsetRange};
pub use rating::{RatingError, RatingEvent};

/// Now, in the unit of every `*_at_ms` field of the contracts: milliseconds since the Unix epoch
/// (0 on a clock set before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
