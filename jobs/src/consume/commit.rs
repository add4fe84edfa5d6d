//! Committing a batch: write its files, then create its manifest under the next batch number.
//!
//! The create is conditional, so when two writers race for a number exactly one wins; the loser
//! rereads the lake and tries the next number. Before every attempt the writer checks the
//! newest manifests: if another writer has meanwhile committed offsets of a partition this batch
//! also holds (a rebalance moved the partition away), that partition's part is dropped and its
//! files deleted, so no event is ever committed twice.

use std::collections::BTreeMap;

use lensflow_core::lake::{MANIFEST_FORMAT_VERSION, batch_file_path, dead_letter_path};
use lensflow_core::{BatchFile, BatchManifest, DeadLetterFile, Lake, OffsetRange};

use super::offsets::LakeOffsets;
use super::writer::Batch;
use crate::Result;

/// What became of a batch.
#[derive(Debug)]
pub struct CommitOutcome {
    /// The manifest written, if anything was left to commit.
    pub manifest: Option<BatchManifest>,
    /// Partitions whose part was dropped because another writer had committed them first.
    pub dropped: Vec<i32>,
}

struct Written {
    range: OffsetRange,
    /// Earliest and latest event time of the file, for a pipeline with a time column.
    span: Option<(i64, i64)>,
    file: Option<BatchFile>,
    dead: Option<DeadLetterFile>,
}

impl Written {
    fn paths(&self) -> impl Iterator<Item = &str> {
        self.file.iter().map(|f| f.path.as_str()).chain(self.dead.iter().map(|d| d.path.as_str()))
    }
}

/// Writes `batch` to the lake (the pipeline's own folder) and commits it; `offsets` is brought
/// up to date on the way.
pub async fn commit_batch(lake: &Lake, offsets: &mut LakeOffsets, batch: &Batch, topic: &str, writer: &str) -> Result<CommitOutcome> {
    let mut parts: BTreeMap<i32, Written> = BTreeMap::new();
    for (&partition, buf) in &batch.partitions {
        let Some(range) = buf.range() else { continue };
        let span = buf.time_span();
        let mut written = Written { range, span, file: None, dead: None };
        if buf.rows() > 0 {
            // Without a time column the file's times are 0 and the manifest's are None.
            let (min_ts, max_ts) = span.unwrap_or((0, 0));
            let bytes = buf.to_parquet(batch.pipeline(), partition)?;
            let path = batch_file_path(partition, range, writer);
            let size = bytes.len() as u64;
            lake.put(&path, bytes).await?;
            written.file = Some(BatchFile { path, partition, offsets: range, rows: buf.rows() as u64, bytes: size, min_ts, max_ts });
        }
        if !buf.dead.is_empty() {
            let path = dead_letter_path(partition, range, writer);
            lake.put(&path, buf.dead_letters_jsonl()).await?;
            written.dead = Some(DeadLetterFile { path, partition, count: buf.dead.len() as u64 });
        }
        parts.insert(partition, written);
    }

    let mut dropped = Vec::new();
    loop {
        offsets.refresh(lake).await?;
        let lost: Vec<i32> = parts.iter().filter(|(p, w)| offsets.next_offset(**p).is_some_and(|next| next > w.range.first)).map(|(p, _)| *p).collect();
        for p in lost {
            if let Some(w) = parts.remove(&p) {
                tracing::warn!(partition = p, first = w.range.first, "another consumer committed this partition first; dropping our copy");
                for path in w.paths() {
                    lake.delete(path).await?;
                }
                dropped.push(p);
            }
        }
        for (p, w) in &parts {
            if let Some(next) = offsets.next_offset(*p).filter(|next| *next < w.range.first) {
                // Kafka itself leaves offset gaps (transaction markers, compaction, retention).
                tracing::info!(partition = p, from = next, to = w.range.first, "offset gap between batches");
            }
        }
        if parts.is_empty() {
            return Ok(CommitOutcome { manifest: None, dropped });
        }
        let manifest = build_manifest(offsets.last_batch() + 1, topic, writer, &parts);
        if lake.try_commit(&manifest).await? {
            offsets.apply(&manifest)?;
            return Ok(CommitOutcome { manifest: Some(manifest), dropped });
        }
        tracing::debug!(batch = manifest.batch, "batch number taken by another writer; rereading the lake");
    }
}

