//! `lensflow lake compact`: rewrites the many small event files of trained batches into one
//! file per partition, without changing what any manifest-based reader sees.
//!
//! A run takes the batches after the last compaction up to the round `LATEST` has trained, so
//! the batches a running trainer reads next are never rewritten under it. It streams each
//! partition's files, in offset order, into one Parquet file, then commits a compaction record
//! with a conditional create, as batches are committed: two compactors cannot both commit a
//! number. Readers resolve manifests through the records ([`Lake::event_files`]); one that
//! wants part of a compacted run keeps only its batches' offsets. The replaced files stay until
//! their record is older than the grace period, so a query planned before the record still
//! finds them; a later run removes them.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use lensflow_core::lake::{MANIFEST_FORMAT_VERSION, compacted_file_path, compaction_path};
use lensflow_core::{BatchFile, CompactionRecord, Lake, OffsetRange, Pipeline, StorageOptions};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use parquet::arrow::ArrowWriter;
use serde::Serialize;

use crate::consume::writer::writer_properties;
use crate::{JobError, Result};

/// What to compact.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// The pipeline whose lake folder is compacted.
    pub pipeline: Pipeline,
    /// The lake's root (as for consume).
    pub lake: String,
    /// The model store's root: its `LATEST` bounds what may be compacted.
    pub models: String,
    /// Object-store settings for `s3://` roots.
    pub storage: StorageOptions,
    /// Compact only when at least this many event files would be replaced.
    pub min_files: usize,
    /// Replaced files are removed once their record is older than this.
    pub grace: Duration,
}

impl CompactOptions {
    /// Options for compacting `pipeline`'s lake under `lake`, bounded by the rounds in `models`.
    pub fn new(pipeline: Pipeline, lake: impl Into<String>, models: impl Into<String>) -> Self {
        CompactOptions {
            pipeline,
            lake: lake.into(),
            models: models.into(),
            storage: StorageOptions::default(),
            min_files: 32,
            grace: Duration::from_secs(15 * 60),
        }
    }
}

/// What a compaction run did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompactSummary {
    /// The record committed, if any.
    pub record: Option<u64>,
    /// The batches it covers.
    pub batches: Option<(u64, u64)>,
    /// Event files replaced.
    pub files_in: usize,
    /// Compacted files written.
    pub files_out: usize,
    /// Events rewritten.
    pub rows: u64,
    /// Bytes of the replaced files.
    pub bytes_in: u64,
    /// Bytes of the compacted files.
    pub bytes_out: u64,
    /// Replaced files of older records removed in this run.
    pub removed: usize,
    /// Why nothing was compacted, when nothing was.
    pub skipped: Option<String>,
}

/// Compacts the trained batches not compacted yet, then removes files replaced more than
/// `grace` ago.
pub async fn compact(opts: &CompactOptions) -> Result<CompactSummary> {
    let name = opts.pipeline.name();
    let lake = Lake::open(&opts.lake, &opts.storage)?.child(name);
    let models = Lake::open(&opts.models, &opts.storage)?.child(name);
    let records = lake.compactions().await?;
    let mut summary = CompactSummary { removed: remove_replaced(&lake, &records, opts.grace).await?, ..Default::default() };

    let trained = crate::train::latest(&models).await?.map(|l| l.round).unwrap_or(0);
    let manifests = lake.manifests().await?;
    let first = records.last().map(|r| r.last + 1).unwrap_or(1);
    let last = trained.min(manifests.len() as u64);
    if last < first {
        summary.skipped = Some(format!("no trained batch after batch {} (LATEST is round {trained})", first - 1));
        return Ok(summary);
    }
    let run = &manifests[(first - 1) as usize..last as usize];
    let mut by_partition: BTreeMap<i32, Vec<&BatchFile>> = BTreeMap::new();
    for file in run.iter().flat_map(|m| &m.files) {
        by_partition.entry(file.partition).or_default().push(file);
    }
    let files_in: usize = by_partition.values().map(Vec::len).sum();
    if files_in < opts.min_files.max(1) {
        summary.skipped = Some(format!("batches {first}..={last} hold {files_in} event files, fewer than --min-files {}", opts.min_files));
        return Ok(summary);
    }

    let number = records.last().map(|r| r.number + 1).unwrap_or(1);
    let mut files = Vec::new();
    for (partition, inputs) in &by_partition {
        files.push(compact_partition(&lake, &opts.pipeline, number, *partition, inputs).await?);
    }
    let record = CompactionRecord {
        format_version: MANIFEST_FORMAT_VERSION,
        number,
        first,
        last,
        files: files.clone(),
        replaced: by_partition.values().flatten().map(|f| f.path.clone()).collect(),
        created_at_ms: lensflow_core::now_ms(),
    };
    if !lake.create(&compaction_path(number), Bytes::from(record.to_json())).await? {
        // Another compactor committed this number first: our files are nobody's.
        for f in &files {
            lake.delete(&f.path).await?;
        }
        return Err(JobError::Config { option: "lake", reason: format!("another compaction committed record {number} first; run compact again") });
    }
    tracing::info!(record = number, first, last, files_in, files_out = files.len(), "compaction committed");
    summary.record = Some(number);
    summary.batches = Some((first, last));
    summary.files_in = files_in;
    summary.files_out = files.len();
    summary.rows = files.iter().map(|f| f.rows).sum();
    summary.bytes_in = by_partition.values().flatten().map(|f| f.bytes).sum();
    summary.bytes_out = files.iter().map(|f| f.bytes).sum();
    Ok(summary)
}

