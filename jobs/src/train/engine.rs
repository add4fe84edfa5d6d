//! The query engine a round runs on: DataFusion in-process (the default), Ballista standalone
//! in-process, or a Ballista cluster. All three get the same session settings, so the same SQL
//! gives the same tables.
//!
//! On one machine Ballista buys nothing but overhead: every query becomes a job with stages
//! and shuffle files, which costs a 100k-event round seconds of waiting for milliseconds of
//! arithmetic. So without a scheduler a round runs on a plain DataFusion session (the same
//! planner and operators the executors run), and keeps its materialised features in memory.

use std::sync::Arc;

use arrow_array::{Array, Float64Array, Int64Array, RecordBatch};
use arrow_schema::SchemaRef;
use ballista::prelude::{SessionConfigExt, SessionContextExt};
use ballista_core::object_store::{runtime_env_with_s3_support, session_config_with_s3_support};
use datafusion::config::TableParquetOptions;
use datafusion::dataframe::{DataFrame, DataFrameWriteOptions};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::execution::{SendableRecordBatchStream, SessionStateBuilder};
use datafusion::logical_expr::Expr;
use datafusion::prelude::{SessionConfig, SessionContext};
use lensflow_core::dialect::{decoding_state, restore_functions, spark_config, spark_state};

use crate::{JobError, Result};

/// A DataFusion session: in-process, or the client of Ballista (standalone or remote).
pub struct Engine {
    ctx: SessionContext,
    /// `local`, `standalone` or the scheduler's URL.
    pub mode: String,
    /// Whether queries run in this process on plain DataFusion (no Ballista): then a
    /// materialised table can stay in memory, since no executor has to read it.
    in_process: bool,
    timeout: std::time::Duration,
}

/// Where a round's queries run, as `--scheduler` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineChoice {
    /// DataFusion in this process (no `--scheduler`).
    Local,
    /// Ballista's scheduler and executor in this process (`--scheduler standalone`).
    Standalone,
    /// A Ballista cluster's scheduler (`--scheduler df://HOST:PORT`).
    Remote(String),
}

impl EngineChoice {
    /// Reads `--scheduler`: absent, `standalone`, or a scheduler URL.
    pub fn from_flag(scheduler: Option<&str>) -> EngineChoice {
        match scheduler {
            None | Some("") | Some("local") => EngineChoice::Local,
            Some("standalone") => EngineChoice::Standalone,
            Some(url) => EngineChoice::Remote(url.to_string()),
        }
    }
}

/// The job name training's queries show under on a scheduler.
const TRAIN_JOB: &str = "lensflow-train";

fn config(partitions: usize, job: &str) -> SessionConfig {
    spark_config(session_config_with_s3_support())
        .with_ballista_job_name(job)
        // Adaptive replanning can hang when a replan cancels a running stage (ballista #2063).
        .with_ballista_adaptive_query_planner(false)
        .with_target_partitions(partitions.max(1))
}

/// Turns a DataFusion or Ballista error into the query error naming `what` was run.
pub(crate) fn engine_err(what: impl std::fmt::Display) -> impl FnOnce(datafusion::error::DataFusionError) -> JobError {
    let what = what.to_string();
    move |e| JobError::Engine { what, reason: e.to_string() }
}

