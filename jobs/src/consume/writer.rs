//! The open batch: ratings and dead letters buffered per partition, and their encoding as one
//! Parquet file (and one dead-letter file) per partition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch};
use bytes::Bytes;
use lensflow_core::lake::{columns, ratings_schema};
use lensflow_core::{DeadLetter, OffsetRange, RatingEvent};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::{JobError, Result};

/// What one partition contributed to the open batch.
#[derive(Debug, Default)]
pub struct PartitionBuffer {
    first: Option<i64>,
    last: i64,
    user_id: Vec<i64>,
    movie_id: Vec<i64>,
    rating: Vec<f64>,
    ts: Vec<i64>,
    offset: Vec<i64>,
    /// Messages that were not ratings.
    pub dead: Vec<DeadLetter>,
}

impl PartitionBuffer {
    fn note_offset(&mut self, offset: i64) {
        self.first.get_or_insert(offset);
        self.last = offset;
    }

    /// Adds a good rating read at `offset`.
    pub fn push_rating(&mut self, offset: i64, event: &RatingEvent) {
        self.note_offset(offset);
        self.user_id.push(event.user_id);
        self.movie_id.push(event.movie_id);
        self.rating.push(event.rating);
        self.ts.push(event.timestamp);
        self.offset.push(offset);
    }

    /// Adds a message that could not be used.
    pub fn push_dead(&mut self, dead: DeadLetter) {
        self.note_offset(dead.offset);
        self.dead.push(dead);
    }

    /// Offsets consumed, dead letters included; `None` if nothing was.
    pub fn range(&self) -> Option<OffsetRange> {
        self.first.map(|first| OffsetRange { first, last: self.last })
    }

    /// Good ratings buffered.
    pub fn rows(&self) -> usize {
        self.offset.len()
    }

    /// Earliest and latest rating timestamps, if any rating is buffered.
    pub fn ts_span(&self) -> Option<(i64, i64)> {
        Some((*self.ts.iter().min()?, *self.ts.iter().max()?))
    }

    /// Encodes the ratings as a Parquet file of [`ratings_schema`].
    pub fn to_parquet(&self, partition: i32) -> Result<Bytes> {
        let n = self.rows();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(self.user_id.clone())),
            Arc::new(Int64Array::from(self.movie_id.clone())),
            Arc::new(Float64Array::from(self.rating.clone())),
            Arc::new(Int64Array::from(self.ts.clone())),
            Arc::new(Int32Array::from(vec![partition; n])),
            Arc::new(Int64Array::from(self.offset.clone())),
        ];
        let fail = |e: String| JobError::Internal(format!("encode batch of partition {partition}: {e}"));
        let batch = RecordBatch::try_new(ratings_schema(), cols).map_err(|e| fail(e.to_string()))?;
        let mut out = Vec::with_capacity(n * 4 + 1024);
        let mut writer =
            ArrowWriter::try_new(&mut out, ratings_schema(), Some(writer_properties())).map_err(|e| fail(e.to_string()))?;
        writer.write(&batch).map_err(|e| fail(e.to_string()))?;
        writer.close().map_err(|e| fail(e.to_string()))?;
        Ok(Bytes::from(out))
    }

    /// Encodes the dead letters as JSON lines.
    pub fn dead_letters_jsonl(&self) -> Bytes {
        let mut out = Vec::new();
        for dead in &self.dead {
            if serde_json::to_writer(&mut out, dead).is_ok() {
                out.push(b'\n');
            }
        }
        Bytes::from(out)
    }
}

/// Offsets and timestamps climb steadily within a partition: delta encoding stores them in a
/// few bits each, where dictionaries would not help at all.
fn writer_properties() -> WriterProperties {
    let delta = |b: parquet::file::properties::WriterPropertiesBuilder, col: &str| {
        b.set_column_dictionary_enabled(ColumnPath::from(col), false)
            .set_column_encoding(ColumnPath::from(col), Encoding::DELTA_BINARY_PACKED)
    };
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_max_row_group_row_count(Some(1 << 20));
    b = delta(b, columns::KAFKA_OFFSET);
    b = delta(b, columns::TS);
    b.build()
}

/// The batch being filled: one buffer per partition, closed by size, age or shutdown.
#[derive(Debug, Default)]
pub struct Batch {
    /// Buffers by partition.
    pub partitions: BTreeMap<i32, PartitionBuffer>,
    opened_at: Option<Instant>,
    messages: usize,
}

impl Batch {
    /// The buffer of `partition`, opening the batch's clock on first use.
    pub fn partition(&mut self, partition: i32) -> &mut PartitionBuffer {
        self.opened_at.get_or_insert_with(Instant::now);
        self.messages += 1;
        self.partitions.entry(partition).or_default()
    }

    /// Messages buffered (ratings and dead letters).
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// When the first message of the batch arrived.
    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// Forgets what a revoked partition buffered; returns how many messages that was.
    pub fn drop_partition(&mut self, partition: i32) -> usize {
        let dropped = self.partitions.remove(&partition).map(|b| b.rows() + b.dead.len()).unwrap_or(0);
        self.messages -= dropped;
        if self.messages == 0 {
            self.opened_at = None;
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    #[test]
    fn parquet_holds_exactly_what_was_buffered() {
        let mut buf = PartitionBuffer::default();
        for i in 0..1000 {
            let event = RatingEvent::new(1 + i % 7, 10 + i, 0.5 + (i % 10) as f64 / 2.0, 1_000 + i).unwrap();
            buf.push_rating(500 + i, &event);
        }
        assert_eq!(buf.range(), Some(OffsetRange { first: 500, last: 1499 }));
        let bytes = buf.to_parquet(2).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap().build().unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1000);
        let b = &batches[0];
        assert_eq!(b.schema(), ratings_schema());
        let offsets = b.column(5).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(offsets.value(0), 500);
        assert_eq!(offsets.value(999), 1499);
        // Delta-encoded offsets and timestamps keep a rating well under 8 bytes here.
        assert!(bytes.len() < 8 * 1000, "{} bytes", bytes.len());
    }

    #[test]
    fn dropping_a_partition_forgets_only_it() {
        let mut batch = Batch::default();
        let event = RatingEvent::new(1, 2, 3.0, 4).unwrap();
        batch.partition(0).push_rating(0, &event);
        batch.partition(1).push_rating(0, &event);
        batch.partition(1).push_rating(1, &event);
        assert_eq!(batch.drop_partition(1), 2);
        assert_eq!(batch.messages(), 1);
        assert!(batch.partitions.contains_key(&0));
    }
}
