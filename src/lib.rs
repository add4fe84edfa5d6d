//! The `lensflow` command's own library: what the binary prints and the one-command demo.
//!
//! - [`report`]: the human-readable summaries of produce, consume and each training round.
//! - [`demo`]: `lensflow demo`, every stage on one machine with embedded defaults: generated
//!   ratings (or a file) → an in-process Kafka broker → the Parquet lake → three training rounds
//!   on DataFusion in-process → the API and web page.
//!
//! Every stage itself lives in `lensflow-jobs` (ingest, training) and `lensflow-api` (serving);
//! this crate only strings them together and talks to the person at the terminal.

pub mod demo;
pub mod report;
