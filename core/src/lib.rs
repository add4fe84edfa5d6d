//! lensflow's shared contracts and storage. Every other crate imports these instead of keeping
//! a copy, because copies drift. Light on purpose: no Kafka, no Ballista, so ingest, training
//! and serving can all depend on it.
//!
//! - [`dialect`]: the SQL lensflow speaks (DataFusion with Spark's functions and defaults), for
//!   every session that plans or runs SQL.
//! - [`pipeline`]: a pipeline as data: `pipeline.toml` plus SQL files, loaded and checked once;
//!   its events (CSV and Kafka JSON in, Arrow out) and its feature expressions, compiled for
//!   serving from the same SQL training runs.
//! - [`lake`]: the lake layout (where batch files, manifests and dead letters live and how they
//!   are named) and the batch manifest that commits a batch.
//! - [`store`]: the lake and the model store on an object store (`file://` or `s3://`).
//! - [`model`]: the model artifact (models, scaling, metrics, lineage, the pipeline, checksums).
//! - [`predict`]: the API's request, answer and error bodies, shared with the web page and tests.
//!
//! Data moves through them like this: a CSV line or a Kafka payload becomes a
//! [`pipeline::event::Event`]; the consumer buffers events per partition as
//! [`pipeline::event::EventColumns`] and writes one Parquet file per partition
//! ([`lake::batch_file_path`], [`pipeline::Pipeline::lake_schema`]); the batch is committed by
//! writing its [`lake::BatchManifest`] last through [`store::Lake`], and readers trust only what
//! a manifest lists. A round's [`model::ModelArtifact`] carries its [`pipeline::Pipeline`], from
//! which serving compiles [`pipeline::expr::FeatureExprs`].

pub mod dialect;
pub mod lake;
pub mod model;
pub mod pipeline;
pub mod predict;
pub mod store;

pub use lake::{BatchFile, BatchManifest, CompactionRecord, DeadLetter, DeadLetterFile, EventFiles, LakeError, OffsetRange};
pub use pipeline::{Pipeline, PipelineError};
pub use store::{Lake, StorageOptions, StoreError};

/// Now, in the unit of every `*_at_ms` field of the contracts: milliseconds since the Unix epoch
/// (0 on a clock set before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
