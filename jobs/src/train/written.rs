//! What the trainer records of a Parquet file written into the model store: rows, bytes and
//! SHA-256. The engine writes a round's files itself (on a cluster, the executors do), and
//! [`read_back`] checksums each as it streams in, a chunk at a time: on a cluster no file's
//! rows pass through the trainer, so its memory does not grow with the lake. [`parquet_rows`]
//! reads a file's rows from its footer, for these files and for the lake's event files.

use futures::StreamExt;
use lensflow_core::Lake;
use lensflow_core::model::hex;
use object_store::path::Path;
use object_store::{GetResult, ObjectStoreExt};
use parquet::file::FOOTER_SIZE;
use parquet::file::metadata::ParquetMetaDataReader;
use sha2::{Digest, Sha256};

use crate::{JobError, Result};

/// What a written file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenFile {
    /// Where the file is, inside the store.
    pub path: String,
    /// Rows in the file.
    pub rows: u64,
    /// The file's size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

/// Reads back the files one engine write made (`paths`, inside `store`) and checks that they
/// hold the `written` rows the write reported: a write task tried twice (an executor lost
/// mid-way) could otherwise leave a second copy of some rows. `url` names the write's output
/// in the error.
pub async fn read_back_write(store: &Lake, what: &str, url: &str, written: u64, paths: &[String]) -> Result<Vec<WrittenFile>> {
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        files.push(read_back(store, path).await?);
    }
    let found: u64 = files.iter().map(|f| f.rows).sum();
    if found != written {
        return Err(JobError::Engine { what: what.into(), reason: format!("{url} holds {found} rows, but the query wrote {written}") });
    }
    Ok(files)
}

/// What the Parquet file at `path` (inside `store`) holds, read back: its bytes and checksum
/// hashed as it streams in, a chunk at a time, then its rows from the footer.
pub async fn read_back(store: &Lake, path: &str) -> Result<WrittenFile> {
    let unreadable = |e: String| JobError::Internal(format!("reading {}: {e}", store.url_of(path)));
    let location = Path::from(path);
    let got = store.store().get(&location).await.map_err(|e| unreadable(e.to_string()))?;
    let (bytes, sha256) = hash(got).await.map_err(|e| unreadable(e.to_string()))?;
    let rows = parquet_rows(store, &location, bytes).await.map_err(unreadable)?;
    Ok(WrittenFile { path: path.to_string(), rows, bytes, sha256 })
}

/// The size and SHA-256 of the object at `path`, hashed as it streams in.
pub async fn checksum(store: &Lake, path: &str) -> std::result::Result<(u64, String), object_store::Error> {
    hash(store.store().get(&Path::from(path)).await?).await
}

async fn hash(got: GetResult) -> std::result::Result<(u64, String), object_store::Error> {
    let mut chunks = got.into_stream();
    let (mut sha, mut bytes) = (Sha256::new(), 0u64);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        sha.update(&chunk);
        bytes += chunk.len() as u64;
    }
    Ok((bytes, hex(&sha.finalize())))
}

/// Bytes read from a file's end in one request: enough for the footers the engine and the
/// consumer write, so that most files need a single request for their rows.
const TAIL_READ: u64 = 64 * 1024;

