//! Committing a batch: write its files, then create its manifest under the next batch number.
//!
//! The create is conditional, so when two writers race for a number exactly one wins; the loser
//! rereads the lake and tries the next number. Before every attempt the writer checks the
//! newest manifests: if another writer has meanwhile committed offsets of a partition this batch
//! also holds (a rebalance moved the partition away), that partition's part is dropped and its
//! files deleted, so no rating is ever committed twice.

use std::collections::BTreeMap;

use lensflow_core::lake::{MANIFEST_FORMAT_VERSION, batch_file_path, dead_letter_path};
use lensflow_core::{BatchFile, BatchManifest, DeadLetterFile, OffsetRange};

use super::offsets::LakeOffsets;
use super::writer::Batch;
use crate::Result;
use crate::lake::Lake;

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
    file: Option<BatchFile>,
    dead: Option<DeadLetterFile>,
}

impl Written {
    fn paths(&self) -> impl Iterator<Item = &str> {
        self.file.iter().map(|f| f.path.as_str()).chain(self.dead.iter().map(|d| d.path.as_str()))
    }
}

/// Writes `batch` to the lake and commits it; `offsets` is brought up to date on the way.
pub async fn commit_batch(
    lake: &Lake,
    offsets: &mut LakeOffsets,
    batch: &Batch,
    topic: &str,
    writer: &str,
) -> Result<CommitOutcome> {
    let mut parts: BTreeMap<i32, Written> = BTreeMap::new();
    for (&partition, buf) in &batch.partitions {
        let Some(range) = buf.range() else { continue };
        let mut written = Written { range, file: None, dead: None };
        if let Some((min_ts, max_ts)) = buf.ts_span() {
            let bytes = buf.to_parquet(partition)?;
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
        let lost: Vec<i32> = parts
            .iter()
            .filter(|(p, w)| offsets.next_offset(**p).is_some_and(|next| next > w.range.first))
            .map(|(p, _)| *p)
            .collect();
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
        min_ts: files.iter().map(|f| f.min_ts).min(),
        max_ts: files.iter().map(|f| f.max_ts).max(),
        files,
        dead_letters,
    }
}

#[cfg(test)]
mod tests {
    use lensflow_core::RatingEvent;

    use super::*;
    use crate::lake::StorageOptions;

    fn batch(partition: i32, offsets: std::ops::Range<i64>) -> Batch {
        let mut b = Batch::default();
        for o in offsets {
            b.partition(partition).push_rating(o, &RatingEvent::new(1, 1 + o, 4.0, 10 + o).unwrap());
        }
        b
    }

    #[tokio::test]
    async fn two_writers_of_one_range_commit_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
        // Both writers read the lake while it was empty, then both buffered partition 0 from offset 0.
        let (mut a, mut b) = (LakeOffsets::new("t"), LakeOffsets::new("t"));
        let first = commit_batch(&lake, &mut a, &batch(0, 0..10), "t", "wa").await.unwrap();
        assert_eq!(first.manifest.as_ref().map(|m| m.batch), Some(1));
        let second = commit_batch(&lake, &mut b, &batch(0, 0..15), "t", "wb").await.unwrap();
        assert!(second.manifest.is_none());
        assert_eq!(second.dropped, vec![0]);
        // The loser's file is gone; the lake holds offsets 0..10 once.
        let rows = lake.read_all_rows().await.unwrap();
        assert_eq!(rows.iter().map(|r| r.offset).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
        assert_eq!(std::fs::read_dir(dir.path().join("ratings")).unwrap().count(), 1);
        // A writer that continues where the lake ends commits as batch 2, even from a stale view.
        let third = commit_batch(&lake, &mut LakeOffsets::new("t"), &batch(0, 10..12), "t", "wc").await.unwrap();
        assert_eq!(third.manifest.map(|m| m.batch), Some(2));
    }

    #[tokio::test]
    async fn a_lake_of_another_topic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
        commit_batch(&lake, &mut LakeOffsets::new("t"), &batch(0, 0..1), "t", "w").await.unwrap();
        let err = LakeOffsets::new("other").refresh(&lake).await.unwrap_err().to_string();
        assert!(err.contains("one lake per topic"), "{err}");
    }
}
