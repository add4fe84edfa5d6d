//! What the trainer records of a Parquet file written into the model store: rows, bytes and
//! SHA-256. The engine writes a round's files itself (on a cluster, the executors do), and
//! [`read_back`] checksums each as it streams in, a chunk at a time: on a cluster no file's
//! rows pass through the trainer, so its memory does not grow with the lake.

use lensflow_core::Lake;
use lensflow_core::model::hex;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use parquet::file::FOOTER_SIZE;
use parquet::file::metadata::{FooterTail, ParquetMetaDataReader};
use sha2::{Digest, Sha256};

use futures::StreamExt;

use crate::{JobError, Result};

/// What a written file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenFile {
    /// Rows in the file.
    pub rows: u64,
    /// The file's size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

/// What the Parquet file at `path` (inside `store`) holds, read back: its rows from the footer,
/// its bytes and checksum hashed as it streams in.
pub async fn read_back(store: &Lake, path: &str) -> Result<WrittenFile> {
    let unreadable = |e: String| JobError::Internal(format!("reading {}: {e}", store.url_of(path)));
    let location = Path::from(path);
    let size = store.store().head(&location).await.map_err(|e| unreadable(e.to_string()))?.size;
    let rows = footer_rows(store, &location, size).await.map_err(unreadable)?;
    let (bytes, sha256) = checksum(store, path).await.map_err(|e| unreadable(e.to_string()))?;
    Ok(WrittenFile { rows, bytes, sha256 })
}

/// The size and SHA-256 of the object at `path`, hashed as it streams in.
pub async fn checksum(store: &Lake, path: &str) -> std::result::Result<(u64, String), object_store::Error> {
    let mut chunks = store.store().get(&Path::from(path)).await?.into_stream();
    let (mut sha, mut bytes) = (Sha256::new(), 0u64);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        sha.update(&chunk);
        bytes += chunk.len() as u64;
    }
    Ok((bytes, hex(&sha.finalize())))
}

/// The rows of the Parquet file at `location`, `size` bytes long, from its footer.
async fn footer_rows(store: &Lake, location: &Path, size: u64) -> std::result::Result<u64, String> {
    let store = store.store();
    let tail = store.get_range(location, size.saturating_sub(FOOTER_SIZE as u64)..size).await.map_err(|e| e.to_string())?;
    let tail: &[u8; FOOTER_SIZE] = tail.as_ref().try_into().map_err(|_| "shorter than a Parquet footer".to_string())?;
    let length = FooterTail::try_new(tail).map_err(|e| e.to_string())?.metadata_length() as u64;
    let end = size - FOOTER_SIZE as u64;
    let footer = store.get_range(location, end.saturating_sub(length)..end).await.map_err(|e| e.to_string())?;
    Ok(ParquetMetaDataReader::decode_metadata(&footer).map_err(|e| e.to_string())?.file_metadata().num_rows() as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use lensflow_core::StorageOptions;
    use lensflow_core::model::sha256_hex;
    use parquet::file::properties::WriterProperties;

    use super::*;

    #[tokio::test]
    async fn a_file_read_back_says_its_rows_size_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("x", DataType::Float64, false)]));
        let ids: Int64Array = (0..350_000).collect();
        let xs: Float64Array = (0..350_000).map(|i| i as f64 * 0.5).collect();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(xs)]).unwrap();
        // Many row groups, so that the footer is more than a few bytes.
        let props = WriterProperties::builder().set_max_row_group_row_count(Some(10_000)).build();
        let mut bytes = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, schema, Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        std::fs::create_dir_all(dir.path().join("round-000001")).unwrap();
        std::fs::write(dir.path().join("round-000001/lookup-x.parquet"), &bytes).unwrap();

        let done = read_back(&store, "round-000001/lookup-x.parquet").await.unwrap();
        assert_eq!(done, WrittenFile { rows: 350_000, bytes: bytes.len() as u64, sha256: sha256_hex(&bytes) });
    }

    #[tokio::test]
    async fn a_file_that_is_not_parquet_or_not_there_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
        std::fs::write(dir.path().join("short.parquet"), b"PAR1").unwrap();
        let short = read_back(&store, "short.parquet").await.unwrap_err().to_string();
        assert!(short.contains("short.parquet"), "{short}");
        let missing = read_back(&store, "missing.parquet").await.unwrap_err().to_string();
        assert!(missing.contains("missing.parquet"), "{missing}");
    }
}
