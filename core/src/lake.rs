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
    numbered_path(BATCHES_DIR, batch)
}

/// The batch number a manifest path names, if it is one.
pub fn parse_manifest_path(path: &str) -> Option<u64> {
    parse_numbered_path(BATCHES_DIR, path)
}

/// `<dir>/<n>.json`, zero-padded so that a listing is in number order.
fn numbered_path(dir: &str, n: u64) -> String {
    format!("{dir}/{n:010}.json")
}

/// The number a [`numbered_path`] in `dir` names, if `path` is one.
fn parse_numbered_path(dir: &str, path: &str) -> Option<u64> {
    let name = path.strip_prefix(dir)?.strip_prefix('/')?.strip_suffix(".json")?;
    if name.len() == 10 && name.bytes().all(|b| b.is_ascii_digit()) { name.parse().ok() } else { None }
}

/// Folder of the compaction records.
pub const COMPACTIONS_DIR: &str = "_compactions";

/// Path of compaction record number `number`.
pub fn compaction_path(number: u64) -> String {
    numbered_path(COMPACTIONS_DIR, number)
}

/// The record number a compaction path names, if it is one.
pub fn parse_compaction_path(path: &str) -> Option<u64> {
    parse_numbered_path(COMPACTIONS_DIR, path)
}

/// Path of the compacted file of `partition` written by compaction `number`.
pub fn compacted_file_path(number: u64, partition: i32, range: OffsetRange) -> String {
    format!("{EVENTS_DIR}/{}.parquet", segment_name(partition, range, &format!("c{number:06}")))
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
        // Manifests are checked to keep `last` below i64::MAX; saturating keeps a range built
        // any other way from overflowing.
        self.last.saturating_add(1)
    }

    /// How many offsets the range covers (0 when it is backwards).
    pub fn len(&self) -> u64 {
        if self.last < self.first { 0 } else { self.last.abs_diff(self.first).saturating_add(1) }
    }

    /// Whether the range covers no offset (only a backwards range, which no manifest may hold).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why the range cannot be Kafka offsets consumed, if it cannot: offsets are from 0, a
    /// range runs forwards, and the offset after it must exist.
    fn fault(&self) -> Option<String> {
        (self.first < 0 || self.last < self.first || self.last == i64::MAX)
            .then(|| format!("offsets {}..={} are not a range of Kafka offsets", self.first, self.last))
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

impl BatchFile {
    /// What makes the file's entry impossible, if anything: offsets that are no range, or more
    /// rows than offsets (one event per offset; this also keeps every sum of rows far from
    /// overflowing).
    pub fn fault(&self) -> Option<String> {
        if let Some(fault) = self.offsets.fault() {
            return Some(format!("file {}: {fault}", self.path));
        }
        (self.rows > self.offsets.len()).then(|| format!("file {} holds {} rows in {} offsets", self.path, self.rows, self.offsets.len()))
    }
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
        for (p, range) in &manifest.partitions {
            if let Some(fault) = range.fault() {
                return Err(invalid(format!("partition {p}: {fault}")));
            }
        }
        for file in &manifest.files {
            if let Some(fault) = file.fault() {
                return Err(invalid(fault));
            }
            let covered = manifest.partitions.get(&file.partition);
            if !covered.is_some_and(|r| r.first <= file.offsets.first && file.offsets.last <= r.last) {
                return Err(invalid(format!("file {} lies outside the batch's offsets", file.path)));
            }
        }
        let rows = manifest.files.iter().try_fold(0u64, |sum, f| sum.checked_add(f.rows));
        if rows != Some(manifest.rows) {
            let rows = rows.map_or_else(|| "more than 2^64".to_string(), |r| r.to_string());
            return Err(invalid(format!("rows {} but its files hold {rows}", manifest.rows)));
        }
        Ok(manifest)
    }

    /// The manifest as pretty JSON (a person reads these when something goes wrong).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// The commit record of one compaction: the events of batches `first..=last` now live in
/// `files` (one per partition), which replace every event file those batches' manifests name.
/// Manifests are never rewritten; readers resolve them through these records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompactionRecord {
    /// [`MANIFEST_FORMAT_VERSION`] at the time of writing.
    pub format_version: u32,
    /// The record number, 1-based and dense; also its file name.
    pub number: u64,
    /// The first batch it covers.
    pub first: u64,
    /// The last batch it covers.
    pub last: u64,
    /// The compacted files, one per partition.
    pub files: Vec<BatchFile>,
    /// The batch files they replace, removed once the record is older than the grace period.
    pub replaced: Vec<String>,
    /// When it was written (unix milliseconds).
    pub created_at_ms: i64,
}

