//! Training: one round per committed batch, cumulative (round N uses batches 1..N).
//!
//! - [`engine`]: the Ballista session (standalone in-process, or a cluster client).
//! - [`solve`]: least squares and logistic regression as aggregate queries plus small solves.
//! - [`segments`]: k-means user segments, described in words.
//! - this module: a round from start to `LATEST`.
//!
//! A round: register the round's batch files as `ratings`; split off the newest 20% by timestamp
//! as the hold-out; compute priors on the training rows; run `sql/features.sql` (point-in-time
//! features) on the cluster and materialise it as Parquet in the model store's work folder;
//! standardise; fit regression (one pass) and classification (one pass per Newton step);
//! evaluate on the hold-out beside trivial baselines; segment users; build the lookup tables
//! (`sql/side_stats.sql`); check the SQL's features against `lensflow_core::model::feature_row`;
//! write the round folder, then `LATEST` last.

pub mod engine;
pub mod segments;
pub mod solve;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Float64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use lensflow_core::lake::ratings_schema;
use lensflow_core::model::{
    self, feature_row, round_dir, sha256_hex, LatestPointer, Lineage, LinearModel, ModelArtifact, Priors, RoundMetrics,
    Scaling, SideStats, ARTIFACT_FORMAT_VERSION, FEATURES, LATEST, MODEL_FILE, MOVIES_FILE, SHRINK, USERS_FILE,
};
use lensflow_core::{BatchManifest, OffsetRange};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::engine::{number, Engine};
use crate::lake::{Lake, StorageOptions};
use crate::{JobError, Result};

/// The feature SQL, shipped inside the binary so a deployed trainer needs no extra files.
pub const FEATURES_SQL: &str = include_str!("../../sql/features.sql");
/// The lookup-table SQL.
pub const SIDE_STATS_SQL: &str = include_str!("../../sql/side_stats.sql");

/// What to train, from where, to where.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The lake to read batches from.
    pub lake: String,
    /// The model store to write rounds to.
    pub models: String,
    /// Object-store settings for `s3://` URLs.
    pub storage: StorageOptions,
    /// A Ballista scheduler (`df://host:port`); `None` runs Ballista standalone in-process.
    pub scheduler: Option<String>,
    /// Keep training as new batches land.
    pub watch: bool,
    /// How often `watch` looks for new batches.
    pub poll_interval: Duration,
    /// Share of the newest ratings held out.
    pub holdout: f64,
    /// Number of user segments.
    pub segments: usize,
    /// Query partitions.
    pub partitions: usize,
    /// Longest a single query may run before the round fails.
    pub query_timeout: Duration,
}

impl TrainOptions {
    /// Options with defaults for everything but the two locations.
    pub fn new(lake: impl Into<String>, models: impl Into<String>) -> Self {
        TrainOptions {
            lake: lake.into(),
            models: models.into(),
            storage: StorageOptions::default(),
            scheduler: None,
            watch: false,
            poll_interval: Duration::from_secs(5),
            holdout: 0.2,
            segments: 4,
            partitions: 4,
            query_timeout: Duration::from_secs(600),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |option, reason: String| Err(JobError::Config { option, reason });
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            return bad("holdout", format!("{} is not between 0 and 1", self.holdout));
        }
        if !(2..=20).contains(&self.segments) {
            return bad("segments", format!("{} is not between 2 and 20", self.segments));
        }
        Ok(())
    }
}

/// What one round did, as printed per round (`--json` prints it as one object).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundReport {
    /// Round number.
    pub round: u64,
    /// Batches used.
    pub batches: Vec<u64>,
    /// Hold-out metrics, flattened into the report.
    #[serde(flatten)]
    pub metrics: RoundMetrics,
    /// Seconds per stage.
    pub seconds: BTreeMap<String, f64>,
    /// Where the round was written.
    pub path: String,
}

