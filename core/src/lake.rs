//! The lake layout and the batch manifest: the contract between the consumer that writes the
//! lake and everything that reads it.
//!
//! ```text
//! <lake>/<pipeline>/events/p<P>-o<FIRST>-<LAST>-<WRITER>.parquet   one file per partition per batch
//! <lake>/<pipeline>/_dead_letters/…, _batches/…                     as below, per pipeline
//!
//! Within one pipeline's folder:
//! events/p<P>-o<FIRST>-<LAST>-<WRITER>.parquet            the events, in the pipeline's lake schema
//! <lake>/_dead_letters/p<P>-o<FIRST>-<LAST>-<WRITER>.jsonl  rejected messages of that range
//! <lake>/_batches/<SEQ>.json                              the manifest: written last, commits the batch
//! ```
//!
//! A batch exists only once its manifest exists. Manifests are numbered densely from 1 and
//! created with a conditional put, so two writers can never both commit the same number, and
//! the numbers give every reader one order of batches. Files that no manifest lists (left by a
//! writer that crashed before its commit) are not part of the lake.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The version of the manifest format this crate writes and reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
/// Folder of the Parquet batch files.
pub const EVENTS_DIR: &str = "events";
/// Folder of the batch manifests.
pub const BATCHES_DIR: &str = "_batches";
/// Folder of the dead-letter files.
pub const DEAD_LETTERS_DIR: &str = "_dead_letters";

/// Path (relative to the lake root) of the Parquet file holding `range` of `partition`.
pub fn batch_file_path(partition: i32, range: OffsetRange, writer: &str) -> String {
    format!("{EVENTS_DIR}/{}.parquet", segment_name(partition, range, writer))
}

/// Path of the dead-letter file for `range` of `partition`.
pub fn dead_letter_path(partition: i32, range: OffsetRange, writer: &str) -> String {
    format!("{DEAD_LETTERS_DIR}/{}.jsonl", segment_name(partition, range, writer))
}

/// Path of manifest number `batch`.
pub fn manifest_path(batch: u64) -> String {
    format!("{BATCHES_DIR}/{batch:010}.json")
}

/// The batch number a manifest path names, if it is one.
pub fn parse_manifest_path(path: &str) -> Option<u64> {
    let name = path.strip_prefix(BATCHES_DIR)?.strip_prefix('/')?.strip_suffix(".json")?;
    if name.len() == 10 && name.bytes().all(|b| b.is_ascii_digit()) { name.parse().ok() } else { None }
}

/// Zero-padded offsets keep a folder listing in offset order; the writer id keeps two writers
/// that briefly read the same range (during a rebalance) from ever clobbering each other.
fn segment_name(partition: i32, range: OffsetRange, writer: &str) -> String {
    format!("p{partition:03}-o{:019}-{:019}-{writer}", range.first, range.last)
}

/// An inclusive range of Kafka offsets within one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OffsetRange {
    /// First offset consumed.
    pub first: i64,
    /// Last offset consumed.
    pub last: i64,
}

impl OffsetRange {
    /// The offset a reader resumes from after this range.
    pub fn next(&self) -> i64 {
        self.last + 1
    }
}

/// One Parquet file of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchFile {
    /// Path relative to the lake root.
    pub path: String,
    /// The Kafka partition its rows came from.
    pub partition: i32,
    /// The offsets it covers (dead-lettered offsets in the range are not in the file).
    pub offsets: OffsetRange,
    /// Number of events in the file.
    pub rows: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Earliest event time in the file (0 without a time column).
    pub min_ts: i64,
    /// Latest event time in the file (0 without a time column).
    pub max_ts: i64,
}

/// One dead-letter file of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterFile {
    /// Path relative to the lake root.
    pub path: String,
    /// The Kafka partition the messages came from.
    pub partition: i32,
    /// Number of rejected messages in the file.
    pub count: u64,
}

/// The commit record of one batch: which files it holds and which offsets it consumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchManifest {
    /// [`MANIFEST_FORMAT_VERSION`] at the time of writing.
    pub format_version: u32,
    /// The batch number, 1-based and dense; also the manifest's file name.
    pub batch: u64,
    /// The Kafka topic the batch was read from.
    pub topic: String,
    /// The id of the consumer process that wrote it.
    pub writer: String,
    /// When the manifest was written (unix milliseconds).
    pub created_at_ms: i64,
    /// Offsets consumed per partition, dead letters included: the next batch of a partition
    /// starts right after `last`.
    pub partitions: BTreeMap<i32, OffsetRange>,
    /// The Parquet files, one per partition that had good events.
    pub files: Vec<BatchFile>,
    /// The dead-letter files, one per partition that had bad messages.
    pub dead_letters: Vec<DeadLetterFile>,
    /// Events in the batch.
    pub rows: u64,
    /// Messages dead-lettered in the batch.
    pub dead_letter_count: u64,
    /// Earliest event time in the batch, if it has events and a time column.
    pub min_ts: Option<i64>,
    /// Latest event time in the batch, if it has events and a time column.
    pub max_ts: Option<i64>,
}

