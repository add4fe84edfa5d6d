//! Storage: the lake and the model store on an object store. Open one from a URL, list and read
//! manifests, commit a batch by creating its manifest, and read batch files back. Both ingest
//! and serving use it, so it lives with the contracts.
//!
//! `file:///abs/path` (or a plain local path) is a folder; `s3://bucket/prefix` is an S3 bucket
//! configured by the `AWS_*` settings the caller passes in ([`StorageOptions`]), which is also
//! how a MinIO-style endpoint over plain http is reached.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::RetryConfig;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::lake::{BATCHES_DIR, COMPACTIONS_DIR, manifest_path, parse_compaction_path, parse_manifest_path, resolve_event_files};
use crate::{BatchFile, BatchManifest, CompactionRecord, EventFiles, LakeError};

/// What can go wrong with storage; each variant names the object or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A lake or model store URL or setting that cannot work.
    #[error("invalid --{option}: {reason}")]
    Config {
        /// The flag's name.
        option: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A local folder could not be created.
    #[error("{path}: {source}")]
    Io {
        /// The folder.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The object store failed (worth retrying: storage may be down).
    #[error("storage, {path}: {source}")]
    Store {
        /// The object's path.
        path: String,
        /// What the store said.
        source: object_store::Error,
    },
    /// A manifest is unreadable or breaks the manifest rules.
    #[error(transparent)]
    Manifest(#[from] LakeError),
    /// The lake's content contradicts itself (not worth retrying: it needs a person).
    #[error("lake content: {0}")]
    LakeContent(String),
    /// A batch file named by a manifest cannot be decoded.
    #[error("batch file {path}: {reason}")]
    BatchFile {
        /// The file's path in the lake.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl StoreError {
    /// Whether the object was simply not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::Store { source: object_store::Error::NotFound { .. }, .. })
    }

    /// A mapper that names the object at fault.
    pub fn store(path: impl std::fmt::Display) -> impl FnOnce(object_store::Error) -> StoreError {
        let path = path.to_string();
        move |source| StoreError::Store { path, source }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Object-store settings as `(key, value)` pairs, e.g. the process's `AWS_*` variables
/// (`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, …).
#[derive(Debug, Clone, Default)]
pub struct StorageOptions(pub Vec<(String, String)>);

/// A lake: an object store plus the absolute URL of its root. The model store is opened the
/// same way (it is just another folder or bucket prefix).
#[derive(Debug, Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    url: String,
}

impl Lake {
    /// Opens the lake at `url`: `file:///abs/path`, a plain local path, or `s3://bucket/prefix`.
    /// A local folder is created if it does not exist yet.
    pub fn open(url: &str, storage: &StorageOptions) -> Result<Lake> {
        let bad = |reason: String| StoreError::Config { option: "lake", reason: format!("{url}: {reason}") };
        let store: Arc<dyn ObjectStore> = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket name".into()));
            }
            // A few quick tries per request, not object_store's default of ten over three
            // minutes: a longer outage then reaches the caller's own retry loop, which logs it,
            // counts it and bounds it (the consumer's --store-retry-for), instead of stalling
            // silently inside one request.
            let retry = RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(15), ..RetryConfig::default() };
            let mut builder = AmazonS3Builder::new().with_bucket_name(bucket).with_retry(retry);
            for (key, value) in &storage.0 {
                // Unknown AWS_* variables (profiles, SDK switches) are not object-store settings.
                if let Ok(key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    builder = builder.with_config(key, value);
                }
            }
            let s3 = builder.build().map_err(|e| bad(e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) }
        } else {
            let dir = match url.strip_prefix("file://") {
                Some(path) if path.starts_with('/') => std::path::PathBuf::from(path),
                Some(_) => return Err(bad("a file:// URL needs an absolute path, e.g. file:///srv/lake".into())),
                None if url.contains("://") => return Err(bad("only file:// and s3:// lakes are supported".into())),
                None => std::path::PathBuf::from(url),
            };
            std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
            let dir = std::fs::canonicalize(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
            let store = Arc::new(LocalFileSystem::new_with_prefix(&dir).map_err(|e| bad(e.to_string()))?);
            return Ok(Lake { store, url: format!("file://{}", dir.display()) });
        };
        Ok(Lake { store, url: url.trim_end_matches('/').to_string() })
    }

    /// The lake's root as an absolute URL (`file:///abs/path` or `s3://bucket/prefix`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The absolute URL of an object in the lake, as a query engine on another machine needs it.
    pub fn url_of(&self, path: &str) -> String {
        format!("{}/{}", self.url, path.trim_start_matches('/'))
    }

    /// The folder `name` inside this store, as a store of its own: each pipeline's lake and
    /// models live in a folder named after it, so pipelines can share a bucket.
    pub fn child(&self, name: &str) -> Lake {
        Lake { store: Arc::new(PrefixStore::new(self.store.clone(), name)), url: self.url_of(name) }
    }

    /// The object store behind the lake, rooted at the lake.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Every committed batch, in batch order.
    pub async fn manifests(&self) -> Result<Vec<BatchManifest>> {
        self.manifests_after(0).await
    }

    /// The committed batches numbered above `after`, in order. Batch numbers are dense, so a
    /// hole means someone removed a manifest: that is reported, never skipped over.
    pub async fn manifests_after(&self, after: u64) -> Result<Vec<BatchManifest>> {
        let prefix = Path::from(BATCHES_DIR);
        let offset = Path::from(manifest_path(after));
        let metas: Vec<_> = self.store.list_with_offset(Some(&prefix), &offset).try_collect().await.map_err(StoreError::store(BATCHES_DIR))?;
        let mut numbered: Vec<(u64, Path)> =
            metas.into_iter().filter_map(|m| parse_manifest_path(m.location.as_ref()).map(|n| (n, m.location))).filter(|(n, _)| *n > after).collect();
        numbered.sort_by_key(|(n, _)| *n);
        let mut manifests = Vec::with_capacity(numbered.len());
        for (expected, (n, path)) in (after + 1..).zip(numbered) {
            if n != expected {
                return Err(StoreError::LakeContent(format!("batch {expected} is missing while batch {n} exists ({})", manifest_path(expected))));
            }
            let bytes = self.get(&path).await?;
            manifests.push(BatchManifest::from_json(path.as_ref(), &bytes)?);
        }
        Ok(manifests)
    }

    /// Every object under `prefix` (`""`: the whole lake), in no particular order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Path>> {
        let prefix = (!prefix.is_empty()).then(|| Path::from(prefix));
        let metas: Vec<_> = self.store.list(prefix.as_ref()).try_collect().await.map_err(StoreError::store(self.url.as_str()))?;
        Ok(metas.into_iter().map(|m| m.location).collect())
    }

    /// Writes an object, replacing any earlier one at the same path.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<()> {
        self.store.put(&Path::from(path), PutPayload::from(bytes)).await.map_err(StoreError::store(path))?;
        Ok(())
    }

    /// Commits a batch by creating its manifest, only if no manifest with its number exists.
    /// Returns `false` when another writer took the number first.
    pub async fn try_commit(&self, manifest: &BatchManifest) -> Result<bool> {
        self.create(&manifest_path(manifest.batch), manifest.to_json().into()).await
    }

    /// Creates an object only if nothing is at `path` yet; `false` when something was.
    pub async fn create(&self, path: &str, bytes: Bytes) -> Result<bool> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&Path::from(path), bytes.into(), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(StoreError::store(path)(e)),
        }
    }

    /// Every compaction record, in number order.
    pub async fn compactions(&self) -> Result<Vec<CompactionRecord>> {
        let prefix = Path::from(COMPACTIONS_DIR);
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await.map_err(StoreError::store(COMPACTIONS_DIR))?;
        let mut numbered: Vec<(u64, Path)> = metas.into_iter().filter_map(|m| parse_compaction_path(m.location.as_ref()).map(|n| (n, m.location))).collect();
        numbered.sort_by_key(|(n, _)| *n);
        let mut records = Vec::with_capacity(numbered.len());
        for (_, path) in numbered {
            let bytes = self.get(&path).await?;
            records.push(CompactionRecord::from_json(path.as_ref(), &bytes)?);
        }
        Ok(records)
    }

    /// The event files holding the events of `manifests`, through the lake's compaction
    /// records (see [`EventFiles`] for reading part of a compacted run).
    pub async fn event_files(&self, manifests: &[BatchManifest]) -> Result<EventFiles> {
        let records = if manifests.is_empty() { Vec::new() } else { self.compactions().await? };
        Ok(resolve_event_files(manifests, &records))
    }

    /// Removes an object; one already gone is fine.
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&Path::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::store(path)(e)),
        }
    }

    /// Reads an object whole.
    pub async fn get(&self, path: &Path) -> Result<Bytes> {
        let result = self.store.get(path).await.map_err(StoreError::store(path))?;
        result.bytes().await.map_err(StoreError::store(path))
    }

    /// Reads one batch file, checking its row count against its manifest.
    pub async fn read_batch_file(&self, file: &BatchFile) -> Result<Vec<RecordBatch>> {
        let bytes = self.get(&Path::from(file.path.as_str())).await?;
        let bad = |reason: String| StoreError::BatchFile { path: file.path.clone(), reason };
        let (_, batches) = read_parquet(bytes).map_err(bad)?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows as u64 != file.rows {
            return Err(bad(format!("holds {rows} rows, its manifest says {}", file.rows)));
        }
        Ok(batches)
    }

    /// Every event of every committed batch, in batch order.
    pub async fn read_all(&self) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        // Every batch: whole compacted runs, so no event needs filtering out.
        for file in self.event_files(&self.manifests().await?).await?.files {
            out.extend(self.read_batch_file(&file).await?);
        }
        Ok(out)
    }
}