/// Trains every batch that has no round yet, in order (and, with `watch`, keeps going until
/// `shutdown`), calling `on_round` after each round is published.
pub async fn train(opts: TrainOptions, shutdown: CancellationToken, mut on_round: impl FnMut(&RoundReport)) -> Result<u64> {
    opts.validate()?;
    let lake = Lake::open(&opts.lake, &opts.storage)?;
    let store = Lake::open(&opts.models, &opts.storage)?;
    let engine = match &opts.scheduler {
        Some(url) => Engine::remote(url, opts.partitions).await?,
        None => Engine::standalone(opts.partitions).await?,
    }
    .with_timeout(opts.query_timeout);
    tracing::info!(engine = engine.mode, lake = lake.url(), models = store.url(), "trainer ready");
    let mut trained = 0;
    loop {
        let pass = async {
            let manifests = lake.manifests().await?;
            let done = latest(&store).await?.map(|l| l.round).unwrap_or(0);
            for round in (done + 1)..=(manifests.len() as u64) {
                // Ctrl-C abandons a round in flight: nothing of it is published until LATEST,
                // and its work folder is cleared when the round is tried again.
                let report = tokio::select! {
                    report = train_round(&engine, &lake, &store, &manifests[..round as usize], &opts) => report?,
                    _ = shutdown.cancelled() => {
                        tracing::info!(round, "interrupted; the round was not published");
                        break;
                    }
                };
                on_round(&report);
                trained += 1;
            }
            Ok::<_, JobError>(())
        };
        match pass.await {
            Ok(()) if !opts.watch => return Ok(trained),
            Err(e) if !opts.watch => return Err(e),
            Ok(()) => {}
            // A watching trainer is a service: a failed round is retried at the next look,
            // and LATEST keeps pointing at the last good one meanwhile.
            Err(e) => tracing::error!(error = %e, "round failed; retrying at the next look"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(trained),
            _ = tokio::time::sleep(opts.poll_interval) => {}
        }
    }
}

/// The round `LATEST` points at, if any.
pub async fn latest(store: &Lake) -> Result<Option<LatestPointer>> {
    match store.get(&Path::from(LATEST)).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| JobError::LakeContent(format!("{}/{LATEST}: {e}", store.url()))),
        Err(JobError::Store { source: object_store::Error::NotFound { .. }, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn sql_with(template: &str, vars: &[(&str, String)]) -> String {
    vars.iter().fold(template.to_string(), |sql, (k, v)| sql.replace(&format!("${{{k}}}"), v))
}

struct Stopwatch(BTreeMap<String, f64>, Instant);

impl Stopwatch {
    fn lap(&mut self, stage: &str) {
        self.0.insert(stage.to_string(), self.1.elapsed().as_secs_f64());
        self.1 = Instant::now();
    }
}

/// A round's data, ready for fitting: `ratings` and `features` registered on the engine.
pub struct Prepared {
    /// The round number.
    pub round: u64,
    /// Shrinkage priors from the training rows.
    pub priors: Priors,
    /// Standardisation from the training rows.
    pub scaling: Scaling,
    /// SQL condition selecting the training rows.
    pub train_filter: String,
    /// SQL condition selecting the hold-out rows.
    pub test_filter: String,
    /// Training rows.
    pub train_rows: u64,
    /// The work folder (in the model store) holding the materialised features.
    pub work: String,
}

/// Registers the round's ratings, splits off the hold-out, and materialises the features.
pub async fn prepare_round(engine: &Engine, lake: &Lake, store: &Lake, manifests: &[BatchManifest], holdout: f64) -> Result<Prepared> {
    let round = manifests.len() as u64;
    let fail = |reason: String| JobError::Round { round, reason };
    // Every file a manifest names must be there: a clear error naming the file beats a query
    // that fails somewhere on an executor.
    let mut urls = Vec::new();
    for (m, file) in manifests.iter().flat_map(|m| m.files.iter().map(move |f| (m, f))) {
        check_batch_file(lake, m.batch, file).await?;
        urls.push(lake.url_of(&file.path));
    }
    if urls.is_empty() {
        return Err(fail("the batches hold no ratings".into()));
    }
    engine.register_parquet("ratings", &urls, Some(ratings_schema())).await?;

    // The hold-out: the newest `holdout` share by timestamp.
    let n = engine.query_row("count ratings", "SELECT COUNT(*) FROM ratings").await?[0] as u64;
    let offset = ((n as f64) * (1.0 - holdout)).floor() as u64;
    let cutoff = engine
        .query_row("hold-out cutoff", &format!("SELECT ts FROM ratings ORDER BY ts LIMIT 1 OFFSET {offset}"))
        .await?[0] as i64;
    let train_filter = format!("ts < {cutoff}");
    let test_filter = format!("ts >= {cutoff}");
    let p = engine
        .query_row(
            "priors",
            &format!(
                "SELECT COUNT(*), AVG(rating), VAR_POP(rating), AVG(CASE WHEN rating >= 4.0 THEN 1.0 ELSE 0.0 END) FROM ratings WHERE {train_filter}"
            ),
        )
        .await?;
    if p[0] < 10.0 {
        return Err(fail(format!("only {} ratings older than the hold-out cutoff {cutoff}", p[0])));
    }
    let priors = Priors { mean: p[1], var: p[2], liked: p[3] };

    // Features, materialised once: every later pass reads them instead of recomputing windows.
    // A crashed earlier attempt may have left files there.
    let work = format!("_work/{}", round_dir(round));
    remove_prefix(store, &work).await?;
    let features_sql = sql_with(
        FEATURES_SQL,
        &[
            ("shrink", format!("{SHRINK:?}")),
            ("prior_mean", format!("{:?}", priors.mean)),
            ("prior_var", format!("{:?}", priors.var)),
            ("prior_liked", format!("{:?}", priors.liked)),
        ],
    );
    let features_url = format!("{}/", store.url_of(&format!("{work}/features")));
    engine.write_parquet("feature SQL", &features_sql, &features_url).await?;
    engine.register_parquet("features", &[features_url], None).await?;
    check_feature_schema(engine).await?;

    let d = FEATURES.len();
    let mut stats_sql = vec!["COUNT(*)".to_string()];
    for f in FEATURES {
        stats_sql.push(format!("AVG({f})"));
        stats_sql.push(format!("STDDEV_POP({f})"));
    }
    let s = engine
        .query_row("scaling", &format!("SELECT {} FROM features WHERE {train_filter}", stats_sql.join(", ")))
        .await?;
    let scaling = Scaling {
        mean: (0..d).map(|i| s[1 + 2 * i]).collect(),
        scale: (0..d).map(|i| if s[2 + 2 * i] > 1e-12 { s[2 + 2 * i] } else { 1.0 }).collect(),
    };
    Ok(Prepared { round, priors, scaling, train_filter, test_filter, train_rows: s[0] as u64, work })
}

/// Reads a batch file's Parquet footer: it must exist, be Parquet, and hold the rows its
/// manifest says. Costs one small read per file and names the file when something is off.
async fn check_batch_file(lake: &Lake, batch: u64, file: &lensflow_core::BatchFile) -> Result<()> {
    let bad = |reason: String| JobError::BatchFile { path: lake.url_of(&file.path), reason: format!("named in batch {batch}'s manifest but {reason}") };
    let path = Path::from(file.path.as_str());
    let store = lake.store();
    let size = store.head(&path).await.map_err(|e| bad(format!("unreadable: {e}")))?.size;
    if size < 12 {
        return Err(bad(format!("unreadable: {size} bytes is too short for Parquet")));
    }
    // A Parquet file ends in its footer's length and the magic `PAR1`.
    let tail = store.get_range(&path, size - 8..size).await.map_err(|e| bad(format!("unreadable: {e}")))?;
    if &tail[4..] != b"PAR1" {
        return Err(bad("unreadable: not a Parquet file".into()));
    }
    let footer_len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
    if footer_len + 12 > size {
        return Err(bad("unreadable: its Parquet footer is cut off".into()));
    }
    let footer = store.get_range(&path, size - 8 - footer_len..size - 8).await.map_err(|e| bad(format!("unreadable: {e}")))?;
    let metadata = parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&footer).map_err(|e| bad(format!("unreadable: {e}")))?;
    let rows = metadata.file_metadata().num_rows() as u64;
    if rows != file.rows {
        return Err(bad(format!("holds {rows} rows, not {}", file.rows)));
    }
    Ok(())
}

/// Least squares of the rating: one pass for X'X and X'y, then the normal equations.
pub async fn fit_regression(engine: &Engine, prep: &Prepared) -> Result<LinearModel> {
    let row = engine.query_row("regression X'X", &solve::gram_sql(&FEATURES, &prep.scaling, &prep.train_filter, None, "1.0", "rating")).await?;
    let (a, b) = solve::unpack_gram(FEATURES.len(), &row);
    solve::solve_spd(&a, &b, 0.0)
        .map(|x| solve::model_of(&x))
        .ok_or_else(|| JobError::Round { round: prep.round, reason: "regression normal equations are singular".into() })
}

/// Logistic regression of "liked": Newton (IRLS) steps, one pass each, until the step is tiny.
pub async fn fit_classification(engine: &Engine, prep: &Prepared) -> Result<LinearModel> {
    let fail = |reason: &str| JobError::Round { round: prep.round, reason: reason.to_string() };
    let liked = prep.priors.liked.clamp(1e-6, 1.0 - 1e-6);
    let mut model = LinearModel { intercept: (liked / (1.0 - liked)).ln(), coefficients: vec![0.0; FEATURES.len()] };
    for step in 0..25 {
        let score = solve::score_sql(&FEATURES, &prep.scaling, &model);
        let prob = "(1.0 / (1.0 + EXP(-score)))";
        let sql = solve::gram_sql(&FEATURES, &prep.scaling, &prep.train_filter, Some(&score), &format!("{prob} * (1.0 - {prob})"), &format!("(liked - {prob})"));
        let row = engine.query_row("classification Newton step", &sql).await?;
        let (h, g) = solve::unpack_gram(FEATURES.len(), &row);
        let delta = solve::solve_spd(&h, &g, 0.0).ok_or_else(|| fail("classification Hessian is singular"))?;
        model.intercept += delta[0];
        for (c, dc) in model.coefficients.iter_mut().zip(delta.iter().skip(1)) {
            *c += dc;
        }
        let biggest = delta.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        tracing::debug!(step, biggest, "Newton step");
        if biggest < 1e-9 {
            return Ok(model);
        }
    }
    Err(fail("logistic regression did not converge in 25 Newton steps (separable data?)"))
}

async fn train_round(engine: &Engine, lake: &Lake, store: &Lake, manifests: &[BatchManifest], opts: &TrainOptions) -> Result<RoundReport> {
    let round = manifests.len() as u64;
    let mut watch = Stopwatch(BTreeMap::new(), Instant::now());
    let lineage = lineage(lake, manifests);
    tracing::info!(round, rows = lineage.rows, "training round");
    let prep = prepare_round(engine, lake, store, manifests, opts.holdout).await?;
    watch.lap("features");
    let regression = fit_regression(engine, &prep).await?;
    watch.lap("regression");
    let classification = fit_classification(engine, &prep).await?;
    watch.lap("classification");
    let mut metrics = evaluate(engine, &prep, &regression, &classification).await?;
    metrics.train_rows = prep.train_rows;
    watch.lap("evaluate");
    let (segmentation, silhouette) = segments::fit(engine, round, &prep.train_filter, &prep.priors, opts.segments).await?;
    metrics.silhouette = silhouette;
    watch.lap("segments");

    // Lookup tables over every rating of the round: the API's "now".
    let users = side_table(engine, "user", "u_resid_one", "MAX").await?;
    let movies = side_table(engine, "movie", "m_resid_one", "MIN").await?;
    check_features_match(engine, &prep.priors).await?;
    watch.lap("lookup tables");

    let dir = round_dir(round);
    let mut checksums = BTreeMap::new();
    for (name, bytes) in [(USERS_FILE, users), (MOVIES_FILE, movies)] {
        checksums.insert(name.to_string(), sha256_hex(&bytes));
        store.put(&format!("{dir}/{name}"), bytes).await?;
    }
    let artifact = ModelArtifact {
        format_version: ARTIFACT_FORMAT_VERSION,
        feature_fingerprint: model::feature_fingerprint(),
        round,
        created_at_ms: lensflow_core::now_ms(),
        features: FEATURES.iter().map(|s| s.to_string()).collect(),
        priors: prep.priors,
        scaling: prep.scaling.clone(),
        regression,
        classification,
        segmentation,
        metrics: metrics.clone(),
        lineage,
        checksums,
    };
    let json = serde_json::to_vec_pretty(&artifact).map_err(|e| JobError::Internal(e.to_string()))?;
    let pointer = LatestPointer { round, path: dir.clone(), model_sha256: sha256_hex(&json) };
    store.put(&format!("{dir}/{MODEL_FILE}"), Bytes::from(json)).await?;
    // LATEST last: a reader never sees half a round.
    let pointer_json = serde_json::to_vec_pretty(&pointer).map_err(|e| JobError::Internal(e.to_string()))?;
    store.put(LATEST, Bytes::from(pointer_json)).await?;
    remove_prefix(store, &prep.work).await?;
    watch.lap("publish");
    tracing::info!(round, rmse = metrics.rmse, auc = metrics.auc, "round published");
    Ok(RoundReport { round, batches: manifests.iter().map(|m| m.batch).collect(), metrics, seconds: watch.0, path: store.url_of(&dir) })
}

fn lineage(lake: &Lake, manifests: &[BatchManifest]) -> Lineage {
    let mut partitions: BTreeMap<i32, OffsetRange> = BTreeMap::new();
    for m in manifests {
        for (p, r) in &m.partitions {
            let e = partitions.entry(*p).or_insert(*r);
            e.first = e.first.min(r.first);
            e.last = e.last.max(r.last);
        }
    }
    Lineage {
        batches: manifests.iter().map(|m| m.batch).collect(),
        partitions,
        rows: manifests.iter().map(|m| m.rows).sum(),
        lake: lake.url().to_string(),
    }
}

async fn remove_prefix(store: &Lake, prefix: &str) -> Result<()> {
    use futures::TryStreamExt;
    let objects: Vec<_> = store.store().list(Some(&Path::from(prefix))).try_collect().await.map_err(JobError::store(prefix))?;
    for o in objects {
        store.delete(o.location.as_ref()).await?;
    }
    Ok(())
}

/// The trainer refuses SQL whose output lacks a declared feature or gives it another type.
async fn check_feature_schema(engine: &Engine) -> Result<()> {
    let batches = engine.query("feature schema", "SELECT * FROM features LIMIT 1").await?;
    let schema = batches.first().map(|b| b.schema()).ok_or_else(|| JobError::Engine {
        what: "feature schema".into(),
        reason: "the feature SQL returned no rows".into(),
    })?;
    for name in FEATURES {
        match schema.field_with_name(name) {
            Ok(f) if f.data_type() == &DataType::Float64 => {}
            Ok(f) => return Err(JobError::Engine { what: "feature schema".into(), reason: format!("`{name}` is {}, not Float64", f.data_type()) }),
            Err(_) => return Err(JobError::Engine { what: "feature schema".into(), reason: format!("`{name}` is missing from features.sql's output") }),
        }
    }
    Ok(())
}

/// Recomputes a sample of rows' features with [`feature_row`] (what the API uses) from the
/// statistics the SQL also returns, and fails the round if the two disagree.
async fn check_features_match(engine: &Engine, priors: &Priors) -> Result<()> {
    let cols = "u_n, u_sum, u_sumsq, u_liked_n, u_resid, u_ts, m_n, m_sum, m_sumsq, m_liked_n, m_resid, m_ts, CAST(ts AS DOUBLE) AS now_ts";
    let sql = format!("SELECT {cols}, {} FROM features ORDER BY ts DESC, user_id, movie_id LIMIT 500", FEATURES.join(", "));
    for batch in engine.query("feature drift check", &sql).await? {
        for r in 0..batch.num_rows() {
            let v: Vec<f64> = (0..batch.num_columns()).map(|c| number(&batch, c, r).unwrap_or(f64::NAN)).collect();
            let side = |o: usize| SideStats { n: v[o], sum: v[o + 1], sumsq: v[o + 2], liked: v[o + 3], resid: v[o + 4], ts: v[o + 5] };
            let expected = feature_row(&side(0), &side(6), priors, v[12]);
            for (i, name) in FEATURES.iter().enumerate() {
                let got = v[13 + i];
                if (got - expected[i]).abs() > 1e-9 * (1.0 + expected[i].abs()) {
                    return Err(JobError::Engine {
                        what: "feature drift check".into(),
                        reason: format!("features.sql gives {name} = {got}, lensflow_core::model::feature_row gives {}", expected[i]),
                    });
                }
            }
        }
    }
    Ok(())
}

/// One side's lookup table, as Parquet bytes (`id, n, sum, sumsq, liked, resid, ts`).
async fn side_table(engine: &Engine, side: &str, resid: &str, ts_agg: &str) -> Result<Bytes> {
    let sql = sql_with(SIDE_STATS_SQL, &[("side", side.to_string()), ("resid", resid.to_string()), ("ts_agg", ts_agg.to_string())]);
    let batches = engine.query(&format!("{side} lookup table"), &sql).await?;
    let schema = Arc::new(Schema::new(
        ["id", "n", "sum", "sumsq", "liked", "resid", "ts"].map(|c| Field::new(c, if c == "id" { DataType::Int64 } else { DataType::Float64 }, false)).to_vec(),
    ));
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, schema.clone(), None).map_err(|e| JobError::Internal(e.to_string()))?;
    for b in batches {
        let cols: Vec<arrow_array::ArrayRef> = (0..7)
            .map(|c| {
                if c == 0 {
                    let ids: Vec<i64> = (0..b.num_rows()).map(|r| number(&b, 0, r).unwrap_or(0.0) as i64).collect();
                    Arc::new(arrow_array::Int64Array::from(ids)) as arrow_array::ArrayRef
                } else {
                    let v: Vec<f64> = (0..b.num_rows()).map(|r| number(&b, c, r).unwrap_or(0.0)).collect();
                    Arc::new(Float64Array::from(v)) as arrow_array::ArrayRef
                }
            })
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| JobError::Internal(e.to_string()))?;
        writer.write(&batch).map_err(|e| JobError::Internal(e.to_string()))?;
    }
    writer.close().map_err(|e| JobError::Internal(e.to_string()))?;
    Ok(Bytes::from(out))
}