/// A manifest that cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    /// Not valid manifest JSON.
    #[error("manifest {path}: {source}")]
    ManifestJson {
        /// Where it was read from.
        path: String,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
    /// Valid JSON that breaks the manifest's own rules.
    #[error("manifest {path}: {reason}")]
    ManifestInvalid {
        /// Where it was read from.
        path: String,
        /// The rule it breaks.
        reason: String,
    },
}

impl BatchManifest {
    /// Parses and checks a manifest read from `path`.
    pub fn from_json(path: &str, bytes: &[u8]) -> Result<Self, LakeError> {
        let manifest: BatchManifest = serde_json::from_slice(bytes).map_err(|source| LakeError::ManifestJson { path: path.to_string(), source })?;
        let invalid = |reason: String| LakeError::ManifestInvalid { path: path.to_string(), reason };
        if manifest.format_version != MANIFEST_FORMAT_VERSION {
            return Err(invalid(format!("format version {} is not the supported {MANIFEST_FORMAT_VERSION}", manifest.format_version)));
        }
        if parse_manifest_path(path).is_some_and(|n| n != manifest.batch) {
            return Err(invalid(format!("names batch {} but its file name says otherwise", manifest.batch)));
        }
        let rows: u64 = manifest.files.iter().map(|f| f.rows).sum();
        if rows != manifest.rows {
            return Err(invalid(format!("rows {} but its files hold {rows}", manifest.rows)));
        }
        for file in &manifest.files {
            let covered = manifest.partitions.get(&file.partition);
            if !covered.is_some_and(|r| r.first <= file.offsets.first && file.offsets.last <= r.last) {
                return Err(invalid(format!("file {} lies outside the batch's offsets", file.path)));
            }
        }
        Ok(manifest)
    }

    /// The manifest as pretty JSON (a person reads these when something goes wrong).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// One rejected Kafka message, as stored in a dead-letter file (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The partition it was read from.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
    /// Its key as text, if it had one.
    pub key: Option<String>,
    /// The payload: as text when it is UTF-8, else hex (see `raw_encoding`).
    pub raw: String,
    /// `utf8` or `hex`.
    pub raw_encoding: String,
    /// Why it was rejected.
    pub reason: String,
    /// The field at fault, when one is.
    pub field: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BatchManifest {
        let range = OffsetRange { first: 0, last: 9 };
        BatchManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            batch: 7,
            topic: "ratings".into(),
            writer: "w1".into(),
            created_at_ms: 1,
            partitions: BTreeMap::from([(2, range)]),
            files: vec![BatchFile { path: batch_file_path(2, range, "w1"), partition: 2, offsets: range, rows: 10, bytes: 100, min_ts: 5, max_ts: 6 }],
            dead_letters: vec![],
            rows: 10,
            dead_letter_count: 0,
            min_ts: Some(5),
            max_ts: Some(6),
        }
    }

    #[test]
    fn names_carry_partition_and_offsets_and_sort_by_batch() {
        let range = OffsetRange { first: 12, last: 3456 };
        assert_eq!(batch_file_path(2, range, "ab12"), "events/p002-o0000000000000000012-0000000000000003456-ab12.parquet");
        assert_eq!(manifest_path(42), "_batches/0000000042.json");
        assert_eq!(parse_manifest_path(&manifest_path(42)), Some(42));
        assert_eq!(parse_manifest_path("_batches/42.json"), None);
        assert!(manifest_path(9) < manifest_path(10));
    }

    #[test]
    fn manifest_round_trips_and_is_checked() {
        let m = sample();
        let path = manifest_path(7);
        assert_eq!(BatchManifest::from_json(&path, &m.to_json()).unwrap(), m);
        let err = BatchManifest::from_json(&manifest_path(8), &m.to_json()).unwrap_err();
        assert!(err.to_string().contains("_batches/0000000008.json"), "{err}");
        let mut bad = m.clone();
        bad.rows = 11;
        assert!(BatchManifest::from_json(&path, &bad.to_json()).unwrap_err().to_string().contains("rows 11"));
        let mut outside = m;
        outside.files[0].offsets.last = 10;
        assert!(BatchManifest::from_json(&path, &outside.to_json()).is_err());
    }
}