const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl Engine {
    /// Fails any single query that runs longer than `timeout` (a lost executor can otherwise
    /// stall a job for as long as the scheduler takes to notice).
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Engine {
        self.timeout = timeout;
        self
    }

    pub(crate) async fn bounded<T>(&self, what: &str, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let started = std::time::Instant::now();
        let out = tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(JobError::Engine { what: what.to_string(), reason: format!("no answer within {:?}", self.timeout) }));
        tracing::debug!(what, seconds = started.elapsed().as_secs_f64(), "query done");
        out
    }

    /// The engine `choice` names, for training.
    pub async fn start(choice: &EngineChoice, partitions: usize) -> Result<Engine> {
        Engine::start_named(choice, partitions, TRAIN_JOB).await
    }

    /// The engine `choice` names; on a scheduler its queries are jobs named `job`.
    pub async fn start_named(choice: &EngineChoice, partitions: usize, job: &str) -> Result<Engine> {
        let config = config(partitions, job);
        match choice {
            EngineChoice::Local => Engine::local_with(config),
            EngineChoice::Standalone => Engine::standalone_with(config).await,
            EngineChoice::Remote(url) => Engine::remote_with(url, config).await,
        }
    }

    /// Plain DataFusion in this process, with the settings the cluster gets.
    pub fn local(partitions: usize) -> Result<Engine> {
        Engine::local_with(config(partitions, TRAIN_JOB))
    }

    fn local_with(config: SessionConfig) -> Result<Engine> {
        let runtime = runtime_env_with_s3_support(&config).map_err(engine_err("object stores"))?;
        let state = spark_state(SessionStateBuilder::new().with_config(config).with_runtime_env(runtime)).build();
        Ok(Engine { ctx: SessionContext::new_with_state(state), mode: "local".into(), in_process: true, timeout: DEFAULT_TIMEOUT })
    }

    /// An in-process Ballista scheduler and executor.
    pub async fn standalone(partitions: usize) -> Result<Engine> {
        Engine::standalone_with(config(partitions, TRAIN_JOB)).await
    }

    async fn standalone_with(config: SessionConfig) -> Result<Engine> {
        let runtime = runtime_env_with_s3_support(&config).map_err(engine_err("object stores"))?;
        // The in-process scheduler and executor run planned plans; the client plans.
        let state = decoding_state(SessionStateBuilder::new().with_config(config).with_runtime_env(runtime)).build();
        let ctx = SessionContext::standalone_with_state(state).await.map_err(engine_err("start Ballista standalone"))?;
        let ctx = SessionContext::new_with_state(restore_functions(ctx.state()));
        Ok(Engine { ctx, mode: "standalone".into(), in_process: false, timeout: DEFAULT_TIMEOUT })
    }

    /// A client of the scheduler at `url` (`df://host:port`).
    async fn remote_with(url: &str, config: SessionConfig) -> Result<Engine> {
        let runtime = runtime_env_with_s3_support(&config).map_err(engine_err("object stores"))?;
        let state = spark_state(SessionStateBuilder::new().with_config(config).with_runtime_env(runtime)).build();
        let ctx = SessionContext::remote_with_state(url, state).await.map_err(engine_err(format!("connect to {url}")))?;
        let ctx = SessionContext::new_with_state(restore_functions(ctx.state()));
        Ok(Engine { ctx, mode: url.to_string(), in_process: false, timeout: DEFAULT_TIMEOUT })
    }

    /// The session, for callers that stream or write a query's result themselves.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registers `name` as the Parquet files at `urls` (explicit files or one folder ending in `/`).
    pub async fn register_parquet(&self, name: &str, urls: &[String], schema: Option<SchemaRef>) -> Result<()> {
        let paths = urls.iter().map(|u| ListingTableUrl::parse(u).map_err(engine_err(format!("table {name} path {u}")))).collect::<Result<Vec<_>>>()?;
        let opts = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let mut cfg = ListingTableConfig::new_with_multi_paths(paths).with_listing_options(opts);
        cfg = match schema {
            Some(schema) => cfg.with_schema(schema),
            None => cfg.infer_schema(&self.ctx.state()).await.map_err(engine_err(format!("schema of table {name}")))?,
        };
        let table = ListingTable::try_new(cfg).map_err(engine_err(format!("table {name}")))?;
        self.ctx.deregister_table(name).map_err(engine_err(format!("table {name}")))?;
        self.ctx.register_table(name, Arc::new(table)).map_err(engine_err(format!("table {name}")))?;
        Ok(())
    }

    /// Registers `name` as the events in `files` of `lake`: the files themselves, or, when
    /// compacted files also hold events of other batches, a view keeping only the batches'.
    pub async fn register_events(&self, name: &str, lake: &lensflow_core::Lake, files: &lensflow_core::EventFiles, schema: SchemaRef) -> Result<()> {
        let urls: Vec<String> = files.files.iter().map(|f| lake.url_of(&f.path)).collect();
        let Some(filter) = files.sql_filter() else { return self.register_parquet(name, &urls, Some(schema)).await };
        let all = format!("{name}__files");
        self.register_parquet(&all, &urls, Some(schema)).await?;
        self.ctx.deregister_table(name).map_err(engine_err(format!("table {name}")))?;
        let view = format!("CREATE VIEW {name} AS SELECT * FROM {all} WHERE {filter}");
        self.ctx.sql(&view).await.map_err(engine_err(format!("view {name}")))?;
        Ok(())
    }

    /// Runs one query and collects its result.
    pub async fn query(&self, what: &str, sql: &str) -> Result<Vec<RecordBatch>> {
        tracing::debug!(what, sql, "query");
        self.bounded(what, async {
            let df = self.ctx.sql(sql).await.map_err(engine_err(what))?;
            df.collect().await.map_err(engine_err(what))
        })
        .await
    }

    /// Starts one query and hands back its rows as they come, for results too big to collect.
    /// Callers run it inside `Engine::bounded`.
    pub async fn stream(&self, what: &str, sql: &str) -> Result<SendableRecordBatchStream> {
        tracing::debug!(what, sql, "query");
        let df = self.ctx.sql(sql).await.map_err(engine_err(what))?;
        df.execute_stream().await.map_err(engine_err(what))
    }

    /// Runs one query whose answer is a single row of numbers, returned as `f64`s in column order.
    pub async fn query_row(&self, what: &str, sql: &str) -> Result<Vec<f64>> {
        let batches = self.query(what, sql).await?;
        let batch = batches.iter().find(|b| b.num_rows() > 0).ok_or_else(|| JobError::Engine { what: what.to_string(), reason: "no row returned".into() })?;
        (0..batch.num_columns())
            .map(|i| {
                number(batch, i, 0)
                    .ok_or_else(|| JobError::Engine { what: what.to_string(), reason: format!("column {} is not a number", batch.schema().field(i).name()) })
            })
            .collect()
    }

    /// Runs `sql` once and registers its result under each of `names`: in memory on the local
    /// engine, else as Parquet files under `url` (a folder) that the executors read.
    pub async fn materialise(&self, what: &str, sql: &str, url: &str, names: &[&str]) -> Result<()> {
        if self.in_process {
            let (schema, batches) = self
                .bounded(what, async {
                    let df = self.ctx.sql(sql).await.map_err(engine_err(what))?;
                    let schema = Arc::new(df.schema().as_arrow().clone());
                    Ok((schema, df.collect().await.map_err(engine_err(what))?))
                })
                .await?;
            // One partition per batch keeps the scans parallel.
            let mut partitions = batches.into_iter().map(|b| vec![b]).collect::<Vec<_>>();
            if partitions.is_empty() {
                // An empty result is an empty table, which still needs one partition.
                partitions.push(vec![]);
            }
            let table = Arc::new(MemTable::try_new(schema, partitions).map_err(engine_err(what))?);
            for name in names {
                self.ctx.deregister_table(*name).map_err(engine_err(format!("table {name}")))?;
                self.ctx.register_table(*name, table.clone()).map_err(engine_err(format!("table {name}")))?;
            }
            return Ok(());
        }
        // The planned schema, not one read back from the files: an empty result may leave none.
        let schema = self
            .bounded(what, async {
                let df = self.ctx.sql(sql).await.map_err(engine_err(what))?;
                let schema = Arc::new(df.schema().as_arrow().clone());
                df.write_parquet(url, DataFrameWriteOptions::new(), None).await.map_err(engine_err(what))?;
                Ok(schema)
            })
            .await?;
        for name in names {
            self.register_parquet(name, &[url.to_string()], Some(schema.clone())).await?;
        }
        Ok(())
    }

    /// Runs `sql` and writes its rows (as `select` gives them, if given) as Parquet: with
    /// `file_rows`, as files of about that many rows each, one at a time, in the folder `url`
    /// (ending in `/`); without, as the one file `url`. Returns the rows written. On a cluster
    /// the executors write the files, so the rows never pass through this process: its memory
    /// stays the same however many there are.
    pub async fn write_parquet(
        &self,
        what: &str,
        sql: &str,
        select: Option<Vec<Expr>>,
        url: &str,
        file_rows: Option<usize>,
        options: TableParquetOptions,
    ) -> Result<u64> {
        tracing::debug!(what, sql, "query");
        self.bounded(what, async {
            // Only this write's plan gets these settings: the tables `materialise` writes are
            // better split four ways, for parallel scans.
            let mut state = self.ctx.state();
            if let Some(rows) = file_rows {
                let settings = state.config_mut().options_mut();
                settings.set("datafusion.execution.soft_max_rows_per_output_file", &rows.to_string()).map_err(engine_err(what))?;
                settings.set("datafusion.execution.minimum_parallel_output_files", "1").map_err(engine_err(what))?;
            }
            let plan = state.create_logical_plan(sql).await.map_err(engine_err(what))?;
            let mut df = DataFrame::new(state, plan);
            if let Some(select) = select {
                df = df.select(select).map_err(engine_err(what))?;
            }
            let write = DataFrameWriteOptions::new().with_single_file_output(file_rows.is_none());
            let counts = df.write_parquet(url, write, Some(options)).await.map_err(engine_err(what))?;
            Ok(counts.iter().flat_map(|b| (0..b.num_rows()).map(move |r| number(b, 0, r).unwrap_or(0.0) as u64)).sum())
        })
        .await
    }
}