/// Hold-out metrics, each beside its trivial baseline.
async fn evaluate(engine: &Engine, prep: &Prepared, regression: &LinearModel, classification: &LinearModel) -> Result<RoundMetrics> {
    let (names, scaling, priors, test_filter) = (&FEATURES, &prep.scaling, &prep.priors, &prep.test_filter);
    let scored = format!(
        "WITH s AS (SELECT rating, liked, {} AS lin, {} AS logit FROM features WHERE {test_filter}), \
         p AS (SELECT rating, liked, LEAST(GREATEST(lin, 0.5), 5.0) AS pred, 1.0 / (1.0 + EXP(-logit)) AS prob FROM s)",
        solve::score_sql(names, scaling, regression),
        solve::score_sql(names, scaling, classification)
    );
    let m = engine
        .query_row(
            "evaluate",
            &format!(
                "{scored} SELECT COUNT(*), SUM((pred - rating) * (pred - rating)), SUM(ABS(pred - rating)), \
                 SUM(({mean:?} - rating) * ({mean:?} - rating)), \
                 SUM(CASE WHEN (CASE WHEN prob >= 0.5 THEN 1.0 ELSE 0.0 END) = liked THEN 1.0 ELSE 0.0 END), SUM(liked) FROM p",
                mean = priors.mean
            ),
        )
        .await?;
    let test_rows = m[0];
    if test_rows < 1.0 {
        return Err(JobError::Engine { what: "evaluate".into(), reason: "the hold-out is empty".into() });
    }
    let bins = engine
        .query("AUC histogram", &format!("{scored} SELECT CAST(FLOOR(prob * 100000) AS BIGINT) AS bin, SUM(liked), COUNT(*) FROM p GROUP BY CAST(FLOOR(prob * 100000) AS BIGINT)"))
        .await?;
    let mut hist: Vec<(i64, f64, f64)> = Vec::new();
    for b in &bins {
        for r in 0..b.num_rows() {
            hist.push((number(b, 0, r).unwrap_or(0.0) as i64, number(b, 1, r).unwrap_or(0.0), number(b, 2, r).unwrap_or(0.0)));
        }
    }
    let liked_share = m[5] / test_rows;
    let majority_liked = priors.liked >= 0.5;
    Ok(RoundMetrics {
        train_rows: 0,
        test_rows: test_rows as u64,
        rmse: (m[1] / test_rows).sqrt(),
        mae: m[2] / test_rows,
        rmse_baseline: (m[3] / test_rows).sqrt(),
        auc: auc_from_histogram(&mut hist),
        accuracy: m[4] / test_rows,
        accuracy_baseline: if majority_liked { liked_share } else { 1.0 - liked_share },
        silhouette: 0.0,
    })
}

