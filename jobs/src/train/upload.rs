//! Parquet files the trainer writes into the model store while it encodes them: the carried
//! state's segment files and a round's lookup tables. The bytes go to the store as an upload
//! in parts and are hashed on the way, so a file of any size costs the trainer one row group
//! and one upload part of memory, never the whole file (on a cluster, the trainer's memory
//! must not grow with the lake).

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use futures::future::BoxFuture;
use lensflow_core::Lake;
use lensflow_core::model::hex;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use parquet::arrow::AsyncArrowWriter;
use parquet::arrow::async_writer::AsyncFileWriter;
use parquet::file::properties::WriterProperties;
use sha2::{Digest, Sha256};

use crate::{JobError, Result};

/// Bytes buffered before the upload goes in parts, and the size of each part.
const UPLOAD_PART: usize = 5 * 1024 * 1024;

/// A Parquet file being written to a store.
pub struct ParquetUpload {
    path: String,
    writer: AsyncArrowWriter<Hashing>,
    rows: u64,
}

/// What a finished upload wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Uploaded {
    /// Rows in the file.
    pub rows: u64,
    /// The file's size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

/// Passes the encoded bytes on to the store and hashes them.
struct Hashing {
    inner: BufWriter,
    sha: Sha256,
    bytes: u64,
}

impl AsyncFileWriter for Hashing {
    fn write(&mut self, bs: Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        self.sha.update(&bs);
        self.bytes += bs.len() as u64;
        AsyncFileWriter::write(&mut self.inner, bs)
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        AsyncFileWriter::complete(&mut self.inner)
    }
}

impl ParquetUpload {
    /// Starts the file `path` (inside `store`) with rows of `schema`. Nothing is visible at
    /// `path` until [`ParquetUpload::finish`] succeeds.
    pub fn new(store: &Lake, path: &str, schema: SchemaRef, props: WriterProperties) -> Result<ParquetUpload> {
        // Parts of 5 MiB (S3's smallest), at most two in flight: what the upload holds stays
        // small however big the file (object_store's default is 10 MiB parts, eight at a time).
        let inner = BufWriter::with_capacity(store.store(), Path::from(path), UPLOAD_PART).with_max_concurrency(2);
        let hashing = Hashing { inner, sha: Sha256::new(), bytes: 0 };
        let writer = AsyncArrowWriter::try_new(hashing, schema, Some(props)).map_err(failed(store, path))?;
        Ok(ParquetUpload { path: path.to_string(), writer, rows: 0 })
    }

    /// Appends a batch (sent on once a row group fills).
    pub async fn write(&mut self, store: &Lake, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).await.map_err(failed(store, &self.path))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes the footer and completes the upload.
    pub async fn finish(mut self, store: &Lake) -> Result<Uploaded> {
        self.writer.finish().await.map_err(failed(store, &self.path))?;
        let hashing = self.writer.into_inner();
        Ok(Uploaded { rows: self.rows, bytes: hashing.bytes, sha256: hex(&hashing.sha.finalize()) })
    }
}

fn failed<'a>(store: &'a Lake, path: &'a str) -> impl FnOnce(parquet::errors::ParquetError) -> JobError + 'a {
    move |e| JobError::Internal(format!("writing {}: {e}", store.url_of(path)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, Int64Array};
    use arrow_schema::{DataType, Field, Schema};
    use lensflow_core::StorageOptions;
    use lensflow_core::model::sha256_hex;

    use super::*;

    #[tokio::test]
    async fn an_upload_is_the_file_an_in_memory_writer_makes_and_says_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("x", DataType::Float64, false)]));
        let batches: Vec<RecordBatch> = (0..5)
            .map(|b| {
                let ids: Int64Array = (b * 70_000..(b + 1) * 70_000).collect();
                let xs: Float64Array = (b * 70_000..(b + 1) * 70_000).map(|i| i as f64 * 0.5).collect();
                RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(xs)]).unwrap()
            })
            .collect();
        // Small row groups and upload parts, so that the file goes up in many pieces.
        let props = || WriterProperties::builder().set_max_row_group_row_count(Some(50_000)).build();
        let mut upload = ParquetUpload::new(&store, "round-000001/lookup-x.parquet", schema.clone(), props()).unwrap();
        for b in &batches {
            upload.write(&store, b).await.unwrap();
        }
        assert!(!dir.path().join("round-000001/lookup-x.parquet").exists(), "visible before it is finished");
        let done = upload.finish(&store).await.unwrap();

        let mut expected = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut expected, schema, Some(props())).unwrap();
        for b in &batches {
            writer.write(b).unwrap();
        }
        writer.close().unwrap();
        let stored = std::fs::read(dir.path().join("round-000001/lookup-x.parquet")).unwrap();
        assert_eq!(stored, expected);
        assert_eq!(done, Uploaded { rows: 350_000, bytes: stored.len() as u64, sha256: sha256_hex(&stored) });
    }
}