/// Column `col` of row `row` as `f64`, whatever numeric type it has; NULL reads as 0.
pub fn number(batch: &RecordBatch, col: usize, row: usize) -> Option<f64> {
    let array = batch.column(col);
    if array.is_null(row) {
        return Some(0.0);
    }
    if let Some(a) = array.as_any().downcast_ref::<Float64Array>() {
        return Some(a.value(row));
    }
    if let Some(a) = array.as_any().downcast_ref::<Int64Array>() {
        return Some(a.value(row) as f64);
    }
    let cast = datafusion::arrow::compute::cast(array, &arrow_schema::DataType::Float64).ok()?;
    cast.as_any().downcast_ref::<Float64Array>().map(|a| a.value(row))
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::{col, lit};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    #[tokio::test]
    async fn a_write_makes_files_and_row_groups_of_the_sizes_asked_and_says_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::local(2).unwrap();
        let url = format!("file://{}/out/", dir.path().display());
        let mut options = TableParquetOptions::default();
        options.global.max_row_group_size = 1000;
        let select = vec![col("n"), (col("n") * lit(2i64)).alias("twice")];
        let sql = "SELECT value AS n FROM generate_series(1, 25000)";
        let written = engine.write_parquet("test write", sql, Some(select), &url, Some(10_000), options).await.unwrap();
        assert_eq!(written, 25_000);

        let mut files: Vec<_> = std::fs::read_dir(dir.path().join("out")).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(files.len() >= 2, "25000 rows in files of about 10000 went to {files:?}");
        let mut seen = Vec::new();
        for file in &files {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap()).unwrap();
            let groups = reader.metadata().row_groups().iter().map(|g| g.num_rows()).collect::<Vec<_>>();
            assert!(groups.iter().all(|&g| g <= 1000), "{file:?} has row groups of {groups:?} rows");
            // A file is closed once it passes the limit, so it holds at most one batch more.
            let rows = reader.metadata().file_metadata().num_rows();
            assert!(rows <= 10_000 + 8192, "{file:?} holds {rows} rows");
            for batch in reader.build().unwrap() {
                let batch = batch.unwrap();
                for r in 0..batch.num_rows() {
                    let (n, twice) = (number(&batch, 0, r).unwrap(), number(&batch, 1, r).unwrap());
                    assert_eq!(twice, 2.0 * n);
                    seen.push(n as i64);
                }
            }
        }
        seen.sort();
        assert_eq!(seen, (1..=25_000).collect::<Vec<i64>>());
    }
}