/// ROC AUC from (score bin, positives, total) counts; ties within a bin count half.
pub fn auc_from_histogram(hist: &mut [(i64, f64, f64)]) -> f64 {
    hist.sort_by_key(|h| h.0);
    let pos: f64 = hist.iter().map(|h| h.1).sum();
    let neg: f64 = hist.iter().map(|h| h.2 - h.1).sum();
    if pos == 0.0 || neg == 0.0 {
        return 0.5;
    }
    let mut neg_below = 0.0;
    let mut area = 0.0;
    for &(_, p, total) in hist.iter() {
        let n = total - p;
        area += p * (neg_below + 0.5 * n);
        neg_below += n;
    }
    area / (pos * neg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_random_and_reversed_scores() {
        assert_eq!(auc_from_histogram(&mut [(0, 0.0, 5.0), (1, 5.0, 5.0)]), 1.0);
        assert_eq!(auc_from_histogram(&mut [(0, 5.0, 10.0)]), 0.5);
        assert_eq!(auc_from_histogram(&mut [(1, 0.0, 5.0), (0, 5.0, 5.0)]), 0.0);
    }

    /// Rows of `features` matching `filter`: standardised features, rating, liked.
    async fn collect(engine: &Engine, prep: &Prepared, filter: &str) -> (ndarray::Array2<f64>, Vec<f64>, Vec<usize>) {
        let sql = format!("SELECT rating, liked, {} FROM features WHERE {filter} ORDER BY ts, user_id, movie_id", FEATURES.join(", "));
        let (mut z, mut rating, mut liked) = (Vec::new(), Vec::new(), Vec::new());
        for b in engine.query("collect", &sql).await.unwrap() {
            for r in 0..b.num_rows() {
                let v: Vec<f64> = (0..b.num_columns()).map(|c| number(&b, c, r).unwrap()).collect();
                rating.push(v[0]);
                liked.push(v[1] as usize);
                z.extend(prep.scaling.apply(&v[2..]));
            }
        }
        (ndarray::Array2::from_shape_vec((rating.len(), FEATURES.len()), z).unwrap(), rating, liked)
    }

    fn exact_auc(scores: &[f64], liked: &[usize]) -> f64 {
        let mut hist: Vec<(i64, f64, f64)> = scores.iter().zip(liked).map(|(s, l)| ((s * 1e12) as i64, *l as f64, 1.0)).collect();
        auc_from_histogram(&mut hist)
    }

    /// The solvers' cluster-side statistics give what linfa fits on the same collected rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_statistics_fit_what_linfa_fits_on_the_same_rows() {
        use linfa::prelude::*;
        use crate::consume::{commit::commit_batch, offsets::LakeOffsets, writer::Batch};

        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().join("lake").to_str().unwrap(), &StorageOptions::default()).unwrap();
        let store = Lake::open(dir.path().join("models").to_str().unwrap(), &StorageOptions::default()).unwrap();
        let mut csv = Vec::new();
        let options = crate::generate::GenerateOptions { ratings: 8_000, seed: 3, ..Default::default() };
        crate::generate::generate(&options, &mut csv).unwrap();
        let mut batch = Batch::default();
        for (i, line) in std::str::from_utf8(&csv).unwrap().lines().skip(1).enumerate() {
            let fields: Vec<&[u8]> = line.split(',').map(str::as_bytes).collect();
            batch.partition(0).push_rating(i as i64, &lensflow_core::RatingEvent::from_csv_fields(fields.into_iter()).unwrap());
        }
        commit_batch(&lake, &mut LakeOffsets::new("t"), &batch, "t", "w").await.unwrap();
        let manifests = lake.manifests().await.unwrap();

        let engine = Engine::standalone(2).await.unwrap();
        let prep = prepare_round(&engine, &lake, &store, &manifests, 0.2).await.unwrap();
        let regression = fit_regression(&engine, &prep).await.unwrap();
        let classification = fit_classification(&engine, &prep).await.unwrap();

        let (z, rating, liked) = collect(&engine, &prep, &prep.train_filter).await;
        assert_eq!(z.nrows() as u64, prep.train_rows);
        let ols = linfa_linear::LinearRegression::new().fit(&Dataset::new(z.clone(), ndarray::Array1::from(rating))).unwrap();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-3);
        assert!(rel(regression.intercept, ols.intercept()) < 1e-6, "{} vs {}", regression.intercept, ols.intercept());
        for (ours, theirs) in regression.coefficients.iter().zip(ols.params()) {
            assert!(rel(*ours, *theirs) < 1e-6, "coefficient {ours} vs linfa {theirs}");
        }

        let logistic = linfa_logistic::LogisticRegression::default()
            .alpha(0.0)
            .max_iterations(1000)
            .gradient_tolerance(1e-8)
            .fit(&Dataset::new(z, ndarray::Array1::from(liked)))
            .unwrap();
        let (z_test, _, liked_test) = collect(&engine, &prep, &prep.test_filter).await;
        let ours: Vec<f64> = z_test.rows().into_iter().map(|row| classification.score(row.as_slice().unwrap())).collect();
        // linfa reports the probability of whichever label it made its "positive" class.
        let flip = logistic.labels().pos.class == 0;
        let theirs: Vec<f64> = logistic.predict_probabilities(&z_test).iter().map(|p| if flip { 1.0 - p } else { *p }).collect();
        let (a, b) = (exact_auc(&ours, &liked_test), exact_auc(&theirs, &liked_test));
        assert!((a - b).abs() < 0.005, "hold-out AUC {a} vs linfa {b}");
        assert!(a > 0.6, "the classifier learned something: AUC {a}");
    }

    #[test]
    fn variables_are_substituted_spark_style() {
        assert_eq!(sql_with("SELECT ${a} + ${b}", &[("a", "1".into()), ("b", "2.5".into())]), "SELECT 1 + 2.5");
    }
}