/// Streams one partition's files, in batch (so offset) order, into one compacted file.
async fn compact_partition(lake: &Lake, pipeline: &Pipeline, number: u64, partition: i32, inputs: &[&BatchFile]) -> Result<BatchFile> {
    let fail = |e: String| JobError::Internal(format!("compact partition {partition}: {e}"));
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, pipeline.lake_schema(), Some(writer_properties(pipeline))).map_err(|e| fail(e.to_string()))?;
    let (mut rows, mut min_ts, mut max_ts) = (0u64, i64::MAX, i64::MIN);
    for file in inputs {
        for batch in lake.read_batch_file(file).await? {
            writer.write(&batch).map_err(|e| fail(e.to_string()))?;
        }
        rows += file.rows;
        min_ts = min_ts.min(file.min_ts);
        max_ts = max_ts.max(file.max_ts);
    }
    writer.close().map_err(|e| fail(e.to_string()))?;
    let offsets =
        OffsetRange { first: inputs.iter().map(|f| f.offsets.first).min().unwrap_or(0), last: inputs.iter().map(|f| f.offsets.last).max().unwrap_or(0) };
    let path = compacted_file_path(number, partition, offsets);
    let bytes = out.len() as u64;
    lake.put(&path, Bytes::from(out)).await?;
    Ok(BatchFile { path, partition, offsets, rows, bytes, min_ts, max_ts })
}