fn build_manifest(batch: u64, topic: &str, writer: &str, parts: &BTreeMap<i32, Written>) -> BatchManifest {
    let files: Vec<BatchFile> = parts.values().filter_map(|w| w.file.clone()).collect();
    let dead_letters: Vec<DeadLetterFile> = parts.values().filter_map(|w| w.dead.clone()).collect();
    BatchManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        batch,
        topic: topic.to_string(),
        writer: writer.to_string(),
        created_at_ms: lensflow_core::now_ms(),
        partitions: parts.iter().map(|(p, w)| (*p, w.range)).collect(),
        rows: files.iter().map(|f| f.rows).sum(),
        dead_letter_count: dead_letters.iter().map(|d| d.count).sum(),
        min_ts: parts.values().filter_map(|w| w.span.map(|s| s.0)).min(),
        max_ts: parts.values().filter_map(|w| w.span.map(|s| s.1)).max(),
        files,
        dead_letters,
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::Int64Array;
    use lensflow_core::StorageOptions;
    use lensflow_core::lake::EVENTS_DIR;
    use lensflow_core::pipeline::KAFKA_OFFSET;
    use lensflow_core::pipeline::event::{Event, Value};

    use super::*;
    use lensflow_core::Pipeline;

    fn pipeline(name: &str) -> Pipeline {
        Pipeline::builtin(name).unwrap().unwrap()
    }

    fn batch(partition: i32, offsets: std::ops::Range<i64>) -> Batch {
        let mut b = Batch::new(&pipeline("movielens"));
        for o in offsets {
            b.partition(partition).push_event(o, &Event(vec![Value::Int(1), Value::Int(1 + o), Value::Float(4.0), Value::Int(10 + o)]));
        }
        b
    }

    async fn offsets_in(lake: &Lake) -> Vec<i64> {
        let mut out = vec![];
        for b in lake.read_all().await.unwrap() {
            let col = b.column_by_name(KAFKA_OFFSET).unwrap().as_any().downcast_ref::<Int64Array>().unwrap().clone();
            out.extend(col.values().iter().copied());
        }
        out
    }

    #[tokio::test]
    async fn two_writers_of_one_range_commit_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap().child("movielens");
        // Both writers read the lake while it was empty, then both buffered partition 0 from offset 0.
        let (mut a, mut b) = (LakeOffsets::new("t"), LakeOffsets::new("t"));
        let first = commit_batch(&lake, &mut a, &batch(0, 0..10), "t", "wa").await.unwrap();
        let m = first.manifest.as_ref().unwrap();
        assert_eq!((m.batch, m.min_ts, m.max_ts), (1, Some(10), Some(19)));
        let second = commit_batch(&lake, &mut b, &batch(0, 0..15), "t", "wb").await.unwrap();
        assert!(second.manifest.is_none());
        assert_eq!(second.dropped, vec![0]);
        // The loser's file is gone; the lake holds offsets 0..10 once.
        assert_eq!(offsets_in(&lake).await, (0..10).collect::<Vec<_>>());
        assert_eq!(std::fs::read_dir(dir.path().join("movielens").join(EVENTS_DIR)).unwrap().count(), 1);
        // A writer that continues where the lake ends commits as batch 2, even from a stale view.
        let third = commit_batch(&lake, &mut LakeOffsets::new("t"), &batch(0, 10..12), "t", "wc").await.unwrap();
        assert_eq!(third.manifest.map(|m| m.batch), Some(2));
    }

    #[tokio::test]
    async fn without_a_time_column_the_manifest_has_no_time_span() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap().child("smart-home");
        let mut b = Batch::new(&pipeline("smart-home"));
        let event = Event(vec![
            Value::Int(1),
            Value::Text("Camera".into()),
            Value::Float(1.0),
            Value::Float(1.0),
            Value::Int(1),
            Value::Int(0),
            Value::Int(3),
            Value::Int(1),
        ]);
        b.partition(0).push_event(0, &event);
        let m = commit_batch(&lake, &mut LakeOffsets::new("t"), &b, "t", "w").await.unwrap().manifest.unwrap();
        assert_eq!((m.rows, m.min_ts, m.max_ts), (1, None, None));
        assert_eq!((m.files[0].min_ts, m.files[0].max_ts), (0, 0));
    }

    #[tokio::test]
    async fn a_lake_of_another_topic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
        commit_batch(&lake, &mut LakeOffsets::new("t"), &batch(0, 0..1), "t", "w").await.unwrap();
        let err = LakeOffsets::new("other").refresh(&lake).await.unwrap_err();
        assert!(err.to_string().contains("one lake per topic"), "{err}");
        assert!(!err.is_retryable());
    }
}