/// Decodes a whole Parquet file: its Arrow schema and its rows. The Parquet and Arrow readers
/// panic on some damaged files (an unknown type in the embedded Arrow schema, a page shorter
/// than its header says) instead of returning an error, so a panic while decoding is caught and
/// returned as the error: a damaged file must refuse what it belongs to, not stop the process.
pub fn read_parquet(bytes: Bytes) -> Result<(arrow_schema::SchemaRef, Vec<RecordBatch>), String> {
    let decode = || -> Result<_, String> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| format!("not a readable Parquet file: {e}"))?;
        let schema = builder.schema().clone();
        let reader = builder.build().map_err(|e| format!("not a readable Parquet file: {e}"))?;
        let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
        Ok((schema, batches))
    };
    // Nothing outside the closure is touched, so nothing is left half-changed by a panic.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|panic| {
        let what = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("a panic");
        Err(format!("not a readable Parquet file: the reader failed on it ({what})"))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::lake::MANIFEST_FORMAT_VERSION;

    use super::*;

    fn manifest(batch: u64) -> BatchManifest {
        BatchManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            batch,
            topic: "t".into(),
            writer: "w".into(),
            created_at_ms: 0,
            partitions: BTreeMap::new(),
            files: vec![],
            dead_letters: vec![],
            rows: 0,
            dead_letter_count: 0,
            min_ts: None,
            max_ts: None,
        }
    }

    #[tokio::test]
    async fn a_batch_number_is_committed_once() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(&format!("file://{}", dir.path().display()), &StorageOptions::default()).unwrap();
        assert!(lake.try_commit(&manifest(1)).await.unwrap());
        assert!(!lake.try_commit(&manifest(1)).await.unwrap(), "second create of batch 1 must lose");
        assert!(lake.try_commit(&manifest(2)).await.unwrap());
        let all = lake.manifests().await.unwrap();
        assert_eq!(all.iter().map(|m| m.batch).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(lake.manifests_after(1).await.unwrap().len(), 1);
        assert!(lake.try_commit(&manifest(4)).await.unwrap());
        let err = lake.manifests().await.unwrap_err().to_string();
        assert!(err.contains("batch 3 is missing"), "{err}");
    }

    #[test]
    fn refuses_urls_it_cannot_serve() {
        let opts = StorageOptions::default();
        assert!(Lake::open("file://relative/path", &opts).unwrap_err().to_string().contains("absolute"));
        assert!(Lake::open("gs://bucket/x", &opts).unwrap_err().to_string().contains("only file:// and s3://"));
        assert!(Lake::open("s3:///x", &opts).unwrap_err().to_string().contains("bucket"));
    }
}