/// Removes the replaced files of records older than `grace`. A record's files are removed in
/// order, so once its last one is gone the record needs no more requests.
async fn remove_replaced(lake: &Lake, records: &[CompactionRecord], grace: Duration) -> Result<usize> {
    let before = lensflow_core::now_ms() - grace.as_millis() as i64;
    let mut removed = 0;
    for record in records.iter().filter(|r| r.created_at_ms <= before) {
        let Some(last) = record.replaced.last() else { continue };
        match lake.store().head(&Path::from(last.as_str())).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(lensflow_core::StoreError::store(last)(e).into()),
        }
        for path in &record.replaced {
            lake.delete(path).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::consume::{commit::commit_batch, offsets::LakeOffsets, writer::Batch};
    use crate::generate::{GenerateOptions, generate};
    use crate::train::{RoundReport, TrainOptions, train};

    /// The events of a MovieLens CSV (header first).
    fn events_of(pipeline: &Pipeline, csv: &str) -> Vec<lensflow_core::pipeline::event::Event> {
        let mut lines = csv.lines();
        let layout = pipeline.csv_layout(lines.next().unwrap().split(',').map(str::as_bytes)).unwrap();
        lines.map(|line| pipeline.event_from_csv(&layout, line.split(',').map(str::as_bytes).collect::<Vec<_>>().into_iter()).unwrap()).collect()
    }

    /// Commits `events` as one batch, spread over three partitions after what the lake holds.
    async fn commit(lake: &Lake, pipeline: &Pipeline, events: &[lensflow_core::pipeline::event::Event]) {
        let mut offsets = LakeOffsets::new("t");
        offsets.refresh(lake).await.unwrap();
        let mut next: Vec<i64> = (0..3).map(|p| offsets.next_offset(p).unwrap_or(0)).collect();
        let mut batch = Batch::new(pipeline);
        for (i, event) in events.iter().enumerate() {
            let p = i % 3;
            batch.partition(p as i32).push_event(next[p], event);
            next[p] += 1;
        }
        commit_batch(lake, &mut offsets, &batch, "t", "w").await.unwrap();
    }

    /// The same generated ratings committed as `batches` batches over three partitions.
    async fn lake_at(root: &std::path::Path, pipeline: &Pipeline, events: &[lensflow_core::pipeline::event::Event], batches: usize) -> Lake {
        let lake = Lake::open(root.to_str().unwrap(), &StorageOptions::default()).unwrap().child(pipeline.name());
        for chunk in events.chunks(events.len().div_ceil(batches)) {
            commit(&lake, pipeline, chunk).await;
        }
        lake
    }

    async fn rounds(root: &std::path::Path, pipeline: &Pipeline) -> Vec<RoundReport> {
        let opts = TrainOptions::new(pipeline.clone(), root.join("lake").to_str().unwrap(), root.join("models").to_str().unwrap());
        let mut reports = Vec::new();
        train(opts, CancellationToken::new(), |r| reports.push(r.clone())).await.unwrap();
        reports
    }

    /// Every event as (partition, offset, user, movie), sorted.
    async fn events(lake: &Lake) -> Vec<(i32, i64, i64, i64)> {
        use arrow_array::{Int32Array, Int64Array};
        let mut out = Vec::new();
        for b in lake.read_all().await.unwrap() {
            let int64 = |name: &str| b.column_by_name(name).unwrap().as_any().downcast_ref::<Int64Array>().unwrap().clone();
            let partition = b.column_by_name("kafka_partition").unwrap().as_any().downcast_ref::<Int32Array>().unwrap().clone();
            let (offset, user, movie) = (int64("kafka_offset"), int64("user_id"), int64("movie_id"));
            out.extend((0..b.num_rows()).map(|r| (partition.value(r), offset.value(r), user.value(r), movie.value(r))));
        }
        out.sort_unstable();
        out
    }

    /// Compacting the trained batches changes no event a reader sees and no round trained
    /// after it: a compacted lake and an untouched copy give the same rounds, to the bit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compacted_lake_trains_the_same_rounds_as_the_original() {
        let pipeline = Pipeline::builtin("movielens").unwrap().unwrap();
        let mut csv = Vec::new();
        generate(&GenerateOptions { ratings: 33_000, seed: 5, ..Default::default() }, &mut csv).unwrap();
        let all = events_of(&pipeline, &String::from_utf8(csv).unwrap());
        let (first, later) = all.split_at(30_000);
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let lake_a = lake_at(&a.path().join("lake"), &pipeline, first, 6).await;
        let lake_b = lake_at(&b.path().join("lake"), &pipeline, first, 6).await;
        let before = events(&lake_a).await;
        assert_eq!(before.len(), 30_000);

        // Nothing is trained yet: nothing may be compacted.
        let mut opts = CompactOptions::new(pipeline.clone(), a.path().join("lake").to_str().unwrap(), a.path().join("models").to_str().unwrap());
        opts.grace = Duration::ZERO;
        opts.min_files = 2;
        let nothing = compact(&opts).await.unwrap();
        assert!(nothing.record.is_none() && nothing.skipped.as_deref().is_some_and(|s| s.contains("LATEST is round 0")), "{nothing:?}");

        // Train both to round 6, compact A (batches 1..=6, 18 files into 3), train a 7th batch.
        assert_eq!(rounds(a.path(), &pipeline).await.len(), 6);
        assert_eq!(rounds(b.path(), &pipeline).await.len(), 6);
        let done = compact(&opts).await.unwrap();
        assert_eq!((done.record, done.batches, done.files_in, done.files_out, done.rows), (Some(1), Some((1, 6)), 18, 3, 30_000), "{done:?}");
        assert_eq!(events(&lake_a).await, before, "the same events after compaction");
        // The replaced files go on the next run once the grace period (zero here) has passed.
        let again = compact(&opts).await.unwrap();
        assert_eq!((again.record, again.removed), (None, 18), "{again:?}");
        let left: Vec<String> = lake_a.list("events").await.unwrap().iter().map(|p| p.to_string()).collect();
        assert_eq!(left.len(), 3, "{left:?}");
        assert_eq!(events(&lake_a).await, before, "the same events once the replaced files are gone");

        // Part of a compacted run comes with the offsets that keep exactly its batches.
        let manifests = lake_a.manifests().await.unwrap();
        let part = lake_a.event_files(&manifests[2..4]).await.unwrap();
        assert_eq!(part.files.len(), 3);
        let keep = part.keep.expect("batches 3..=4 are part of compaction 1");
        for (p, ranges) in &keep {
            assert_eq!(ranges, &vec![OffsetRange { first: manifests[2].partitions[p].first, last: manifests[3].partitions[p].last }]);
        }

        // A 7th batch on both; the next round reads the compacted run plus the new files.
        for lake in [&lake_a, &lake_b] {
            commit(lake, &pipeline, later).await;
        }
        let (ra, rb) = (rounds(a.path(), &pipeline).await, rounds(b.path(), &pipeline).await);
        assert_eq!((ra.len(), rb.len()), (1, 1));
        assert_eq!(ra[0].round, 7);
        assert_same_metrics(&ra[0], &rb[0]);

        // Rounds 1..=7 trained afresh from the compacted lake (a new model store): each early
        // round reads part of the compacted run and must see only its own batches.
        std::fs::remove_dir_all(a.path().join("models")).unwrap();
        std::fs::remove_dir_all(b.path().join("models")).unwrap();
        let (ra, rb) = (rounds(a.path(), &pipeline).await, rounds(b.path(), &pipeline).await);
        assert_eq!((ra.len(), rb.len()), (7, 7));
        for (x, y) in ra.iter().zip(&rb) {
            assert_same_metrics(x, y);
        }
    }

    fn assert_same_metrics(a: &RoundReport, b: &RoundReport) {
        let (ma, mb) = (&a.metrics, &b.metrics);
        assert_eq!((a.round, ma.train_rows, ma.test_rows), (b.round, mb.train_rows, mb.test_rows));
        for (what, x, y) in
            [("rmse", ma.rmse, mb.rmse), ("auc", ma.auc, mb.auc), ("accuracy", ma.accuracy, mb.accuracy), ("silhouette", ma.silhouette, mb.silhouette)]
        {
            assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "round {}: {what}: compacted {x} vs original {y}", a.round);
        }
    }
}