impl CompactionRecord {
    /// Parses and checks a record read from `path`.
    pub fn from_json(path: &str, bytes: &[u8]) -> Result<Self, LakeError> {
        let record: CompactionRecord = serde_json::from_slice(bytes).map_err(|source| LakeError::ManifestJson { path: path.to_string(), source })?;
        let invalid = |reason: String| LakeError::ManifestInvalid { path: path.to_string(), reason };
        if record.format_version != MANIFEST_FORMAT_VERSION {
            return Err(invalid(format!("format version {} is not the supported {MANIFEST_FORMAT_VERSION}", record.format_version)));
        }
        if parse_compaction_path(path).is_some_and(|n| n != record.number) {
            return Err(invalid(format!("names compaction {} but its file name says otherwise", record.number)));
        }
        if record.first == 0 || record.first > record.last {
            return Err(invalid(format!("batches {}..={} are not a range of batches", record.first, record.last)));
        }
        if let Some(fault) = record.files.iter().find_map(BatchFile::fault) {
            return Err(invalid(fault));
        }
        Ok(record)
    }

    /// The record as pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Whether it covers batch `batch`.
    pub fn covers(&self, batch: u64) -> bool {
        (self.first..=self.last).contains(&batch)
    }
}

/// The files holding the events of some batches, and the offsets to keep when a compacted
/// file among them also holds events of batches not asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFiles {
    /// The Parquet files to read.
    pub files: Vec<BatchFile>,
    /// When set, only these offsets per partition are the batches' events.
    pub keep: Option<BTreeMap<i32, Vec<OffsetRange>>>,
}

impl EventFiles {
    /// The SQL predicate on the lake's `kafka_partition` and `kafka_offset` columns that keeps
    /// only the batches' events, if one is needed.
    pub fn sql_filter(&self) -> Option<String> {
        let keep = self.keep.as_ref()?;
        let ranges: Vec<String> = keep
            .iter()
            .flat_map(|(p, ranges)| {
                ranges.iter().map(move |r| {
                    format!("({} = {p} AND {} BETWEEN {} AND {})", crate::pipeline::KAFKA_PARTITION, crate::pipeline::KAFKA_OFFSET, r.first, r.last)
                })
            })
            .collect();
        Some(if ranges.is_empty() { "FALSE".to_string() } else { ranges.join(" OR ") })
    }
}