/// The rows of the Parquet file at `location`, `size` bytes long, from its footer; or why the
/// file is not whole Parquet.
pub async fn parquet_rows(store: &Lake, location: &Path, size: u64) -> std::result::Result<u64, String> {
    // The magic `PAR1` at the start, and the footer's length and the magic at the end.
    let smallest = 4 + FOOTER_SIZE as u64;
    if size < smallest {
        return Err(format!("{size} bytes is too short for Parquet"));
    }
    let store = store.store();
    let start = size.saturating_sub(TAIL_READ);
    let tail = store.get_range(location, start..size).await.map_err(|e| e.to_string())?;
    // A Parquet file ends in its footer's length and the magic `PAR1`.
    let end = &tail[tail.len() - FOOTER_SIZE..];
    if &end[4..] != b"PAR1" {
        return Err("not a Parquet file".into());
    }
    let length = u32::from_le_bytes([end[0], end[1], end[2], end[3]]) as u64;
    if length + smallest > size {
        return Err("its Parquet footer is cut off".into());
    }
    let footer_start = size - FOOTER_SIZE as u64 - length;
    let footer = match footer_start.checked_sub(start) {
        Some(offset) => tail.slice(offset as usize..tail.len() - FOOTER_SIZE),
        None => store.get_range(location, footer_start..size - FOOTER_SIZE as u64).await.map_err(|e| e.to_string())?,
    };
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

    /// `rows` rows of two columns in row groups of `group_rows`, as Parquet bytes.
    fn parquet_of(rows: i64, group_rows: usize) -> Vec<u8> {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("x", DataType::Float64, false)]));
        let ids: Int64Array = (0..rows).collect();
        let xs: Float64Array = (0..rows).map(|i| i as f64 * 0.5).collect();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(xs)]).unwrap();
        let props = WriterProperties::builder().set_max_row_group_row_count(Some(group_rows)).build();
        let mut bytes = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, schema, Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        bytes
    }

    fn footer_length(bytes: &[u8]) -> u64 {
        let n = bytes.len();
        u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as u64
    }

    #[tokio::test]
    async fn a_file_read_back_says_its_rows_size_and_checksum_whatever_its_footer_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
        std::fs::create_dir_all(dir.path().join("round-000001")).unwrap();
        // A footer inside the first read of the tail, and one longer than it.
        let small = parquet_of(350_000, 10_000);
        let large = parquet_of(350_000, 350);
        assert!(footer_length(&small) < TAIL_READ && footer_length(&large) > TAIL_READ);
        for (name, bytes) in [("small", &small), ("large", &large)] {
            let path = format!("round-000001/lookup-{name}.parquet");
            std::fs::write(dir.path().join(&path), bytes).unwrap();
            let done = read_back(&store, &path).await.unwrap();
            assert_eq!(done, WrittenFile { path, rows: 350_000, bytes: bytes.len() as u64, sha256: sha256_hex(bytes) });
        }
    }

    #[tokio::test]
    async fn a_write_whose_files_hold_other_rows_than_it_wrote_is_an_error_with_both_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("out/a.parquet"), parquet_of(1000, 100)).unwrap();
        std::fs::write(dir.path().join("out/b.parquet"), parquet_of(500, 100)).unwrap();
        let paths = vec!["out/a.parquet".to_string(), "out/b.parquet".to_string()];
        let files = read_back_write(&store, "test write", "file:///out/", 1500, &paths).await.unwrap();
        assert_eq!(files.iter().map(|f| (f.path.as_str(), f.rows)).collect::<Vec<_>>(), [("out/a.parquet", 1000), ("out/b.parquet", 500)]);
        let twice = read_back_write(&store, "test write", "file:///out/", 1000, &paths).await.unwrap_err().to_string();
        assert!(twice.contains("file:///out/ holds 1500 rows, but the query wrote 1000"), "{twice}");
    }

    #[tokio::test]
    async fn a_file_that_is_not_whole_parquet_or_not_there_is_an_error_naming_it_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let store = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
        let whole = parquet_of(1000, 100);
        let cut_off = [&whole[..4], &whole[whole.len() - 8..]].concat();
        for (name, bytes, why) in [
            ("short", &b"PAR1"[..], "too short for Parquet"),
            ("csv", &b"user_id,movie_id,rating\n1,2,3.5\n"[..], "not a Parquet file"),
            ("cut", &cut_off[..], "footer is cut off"),
        ] {
            let path = format!("{name}.parquet");
            std::fs::write(dir.path().join(&path), bytes).unwrap();
            let e = read_back(&store, &path).await.unwrap_err().to_string();
            assert!(e.contains(&path) && e.contains(why), "{name}: {e}");
        }
        let missing = read_back(&store, "missing.parquet").await.unwrap_err().to_string();
        assert!(missing.contains("missing.parquet"), "{missing}");
    }
}
