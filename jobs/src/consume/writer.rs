//! The open batch: events and dead letters buffered per partition, and their encoding as one
//! Parquet file (and one dead-letter file) per partition.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use lensflow_core::pipeline::event::{Event, EventColumns};
use lensflow_core::pipeline::{ColumnType, KAFKA_OFFSET};
use lensflow_core::{DeadLetter, OffsetRange, Pipeline};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::{JobError, Result};

/// What one partition contributed to the open batch.
#[derive(Debug)]
pub struct PartitionBuffer {
    first: Option<i64>,
    last: i64,
    events: EventColumns,
    /// Messages that were not events.
    pub dead: Vec<DeadLetter>,
}

impl PartitionBuffer {
    /// An empty buffer for `pipeline`'s events.
    pub fn new(pipeline: &Pipeline) -> PartitionBuffer {
        PartitionBuffer { first: None, last: 0, events: EventColumns::new(pipeline), dead: Vec::new() }
    }

    fn note_offset(&mut self, offset: i64) {
        self.first.get_or_insert(offset);
        self.last = offset;
    }

    /// Adds a good event read at `offset`.
    pub fn push_event(&mut self, offset: i64, event: &Event) {
        self.note_offset(offset);
        self.events.push(offset, event);
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

    /// Good events buffered.
    pub fn rows(&self) -> usize {
        self.events.len()
    }

    /// Earliest and latest event time, if events are buffered and the pipeline has a time column.
    pub fn time_span(&self) -> Option<(i64, i64)> {
        self.events.time_span()
    }

    /// Encodes the events as a Parquet file of `pipeline`'s lake schema.
    pub fn to_parquet(&self, pipeline: &Pipeline, partition: i32) -> Result<Bytes> {
        let fail = |e: String| JobError::Internal(format!("encode batch of partition {partition}: {e}"));
        let batch = self.events.to_record_batch(pipeline, partition).map_err(fail)?;
        let mut out = Vec::with_capacity(self.rows() * 4 + 1024);
        let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(writer_properties(pipeline))).map_err(|e| fail(e.to_string()))?;
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

/// Offsets and event times climb steadily within a partition: delta encoding stores them in a
/// few bits each, where dictionaries would not help at all.
pub fn writer_properties(pipeline: &Pipeline) -> WriterProperties {
    let delta = |b: parquet::file::properties::WriterPropertiesBuilder, col: &str| {
        b.set_column_dictionary_enabled(ColumnPath::from(col), false).set_column_encoding(ColumnPath::from(col), Encoding::DELTA_BINARY_PACKED)
    };
    let mut b =
        WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default())).set_max_row_group_row_count(Some(1 << 20));
    b = delta(b, KAFKA_OFFSET);
    // Delta encoding is for integers only; the checks require an int64 time column anyway.
    if let Some(time) = pipeline.definition.events.time.as_deref().filter(|t| pipeline.column(t).is_some_and(|c| c.kind == ColumnType::Int64)) {
        b = delta(b, time);
    }
    b.build()
}

/// The batch being filled: one buffer per partition, closed by size, age or shutdown.
#[derive(Debug)]
pub struct Batch {
    pipeline: Pipeline,
    /// Buffers by partition.
    pub partitions: BTreeMap<i32, PartitionBuffer>,
    opened_at: Option<Instant>,
    messages: usize,
}

impl Batch {
    /// An empty batch of `pipeline`'s events.
    pub fn new(pipeline: &Pipeline) -> Batch {
        // A copy per batch costs microseconds and keeps the batch free of borrows.
        Batch { pipeline: pipeline.clone(), partitions: BTreeMap::new(), opened_at: None, messages: 0 }
    }

    /// The pipeline whose events the batch holds.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The buffer of `partition`, opening the batch's clock on first use.
    pub fn partition(&mut self, partition: i32) -> &mut PartitionBuffer {
        self.opened_at.get_or_insert_with(Instant::now);
        self.messages += 1;
        self.partitions.entry(partition).or_insert_with(|| PartitionBuffer::new(&self.pipeline))
    }

    /// Messages buffered (events and dead letters).
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
    use arrow_array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
    use lensflow_core::pipeline::event::Value;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    fn builtin(name: &str) -> Pipeline {
        Pipeline::builtin(name).unwrap().unwrap()
    }

    fn read(bytes: Bytes) -> Vec<RecordBatch> {
        ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap().map(|b| b.unwrap()).collect()
    }

    #[test]
    fn parquet_holds_exactly_what_was_buffered() {
        let p = builtin("movielens");
        let mut buf = PartitionBuffer::new(&p);
        for i in 0..1000 {
            let event = Event(vec![Value::Int(1 + i % 7), Value::Int(10 + i), Value::Float(0.5 + (i % 10) as f64 / 2.0), Value::Int(1_000 + i)]);
            buf.push_event(500 + i, &event);
        }
        assert_eq!(buf.range(), Some(OffsetRange { first: 500, last: 1499 }));
        assert_eq!(buf.time_span(), Some((1_000, 1_999)));
        let bytes = buf.to_parquet(&p, 2).unwrap();
        let batches = read(bytes.clone());
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1000);
        let b = &batches[0];
        assert_eq!(b.schema(), p.lake_schema());
        let offsets = b.column_by_name(KAFKA_OFFSET).unwrap().as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!((offsets.value(0), offsets.value(999)), (500, 1499));
        // Delta-encoded offsets and timestamps keep a rating well under 8 bytes here.
        assert!(bytes.len() < 8 * 1000, "{} bytes", bytes.len());
    }

    #[test]
    fn a_pipeline_without_time_writes_its_own_columns() {
        let p = builtin("smart-home");
        let mut buf = PartitionBuffer::new(&p);
        let text = |s: &str| Value::Text(s.into());
        buf.push_event(
            0,
            &Event(vec![Value::Int(1), text("Camera"), Value::Float(1.5), Value::Float(2.0), Value::Int(1), Value::Int(0), Value::Int(12), Value::Int(1)]),
        );
        buf.push_event(
            1,
            &Event(vec![Value::Int(2), text("Lights"), Value::Float(3.0), Value::Float(0.5), Value::Int(0), Value::Int(2), Value::Int(40), Value::Int(0)]),
        );
        assert_eq!(buf.time_span(), None);
        let batches = read(buf.to_parquet(&p, 0).unwrap());
        let b = &batches[0];
        assert_eq!(b.schema(), p.lake_schema());
        let kinds = b.column_by_name("device_type").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!((kinds.value(0), kinds.value(1)), ("Camera", "Lights"));
        let energy = b.column_by_name("energy_consumption").unwrap().as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(energy.value(1), 0.5);
        assert_eq!(b.column_by_name("smart_home_efficiency").unwrap().null_count(), 0);
    }

    #[test]
    fn dropping_a_partition_forgets_only_it() {
        let mut batch = Batch::new(&builtin("movielens"));
        let event = Event(vec![Value::Int(1), Value::Int(2), Value::Float(3.0), Value::Int(4)]);
        batch.partition(0).push_event(0, &event);
        batch.partition(1).push_event(0, &event);
        batch.partition(1).push_event(1, &event);
        assert_eq!(batch.drop_partition(1), 2);
        assert_eq!(batch.messages(), 1);
        assert!(batch.partitions.contains_key(&0));
    }
}