/// The event files holding the events of `manifests`, each compacted run of batches replaced
/// by its compacted files. When only part of a compacted run is asked for, the offsets of the
/// batches asked for come with the files, so that a reader keeps exactly those events.
pub fn resolve_event_files(manifests: &[BatchManifest], records: &[CompactionRecord]) -> EventFiles {
    let wanted: std::collections::BTreeSet<u64> = manifests.iter().map(|m| m.batch).collect();
    let mut out = EventFiles::default();
    let mut used = std::collections::BTreeSet::new();
    let mut partial = false;
    for m in manifests {
        match records.iter().find(|r| r.covers(m.batch)) {
            None => out.files.extend(m.files.iter().cloned()),
            Some(r) if used.insert(r.number) => {
                partial |= (r.first..=r.last).any(|b| !wanted.contains(&b));
                out.files.extend(r.files.iter().cloned());
            }
            Some(_) => {}
        }
    }
    if partial {
        // Adjacent batches' ranges merge, so a run of batches is one range per partition.
        let mut keep: BTreeMap<i32, Vec<OffsetRange>> = BTreeMap::new();
        for m in manifests {
            for (p, r) in &m.partitions {
                let ranges = keep.entry(*p).or_default();
                match ranges.last_mut() {
                    Some(last) if last.last.checked_add(1) == Some(r.first) => last.last = r.last,
                    _ => ranges.push(*r),
                }
            }
        }
        out.keep = Some(keep);
    }
    out
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

    /// Batch `n` of partition 2, offsets `10(n-1)..10n`.
    fn batch(n: u64) -> BatchManifest {
        let range = OffsetRange { first: 10 * (n as i64 - 1), last: 10 * n as i64 - 1 };
        let file = BatchFile { path: batch_file_path(2, range, "w1"), partition: 2, offsets: range, rows: 10, bytes: 100, min_ts: 5, max_ts: 6 };
        BatchManifest { batch: n, partitions: BTreeMap::from([(2, range)]), files: vec![file], ..sample() }
    }

    #[test]
    fn manifests_resolve_through_compaction_records() {
        let manifests: Vec<BatchManifest> = (1..=4).map(batch).collect();
        let range = OffsetRange { first: 10, last: 29 };
        let compacted = BatchFile { path: compacted_file_path(1, 2, range), partition: 2, offsets: range, rows: 20, bytes: 150, min_ts: 5, max_ts: 6 };
        let record = CompactionRecord {
            format_version: MANIFEST_FORMAT_VERSION,
            number: 1,
            first: 2,
            last: 3,
            files: vec![compacted.clone()],
            replaced: manifests[1..3].iter().map(|m| m.files[0].path.clone()).collect(),
            created_at_ms: 1,
        };
        let records = [record.clone()];
        // Every batch: batch 1's file, the compacted file once, batch 4's file; nothing to filter.
        let all = resolve_event_files(&manifests, &records);
        assert_eq!(all.files, vec![manifests[0].files[0].clone(), compacted.clone(), manifests[3].files[0].clone()]);
        assert_eq!((&all.keep, all.sql_filter()), (&None, None));
        // Batches 3..=4: the compacted file also holds batch 2, so only 3's and 4's offsets count.
        let part = resolve_event_files(&manifests[2..], &records);
        assert_eq!(part.files, vec![compacted, manifests[3].files[0].clone()]);
        assert_eq!(part.keep, Some(BTreeMap::from([(2, vec![OffsetRange { first: 20, last: 39 }])])));
        assert_eq!(part.sql_filter().as_deref(), Some("(kafka_partition = 2 AND kafka_offset BETWEEN 20 AND 39)"));
        // No record: the manifests' own files.
        assert_eq!(resolve_event_files(&manifests[..1], &[]).files, manifests[0].files);

        // A record reads back, and one that contradicts itself is refused naming its path.
        let path = compaction_path(1);
        assert_eq!(parse_compaction_path(&path), Some(1));
        assert_eq!(CompactionRecord::from_json(&path, &record.to_json()).unwrap(), record);
        let backwards = CompactionRecord { first: 3, last: 2, ..record.clone() };
        let err = CompactionRecord::from_json(&path, &backwards.to_json()).unwrap_err().to_string();
        assert!(err.contains("_compactions/0000000001.json") && err.contains("3..=2"), "{err}");
        let misnamed = CompactionRecord::from_json(&compaction_path(2), &record.to_json()).unwrap_err().to_string();
        assert!(misnamed.contains("file name"), "{misnamed}");
    }

    /// Batch 7 of two partitions: 10 events of partition 2, 100 of partition 5.
    fn two_files_manifest() -> BatchManifest {
        let mut m = sample();
        let range = OffsetRange { first: 100, last: 199 };
        m.partitions.insert(5, range);
        m.files.push(BatchFile { path: batch_file_path(5, range, "w1"), partition: 5, offsets: range, rows: 100, bytes: 9, min_ts: 1, max_ts: 2 });
        m.rows = 110;
        m
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
    fn offsets_that_no_kafka_partition_has_are_refused() {
        let path = manifest_path(7);
        type Edit = fn(&mut BatchManifest);
        let edits: [(&str, Edit); 5] = [
            ("offsets -1..=9", |m| m.partitions.get_mut(&2).unwrap().first = -1),
            ("offsets 5..=4", |m| {
                m.partitions.insert(3, OffsetRange { first: 5, last: 4 });
            }),
            ("offsets 0..=9223372036854775807", |m| {
                m.partitions.get_mut(&2).unwrap().last = i64::MAX;
                m.files[0].offsets.last = i64::MAX;
            }),
            ("holds 11 rows in 10 offsets", |m| {
                m.files[0].rows = 11;
                m.rows = 11;
            }),
            ("rows 18446744073709551615 but its files hold 10", |m| m.rows = u64::MAX),
        ];
        for (expected, edit) in edits {
            let mut m = sample();
            edit(&mut m);
            let err = BatchManifest::from_json(&path, &m.to_json()).unwrap_err().to_string();
            assert!(err.starts_with("manifest _batches/0000000007.json: ") && err.contains(expected), "{err} lacks {expected:?}");
        }
        assert_eq!(OffsetRange { first: 0, last: i64::MAX }.next(), i64::MAX);
        assert_eq!(OffsetRange { first: i64::MIN, last: i64::MAX }.len(), u64::MAX);
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::Value as Json;

        use super::*;

        /// A manifest of two partitions, as JSON text.
        fn two_files() -> Vec<u8> {
            two_files_manifest().to_json()
        }

        /// Replaces the `n`th leaf (in document order) of `v` by `with`; returns whether it did.
        fn replace_leaf(v: &mut Json, n: &mut usize, with: &Json) -> bool {
            match v {
                Json::Array(items) => items.iter_mut().any(|i| replace_leaf(i, n, with)),
                Json::Object(map) => map.values_mut().any(|i| replace_leaf(i, n, with)),
                leaf if *n == 0 => {
                    *leaf = with.clone();
                    true
                }
                _ => {
                    *n -= 1;
                    false
                }
            }
        }

        fn leaves(v: &Json) -> usize {
            match v {
                Json::Array(items) => items.iter().map(leaves).sum(),
                Json::Object(map) => map.values().map(leaves).sum(),
                _ => 1,
            }
        }

        fn hostile_leaf() -> impl Strategy<Value = Json> {
            prop_oneof![
                prop::sample::select(vec![
                    Json::from(u64::MAX),
                    Json::from(i64::MAX),
                    Json::from(i64::MIN),
                    Json::from(-1),
                    Json::from(0),
                    Json::from(u64::MAX / 2 + 1),
                    Json::from(1.5),
                    Json::Null,
                    Json::from(""),
                    Json::from(vec![1, 2]),
                ]),
                any::<i64>().prop_map(Json::from),
                any::<u64>().prop_map(Json::from),
                ".{0,8}".prop_map(Json::from),
            ]
        }

        fn check(path: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
            match BatchManifest::from_json(path, bytes) {
                Ok(m) => {
                    // What was accepted keeps the rules readers rely on.
                    prop_assert_eq!(m.files.iter().map(|f| f.rows).sum::<u64>(), m.rows);
                    for r in m.partitions.values() {
                        prop_assert!(r.first >= 0 && r.first <= r.last && r.next() > r.last);
                    }
                }
                Err(e) => prop_assert!(e.to_string().starts_with(&format!("manifest {path}: ")), "{}", e),
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any bytes: a manifest, or an error naming the file.
            #[test]
            fn any_bytes_are_a_manifest_or_an_error_naming_it(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                check(&manifest_path(3), &bytes)?;
            }

            /// A real manifest with bytes overwritten or cut off: the same.
            #[test]
            fn damaged_manifests_are_refused_by_name(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
                let mut bytes = two_files();
                for (at, byte) in edits {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
                if truncate {
                    bytes.truncate(cut.index(bytes.len()));
                }
                check(&manifest_path(7), &bytes)?;
            }

            /// Well-formed JSON with any one value replaced by an extreme one (`u64::MAX` rows
            /// in two files, `i64::MAX` offsets, negative counts): a manifest that keeps the
            /// rules, or an error naming the file.
            #[test]
            fn extreme_values_are_refused_by_name(leaf in any::<prop::sample::Index>(), with in hostile_leaf(), second in any::<prop::sample::Index>(), with2 in hostile_leaf()) {
                let mut json: Json = serde_json::from_slice(&two_files()).unwrap();
                let leaves = leaves(&json);
                replace_leaf(&mut json, &mut leaf.index(leaves), &with);
                replace_leaf(&mut json, &mut second.index(leaves), &with2);
                check(&manifest_path(7), &serde_json::to_vec(&json).unwrap())?;
            }
        }
    }

    /// Through the store, as every reader of the lake gets them: a damaged manifest is refused
    /// by its path in the lake, never skipped and never a panic.
    #[tokio::test]
    async fn a_damaged_manifest_in_the_lake_is_refused_by_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let lake = crate::Lake::open(dir.path().to_str().unwrap(), &crate::StorageOptions::default()).unwrap();
        let mut m = sample();
        m.batch = 1;
        assert!(lake.try_commit(&m).await.unwrap());
        let mut overflowing = two_files_manifest();
        overflowing.batch = 2;
        overflowing.files.iter_mut().for_each(|f| f.rows = u64::MAX / 2 + 1);
        overflowing.rows = 0;
        let damaged: [(&[u8], &str); 4] = [
            (b"", "EOF while parsing"),
            (b"\xff\xfe{\x00", "expected value"),
            (&overflowing.to_json(), "holds 9223372036854775808 rows in 10 offsets"),
            // Typed parsing refuses nesting at its first level, before any depth is reached.
            (&[b'['; 100_000], "invalid type: sequence"),
        ];
        for (bytes, reason) in damaged {
            lake.put(&manifest_path(2), bytes::Bytes::copy_from_slice(bytes)).await.unwrap();
            let err = lake.manifests().await.unwrap_err().to_string();
            assert!(err.starts_with("manifest _batches/0000000002.json: ") && err.contains(reason), "{err} lacks {reason:?}");
        }
    }

    /// A batch file damaged at any one byte is read or refused by its path in the lake, never
    /// a panic (the Parquet reader panics on some such files; `read_parquet` catches it).
    #[tokio::test]
    async fn a_damaged_batch_file_is_refused_by_its_path() {
        use crate::pipeline::event::{Event, EventColumns, Value};

        let dir = tempfile::tempdir().unwrap();
        let lake = crate::Lake::open(dir.path().to_str().unwrap(), &crate::StorageOptions::default()).unwrap();
        let pipeline = crate::Pipeline::builtin("movielens").unwrap().unwrap();
        let mut events = EventColumns::new(&pipeline);
        for offset in 0..10 {
            events.push(offset, &Event(vec![Value::Int(offset + 1), Value::Int(31), Value::Float(4.0), Value::Int(5)]));
        }
        let batch = events.to_record_batch(&pipeline, 2).unwrap();
        let mut good = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut good, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let file = sample().files.remove(0);
        lake.put(&file.path, good.clone().into()).await.unwrap();
        assert_eq!(lake.read_batch_file(&file).await.unwrap()[0], batch);
        for i in 0..good.len() {
            let mut damaged = good.clone();
            damaged[i] ^= 0xff;
            lake.put(&file.path, damaged.into()).await.unwrap();
            if let Err(e) = lake.read_batch_file(&file).await {
                assert!(e.to_string().starts_with(&format!("batch file {}: ", file.path)), "byte {i}: {e}");
            }
        }
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
