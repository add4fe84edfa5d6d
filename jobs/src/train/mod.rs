//! Training: one round per committed batch, cumulative (round N uses batches 1..N), for any
//! pipeline: nothing here knows which one.
//!
//! - [`engine`]: the session: DataFusion in-process, Ballista standalone, or a cluster client.
//! - [`solve`]: least squares and logistic regression as aggregate queries plus small solves.
//! - [`segments`]: k-means segments of the pipeline's clustered entity, described in words.
//! - [`metrics`]: the trainer's Prometheus metrics (rounds, failures, seconds per stage).
//! - [`state`]: the feature SQL's per-event state rows, carried from round to round so a round
//!   computes only its new events and the stored ones late events change.
//! - [`written`]: what the trainer records of the Parquet files the engine writes into the
//!   model store (state segments, lookup tables): on a cluster the executors write them, and
//!   the trainer reads each back once to checksum it, so it holds no table whole.
//! - this module: a round from start to `LATEST`.
//!
//! A round: register the round's batch files as the pipeline's events table; keep the fitting
//! window (every batch, or with `window` the newest ones); split off the window's newest share
//! as the hold-out (by event time, or by arrival within each Kafka partition);
//! compute the `${…}` variables on the training events; bring the carried state rows up to
//! date (or run the whole feature SQL when it cannot carry state) and materialise the features
//! (in memory in-process, else as Parquet in the model store's work folder); standardise; fit regression (one
//! pass) and classification (one pass per Newton step); evaluate on the hold-out beside trivial
//! baselines; segment; build the lookup tables; check serving's feature expressions against
//! the SQL's own output; write the round folder, then `LATEST` last.

pub mod engine;
pub mod metrics;
pub mod segments;
pub mod solve;
pub mod state;
pub mod written;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use bytes::Bytes;
use datafusion::config::TableParquetOptions;
use lensflow_core::model::{
    ARTIFACT_FORMAT_VERSION, LATEST, LatestPointer, Lineage, LinearModel, LookupTable, MODEL_FILE, ModelArtifact, RoundMetrics, Scaling, lookup_file,
    round_dir, sha256_hex,
};
use lensflow_core::pipeline::definition::FieldDefault;
use lensflow_core::pipeline::expr::FeatureExprs;
use lensflow_core::pipeline::{KAFKA_OFFSET, KAFKA_PARTITION, substitute};
use lensflow_core::{BatchManifest, Lake, OffsetRange, Pipeline, StorageOptions, StoreError};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::engine::{Engine, EngineChoice, number};
use crate::{JobError, Result};

/// What to train, from where, to where.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// The lake root; the pipeline's batches are in its folder there.
    pub lake: String,
    /// The model store root; the pipeline's rounds go to its folder there.
    pub models: String,
    /// Object-store settings for `s3://` URLs.
    pub storage: StorageOptions,
    /// A Ballista scheduler (`df://host:port`), or `standalone` for Ballista in-process;
    /// `None` runs DataFusion in-process.
    pub scheduler: Option<String>,
    /// Keep training as new batches land.
    pub watch: bool,
    /// How often `watch` looks for new batches.
    pub poll_interval: Duration,
    /// Query partitions.
    pub partitions: usize,
    /// Longest a single query may run before the round fails.
    pub query_timeout: Duration,
    /// Recompute every event's state rows, ignoring the carried state.
    pub full: bool,
    /// Recompute every event's state rows when late events change more than this share of
    /// the stored ones (carrying then costs about as much).
    pub full_above: f64,
    /// Fit and evaluate the models on the newest this many batches only (features still read
    /// every batch): a round's fitting cost then stays bounded as the lake grows.
    pub window: Option<u64>,
    /// Where rounds and failures are counted.
    pub metrics: std::sync::Arc<metrics::TrainerMetrics>,
}

impl TrainOptions {
    /// Options with defaults for everything but the pipeline and the two locations.
    pub fn new(pipeline: Pipeline, lake: impl Into<String>, models: impl Into<String>) -> Self {
        TrainOptions {
            pipeline,
            lake: lake.into(),
            models: models.into(),
            storage: StorageOptions::default(),
            scheduler: None,
            watch: false,
            poll_interval: Duration::from_secs(5),
            partitions: 4,
            query_timeout: Duration::from_secs(600),
            full: false,
            full_above: 0.5,
            window: None,
            metrics: Default::default(),
        }
    }
}

/// What one round did, as printed per round (`--json` prints it as one object).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundReport {
    /// The pipeline.
    pub pipeline: String,
    /// Round number.
    pub round: u64,
    /// Batches used.
    pub batches: Vec<u64>,
    /// Events in those batches.
    pub events: u64,
    /// The first batch the models were fitted on, when a `window` left older ones out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_from: Option<u64>,
    /// Hold-out metrics, flattened into the report.
    #[serde(flatten)]
    pub metrics: RoundMetrics,
    /// Seconds per stage.
    pub seconds: BTreeMap<String, f64>,
    /// How the round came by its state rows (absent when the feature SQL cannot carry state).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<state::StateReport>,
    /// Where the round was written.
    pub path: String,
}

/// Trains every batch that has no round yet, in order (and, with `watch`, keeps going until
/// `shutdown`), calling `on_round` after each round is published.
pub async fn train(opts: TrainOptions, shutdown: CancellationToken, mut on_round: impl FnMut(&RoundReport)) -> Result<u64> {
    // The SQL is planned against the declared columns before any connection is opened.
    let checked = opts.pipeline.check_sql().await?;
    let name = opts.pipeline.name().to_string();
    let lake = Lake::open(&opts.lake, &opts.storage)?.child(&name);
    let store = Lake::open(&opts.models, &opts.storage)?.child(&name);
    let engine = Engine::start(&EngineChoice::from_flag(opts.scheduler.as_deref()), opts.partitions).await?.with_timeout(opts.query_timeout);
    let shape = opts.pipeline.incremental_shape();
    if let Err(why) = &shape {
        tracing::warn!(pipeline = %name, reason = why.as_str(), "every round recomputes all features: the feature SQL cannot carry state");
    }
    let trainer = Trainer {
        pipeline: &opts.pipeline,
        engine: &engine,
        lake: &lake,
        store: &store,
        serving: checked.serving,
        shape: shape.ok(),
        full: opts.full,
        full_above: opts.full_above,
        window: opts.window,
        verified: Default::default(),
    };
    tracing::info!(pipeline = %name, engine = engine.mode, lake = lake.url(), models = store.url(), "trainer ready");
    let mut trained = 0;
    loop {
        let pass = async {
            let manifests = lake.manifests().await?;
            let done = latest(&store).await?.map(|l| l.round).unwrap_or(0);
            for round in (done + 1)..=(manifests.len() as u64) {
                // Ctrl-C abandons a round in flight: nothing of it is published until LATEST,
                // and its work folder is cleared when the round is tried again.
                let report = tokio::select! {
                    report = trainer.round(&manifests[..round as usize]) => report?,
                    _ = shutdown.cancelled() => {
                        tracing::info!(round, "interrupted; the round was not published");
                        break;
                    }
                };
                opts.metrics.published(&report);
                on_round(&report);
                trained += 1;
            }
            Ok::<_, JobError>(())
        };
        let pass = pass.await;
        if pass.is_err() {
            opts.metrics.failed(&name);
        }
        match pass {
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

/// The round `LATEST` points at, if any (`store` is a pipeline's folder of the model store).
pub async fn latest(store: &Lake) -> Result<Option<LatestPointer>> {
    match store.get(&Path::from(LATEST)).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| JobError::Store(StoreError::LakeContent(format!("{}/{LATEST}: {e}", store.url())))),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

struct Stopwatch(BTreeMap<String, f64>, Instant);

impl Stopwatch {
    fn lap(&mut self, stage: &str) {
        self.0.insert(stage.to_string(), self.1.elapsed().as_secs_f64());
        self.1 = Instant::now();
    }
}

/// A round's data, ready for fitting: the events table and `features` registered on the engine.
pub struct Prepared {
    /// The round number.
    pub round: u64,
    /// The `${…}` values: constants and this round's variables.
    pub variables: BTreeMap<String, f64>,
    /// What request fields left out default to.
    pub defaults: BTreeMap<String, f64>,
    /// Standardisation (of all features) from the training rows.
    pub scaling: Scaling,
    /// SQL condition selecting the training rows.
    pub train_filter: String,
    /// SQL condition selecting the hold-out rows.
    pub test_filter: String,
    /// The event order, oldest first, as an `ORDER BY` list.
    pub order_by: String,
    /// Training rows.
    pub train_rows: u64,
    /// Mean regression target on the training rows (the regression baseline).
    pub target_mean: f64,
    /// Share of positive labels on the training rows.
    pub label_share: f64,
    /// The work folder (in the model store) holding the materialised features.
    pub work: String,
    /// How the state rows were found, when they are carried.
    pub state: Option<state::StateReport>,
    /// The fitting window, when the round has more batches than it holds.
    pub window: Option<Window>,
    /// SQL giving every event's features, when `features` holds only the window's.
    pub all_rows: Option<String>,
    /// The SQL of each lookup table carried in the state (from its partial aggregates).
    pub lookups: BTreeMap<String, String>,
}

/// The newest batches of a round, the ones its models are fitted and evaluated on.
#[derive(Debug, Clone)]
pub struct Window {
    /// The window's first batch.
    pub first_batch: u64,
    /// SQL condition keeping the window's events (and their feature rows).
    pub filter: String,
}

/// One pipeline's trainer: what every round of it needs.
pub struct Trainer<'a> {
    /// The pipeline.
    pub pipeline: &'a Pipeline,
    /// The engine.
    pub engine: &'a Engine,
    /// The pipeline's lake folder.
    pub lake: &'a Lake,
    /// The pipeline's model-store folder.
    pub store: &'a Lake,
    /// The row serving builds (from [`Pipeline::check_sql`]).
    pub serving: arrow_schema::SchemaRef,
    /// The feature SQL's incremental form, when it has one: rounds then carry state.
    pub shape: Option<lensflow_core::pipeline::incremental::Shape>,
    /// Recompute all state rows every round (`train --full`).
    pub full: bool,
    /// Recompute all state rows when late events change more than this share of them.
    pub full_above: f64,
    /// Fit on the newest this many batches only ([`TrainOptions::window`]).
    pub window: Option<u64>,
    /// State segment files whose checksum this trainer has written or checked already.
    pub verified: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Trainer<'_> {
    /// The round's fitting window, when it has more batches than the window holds.
    fn window_filter(&self, manifests: &[BatchManifest]) -> Option<Window> {
        let before = manifests.len().checked_sub(self.window? as usize).filter(|n| *n > 0)?;
        let earlier = &manifests[..before];
        let filter = match &self.pipeline.definition.events.time {
            // Events newer than all the earlier batches hold: the window's events, less those
            // that arrived late (older than events that had landed before the window).
            Some(time) => format!("{time} > {}", earlier.iter().filter_map(|m| m.max_ts).max()?),
            // Exactly the window's events: in each partition, the offsets after the earlier
            // batches' last.
            None => {
                let mut last: BTreeMap<i32, i64> = BTreeMap::new();
                for (p, r) in earlier.iter().flat_map(|m| &m.partitions) {
                    let l = last.entry(*p).or_insert(r.last);
                    *l = (*l).max(r.last);
                }
                let old: Vec<String> = last.iter().map(|(p, l)| format!("({KAFKA_PARTITION} = {p} AND {KAFKA_OFFSET} <= {l})")).collect();
                if old.is_empty() {
                    return None;
                }
                format!("NOT ({})", old.join(" OR "))
            }
        };
        Some(Window { first_batch: before as u64 + 1, filter })
    }

    /// Registers the round's events, splits off the hold-out, computes the variables and
    /// materialises the features.
    pub async fn prepare(&self, manifests: &[BatchManifest]) -> Result<Prepared> {
        let (engine, p) = (self.engine, self.pipeline);
        let d = &p.definition;
        let round = manifests.len() as u64;
        let fail = |reason: String| JobError::Round { round, reason };
        // Every file a manifest names must be there: a clear error naming the file beats a
        // query that fails somewhere on an executor.
        let files = self.lake.event_files(manifests).await?;
        for file in &files.files {
            check_batch_file(self.lake, round, file).await?;
        }
        if files.files.is_empty() {
            return Err(fail("the batches hold no events".into()));
        }
        let table = &d.events.table;
        engine.register_events(table, self.lake, &files, p.lake_schema()).await?;

        // The fitting window: every event when the round has no more batches than the window,
        // else those of its newest batches. The hold-out is the window's newest share, by event
        // time or, without one, by arrival within each partition (offsets order a partition,
        // not the topic).
        let window = self.window_filter(manifests);
        let (within, and_within) = match &window {
            Some(w) => (format!(" WHERE {}", w.filter), format!("{} AND ", w.filter)),
            None => (String::new(), String::new()),
        };
        let share = d.holdout.newest;
        let (train_filter, test_filter, order_by) = match &d.events.time {
            Some(time) => {
                let n = engine.query_row("count events", &format!("SELECT COUNT(*) FROM {table}{within}")).await?[0] as u64;
                let offset = ((n as f64) * (1.0 - share)).floor() as u64;
                let cutoff = engine.query_row("hold-out cutoff", &format!("SELECT {time} FROM {table}{within} ORDER BY {time} LIMIT 1 OFFSET {offset}")).await?
                    [0] as i64;
                (format!("{and_within}{time} < {cutoff}"), format!("{time} >= {cutoff}"), time.clone())
            }
            None => {
                let sql = format!(
                    "SELECT {KAFKA_PARTITION}, {KAFKA_OFFSET} FROM (SELECT {KAFKA_PARTITION}, {KAFKA_OFFSET}, \
                     ROW_NUMBER() OVER (PARTITION BY {KAFKA_PARTITION} ORDER BY {KAFKA_OFFSET}) AS rn, \
                     COUNT(*) OVER (PARTITION BY {KAFKA_PARTITION}) AS n FROM {table}{within}) t \
                     WHERE rn = CAST(FLOOR(n * {:?}) AS BIGINT) + 1 ORDER BY {KAFKA_PARTITION}",
                    1.0 - share
                );
                let mut cuts = Vec::new();
                for b in engine.query("hold-out cutoffs", &sql).await? {
                    for r in 0..b.num_rows() {
                        let (part, off) = (number(&b, 0, r).unwrap_or(0.0) as i64, number(&b, 1, r).unwrap_or(0.0) as i64);
                        cuts.push(format!("({KAFKA_PARTITION} = {part} AND {KAFKA_OFFSET} >= {off})"));
                    }
                }
                let test = if cuts.is_empty() { "FALSE".to_string() } else { format!("({})", cuts.join(" OR ")) };
                (format!("{and_within}NOT {test}"), test, format!("{KAFKA_PARTITION}, {KAFKA_OFFSET}"))
            }
        };

        // Variables on the training events, and the newest value of each `newest` default.
        let mut variables = d.features.constants.clone();
        let names: Vec<&String> = d.features.variables.keys().collect();
        let mut aggs: Vec<String> = vec!["COUNT(*)".into()];
        aggs.extend(d.features.variables.values().cloned());
        let v = engine.query_row("variables", &format!("SELECT {} FROM {table} WHERE {train_filter}", aggs.join(", "))).await?;
        if v[0] < 10.0 {
            return Err(fail(format!("only {} events are older than the hold-out", v[0])));
        }
        for (name, value) in names.into_iter().zip(&v[1..]) {
            if !value.is_finite() {
                return Err(fail(format!("variable {name} is {value} on the training events")));
            }
            variables.insert(name.clone(), *value);
        }
        let mut defaults = BTreeMap::new();
        for (field, default) in &d.request.defaults {
            let value = match default {
                FieldDefault::Number(v) => *v,
                FieldDefault::Word(_) => engine.query_row("request defaults", &format!("SELECT MAX({field}) FROM {table}")).await?[0],
            };
            defaults.insert(field.clone(), value);
        }

        // Features, materialised once: every later pass reads them instead of recomputing
        // windows. A crashed earlier attempt may have left files there.
        let work = format!("_work/{}", round_dir(round));
        remove_prefix(self.store, &work).await?;
        let features_url = format!("{}/", self.store.url_of(&format!("{work}/features")));
        let sql = substitute(p.features_sql(), &variables);
        let (state, all_rows, lookups) = match &self.shape {
            Some(shape) => {
                let r = state::features(self, shape, manifests, &sql, &features_url, window.as_ref()).await?;
                (Some(r.report), r.all_rows, r.lookups)
            }
            // Without carried state every event's features are computed anyway: all stay.
            None => {
                engine.materialise("feature SQL", &sql, &features_url, &["features", "features_round"]).await?;
                (None, None, BTreeMap::new())
            }
        };

        let (label, target) = (&d.models.classification.label, &d.models.regression.target);
        let mut stats_sql = vec!["COUNT(*)".to_string(), format!("AVG({target})"), format!("AVG({label})"), format!("MIN({label})"), format!("MAX({label})")];
        for f in p.features() {
            stats_sql.push(format!("AVG({f})"));
            stats_sql.push(format!("STDDEV_POP({f})"));
        }
        let s = engine.query_row("scaling", &format!("SELECT {} FROM features WHERE {train_filter}", stats_sql.join(", "))).await?;
        if s[3] < 0.0 || s[4] > 1.0 {
            return Err(fail(format!("the label `{label}` must be 0 or 1; it ranges from {} to {}", s[3], s[4])));
        }
        let k = p.features().len();
        let scaling =
            Scaling { mean: (0..k).map(|i| s[5 + 2 * i]).collect(), scale: (0..k).map(|i| if s[6 + 2 * i] > 1e-12 { s[6 + 2 * i] } else { 1.0 }).collect() };
        Ok(Prepared {
            round,
            variables,
            defaults,
            scaling,
            train_filter,
            test_filter,
            order_by,
            train_rows: s[0] as u64,
            target_mean: s[1],
            label_share: s[2],
            work,
            state,
            window,
            all_rows,
            lookups,
        })
    }

    /// Positions of a model's features (all, unless it names a subset).
    fn uses(&self, subset: &Option<Vec<String>>) -> Vec<usize> {
        let all = self.pipeline.features();
        match subset {
            Some(list) => list.iter().filter_map(|f| all.iter().position(|a| a == f)).collect(),
            None => (0..all.len()).collect(),
        }
    }

    /// Least squares of the target: one pass for X'X and X'y, then the normal equations.
    pub async fn fit_regression(&self, prep: &Prepared) -> Result<LinearModel> {
        let target = &self.pipeline.definition.models.regression.target;
        let uses = self.uses(&self.pipeline.definition.models.regression.features);
        let sql = solve::gram_sql(self.pipeline.features(), &prep.scaling, &uses, &prep.train_filter, &[target], None, "1.0", target);
        let row = self.engine.query_row("regression X'X", &sql).await?;
        let (a, b) = solve::unpack_gram(uses.len(), &row);
        solve::solve_spd(&a, &b, 0.0)
            .map(|x| solve::model_of(&x, &uses))
            .ok_or_else(|| JobError::Round { round: prep.round, reason: "regression normal equations are singular".into() })
    }

    /// Logistic regression of the label: Newton (IRLS) steps, one pass each, until the step is
    /// tiny. The definition's ridge (0 by default) penalises the standardised coefficients.
    pub async fn fit_classification(&self, prep: &Prepared) -> Result<LinearModel> {
        let c = &self.pipeline.definition.models.classification;
        let fail = |reason: &str| JobError::Round { round: prep.round, reason: reason.to_string() };
        let uses = self.uses(&c.features);
        let share = prep.label_share.clamp(1e-6, 1.0 - 1e-6);
        let mut model = LinearModel { uses: uses.clone(), intercept: (share / (1.0 - share)).ln(), coefficients: vec![0.0; uses.len()] };
        let label = c.label.as_str();
        for step in 0..25 {
            let score = solve::score_sql(self.pipeline.features(), &prep.scaling, &model);
            let prob = "(1.0 / (1.0 + EXP(-score)))";
            let sql = solve::gram_sql(
                self.pipeline.features(),
                &prep.scaling,
                &uses,
                &prep.train_filter,
                &[label],
                Some(&score),
                &format!("{prob} * (1.0 - {prob})"),
                &format!("({label} - {prob})"),
            );
            let row = self.engine.query_row("classification Newton step", &sql).await?;
            let (mut h, mut g) = solve::unpack_gram(uses.len(), &row);
            if c.ridge > 0.0 {
                // The penalty's gradient and curvature, scaled to the training rows so the
                // ridge means the same at any size; the intercept is not penalised.
                let lambda = c.ridge * prep.train_rows as f64 / 1000.0;
                for (j, coef) in model.coefficients.iter().enumerate() {
                    g[j + 1] -= lambda * coef;
                    h[[j + 1, j + 1]] += lambda;
                }
            }
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
        Err(fail("logistic regression did not converge in 25 Newton steps (separable data? set models.classification.ridge)"))
    }

    /// One round, from the batches to `LATEST`.
    pub async fn round(&self, manifests: &[BatchManifest]) -> Result<RoundReport> {
        let (engine, store, p) = (self.engine, self.store, self.pipeline);
        let round = manifests.len() as u64;
        let mut watch = Stopwatch(BTreeMap::new(), Instant::now());
        let lineage = lineage(self.lake, manifests);
        tracing::info!(pipeline = p.name(), round, rows = lineage.rows, window = ?self.window, "training round");
        let prep = self.prepare(manifests).await?;
        let lineage = Lineage { window_from: prep.window.as_ref().map(|w| w.first_batch), ..lineage };
        watch.lap("features");
        let regression = self.fit_regression(&prep).await?;
        watch.lap("regression");
        let classification = self.fit_classification(&prep).await?;
        watch.lap("classification");
        let mut metrics = self.evaluate(&prep, &regression, &classification).await?;
        metrics.train_rows = prep.train_rows;
        watch.lap("evaluate");
        let (segmentation, silhouette) = segments::fit(engine, p, &prep).await?;
        metrics.silhouette = silhouette;
        watch.lap("segments");

        tracing::info!(pipeline = p.name(), round, "models fitted; writing the round");
        // Lookup tables over every event of the round: serving's "now".
        let dir = round_dir(round);
        let mut checksums = BTreeMap::new();
        let mut lookups = Vec::new();
        for l in &p.definition.lookups {
            let file = lookup_file(&l.name);
            let mut sql = substitute(p.sql_text(&l.sql), &prep.variables);
            if let Some(carried) = prep.lookups.get(&l.name) {
                sql = carried.clone();
            } else if let Some(all_rows) = &prep.all_rows {
                // Serving's "now" is every event, not just the window's.
                sql = segments::with_features(&sql, all_rows);
            }
            let written = self.write_lookup(&format!("lookup {}", l.name), &sql, &format!("{dir}/{file}")).await?;
            checksums.insert(file.clone(), written.sha256);
            lookups.push(LookupTable { name: l.name.clone(), file, rows: written.rows });
        }
        self.check_serving_matches(&prep).await?;
        watch.lap("lookup tables");

        let artifact = ModelArtifact {
            format_version: ARTIFACT_FORMAT_VERSION,
            pipeline: p.clone(),
            fingerprint: p.fingerprint(),
            round,
            created_at_ms: lensflow_core::now_ms(),
            features: p.features().to_vec(),
            variables: prep.variables.clone(),
            defaults: prep.defaults.clone(),
            scaling: prep.scaling.clone(),
            regression,
            classification,
            segmentation,
            metrics: metrics.clone(),
            lineage,
            lookups,
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
        tracing::info!(pipeline = p.name(), round, rmse = metrics.rmse, auc = metrics.auc, "round published");
        Ok(RoundReport {
            pipeline: p.name().to_string(),
            round,
            batches: manifests.iter().map(|m| m.batch).collect(),
            events: artifact.lineage.rows,
            window_from: prep.window.as_ref().map(|w| w.first_batch),
            metrics,
            seconds: watch.0,
            state: prep.state.clone(),
            path: store.url_of(&dir),
        })
    }

    /// Runs a lookup table's SQL, which the engine writes as the round's file `path` (on a
    /// cluster, an executor does), and reads the file back once to checksum it.
    async fn write_lookup(&self, what: &str, sql: &str, path: &str) -> Result<written::WrittenFile> {
        // Row groups of 8k rows bound what a reader or writer holds at any entity count; the
        // file is left uncompressed, as serving loads it whole each round.
        let mut options = TableParquetOptions::default();
        options.global.compression = Some("uncompressed".into());
        options.global.max_row_group_size = 8192;
        let url = self.store.url_of(path);
        let written = self.engine.write_parquet(what, sql, None, &url, None, options).await?;
        let mut files = written::read_back_write(self.store, what, &url, written, &[path.to_string()]).await?;
        files.pop().ok_or_else(|| JobError::Internal(format!("{url} was not read back")))
    }

    /// Evaluates serving's compiled feature expressions on a sample of the SQL's own rows
    /// (their state columns as serving would read them from the lookups) and fails the round
    /// if the two disagree: the per-round drift check, for every pipeline.
    async fn check_serving_matches(&self, prep: &Prepared) -> Result<()> {
        let p = self.pipeline;
        let what = "feature drift check";
        let exprs = FeatureExprs::compile(p, self.serving.clone(), &prep.variables)
            .map_err(|(f, e)| JobError::Engine { what: what.into(), reason: format!("feature {f}: {e}") })?;
        let columns: Vec<String> = self.serving.fields().iter().map(|f| format!("CAST({0} AS {1}) AS {0}", f.name(), sql_type(f.data_type()))).collect();
        let desc = prep.order_by.split(", ").map(|c| format!("{c} DESC")).collect::<Vec<_>>().join(", ");
        let sql = format!("SELECT {}, {} FROM features ORDER BY {desc} LIMIT 500", columns.join(", "), p.features().join(", "));
        for batch in self.engine.query(what, &sql).await? {
            let n = self.serving.fields().len();
            let rows = RecordBatch::try_new(self.serving.clone(), batch.columns()[..n].to_vec())
                .map_err(|e| JobError::Engine { what: what.into(), reason: e.to_string() })?;
            let served = exprs.evaluate(&rows).map_err(|reason| JobError::Engine { what: what.into(), reason })?;
            for (i, name) in p.features().iter().enumerate() {
                for r in 0..batch.num_rows() {
                    let (got, expected) = (number(&batch, n + i, r).unwrap_or(f64::NAN), served[i].value(r));
                    // Written so that a NaN on either side is a mismatch too.
                    let agree = (got - expected).abs() <= 1e-9 * (1.0 + expected.abs());
                    if !agree {
                        return Err(JobError::Engine {
                            what: what.into(),
                            reason: format!("the feature SQL gives {name} = {got}, serving's expression gives {expected}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Hold-out metrics, each beside its trivial baseline.
    async fn evaluate(&self, prep: &Prepared, regression: &LinearModel, classification: &LinearModel) -> Result<RoundMetrics> {
        let m = &self.pipeline.definition.models;
        let (label, target) = (&m.classification.label, &m.regression.target);
        let features = self.pipeline.features();
        let lin = solve::score_sql(features, &prep.scaling, regression);
        let pred = match m.regression.clip {
            Some([lo, hi]) => format!("LEAST(GREATEST(lin, {lo:?}), {hi:?})"),
            None => "lin".to_string(),
        };
        let scored = format!(
            "WITH s AS (SELECT {target} AS y, {label} AS label, {lin} AS lin, {} AS logit FROM features WHERE {}), \
             p AS (SELECT y, label, {pred} AS pred, 1.0 / (1.0 + EXP(-logit)) AS prob FROM s)",
            solve::score_sql(features, &prep.scaling, classification),
            prep.test_filter
        );
        let mean = prep.target_mean;
        let e = self
            .engine
            .query_row(
                "evaluate",
                &format!(
                    "{scored} SELECT COUNT(*), SUM((pred - y) * (pred - y)), SUM(ABS(pred - y)), SUM(({mean:?} - y) * ({mean:?} - y)), \
                     SUM(CASE WHEN (CASE WHEN prob >= 0.5 THEN 1.0 ELSE 0.0 END) = label THEN 1.0 ELSE 0.0 END), SUM(label) FROM p"
                ),
            )
            .await?;
        let test_rows = e[0];
        if test_rows < 1.0 {
            return Err(JobError::Engine { what: "evaluate".into(), reason: "the hold-out is empty".into() });
        }
        let auc = self.engine.query_row("AUC", &format!("{scored} {}", auc_sql("p", "prob", "label"))).await?;
        let positive_share = e[5] / test_rows;
        let majority_positive = prep.label_share >= 0.5;
        Ok(RoundMetrics {
            train_rows: 0,
            test_rows: test_rows as u64,
            rmse: (e[1] / test_rows).sqrt(),
            mae: e[2] / test_rows,
            rmse_baseline: (e[3] / test_rows).sqrt(),
            r2: if e[3] > 0.0 { 1.0 - e[1] / e[3] } else { 0.0 },
            auc: auc[0],
            auc_baseline: 0.5,
            accuracy: e[4] / test_rows,
            accuracy_baseline: if majority_positive { positive_share } else { 1.0 - positive_share },
            silhouette: 0.0,
        })
    }
}

/// Score bins of the AUC histogram: a hold-out row's probability to five places.
const AUC_BINS: usize = 100_000;

/// SQL giving, in one row, the ROC AUC of `score` against the 0/1 `label` over the rows of
/// `table`, from a histogram of [`AUC_BINS`] score bins (ties within a bin count half), or 0.5
/// when one class is missing. The engine sums the bins (on a cluster, an executor), so that only
/// the one row reaches the trainer at any size of hold-out.
fn auc_sql(table: &str, score: &str, label: &str) -> String {
    let bin = format!("CAST(FLOOR({score} * {AUC_BINS}) AS BIGINT)");
    format!(
        "SELECT CASE WHEN SUM(pos) > 0 AND SUM(neg) > 0 THEN SUM(pos * (below + neg / 2)) / (SUM(pos) * SUM(neg)) ELSE 0.5 END \
         FROM (SELECT pos, neg, SUM(neg) OVER (ORDER BY bin ROWS UNBOUNDED PRECEDING) - neg AS below \
         FROM (SELECT {bin} AS bin, CAST(SUM({label}) AS DOUBLE) AS pos, CAST(COUNT(*) AS DOUBLE) - CAST(SUM({label}) AS DOUBLE) AS neg \
         FROM {table} GROUP BY {bin}) bins) cumulative"
    )
}

/// The SQL name of an Arrow type serving rows use.
fn sql_type(t: &arrow_schema::DataType) -> &'static str {
    match t {
        arrow_schema::DataType::Int64 => "BIGINT",
        arrow_schema::DataType::Utf8 => "STRING",
        _ => "DOUBLE",
    }
}

/// Reads a batch file's Parquet footer: it must exist, be Parquet, and hold the rows its
/// manifest says. Costs one small read per file and names the file when something is off.
async fn check_batch_file(lake: &Lake, round: u64, file: &lensflow_core::BatchFile) -> Result<()> {
    let bad = |reason: String| {
        JobError::Store(StoreError::BatchFile { path: lake.url_of(&file.path), reason: format!("an event file of batches 1..={round} but {reason}") })
    };
    let path = Path::from(file.path.as_str());
    let size = lake.store().head(&path).await.map_err(|e| bad(format!("unreadable: {e}")))?.size;
    let rows = written::parquet_rows(lake, &path, size).await.map_err(|e| bad(format!("unreadable: {e}")))?;
    if rows != file.rows {
        return Err(bad(format!("holds {rows} rows, not {}", file.rows)));
    }
    Ok(())
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
        window_from: None,
    }
}

async fn remove_prefix(store: &Lake, prefix: &str) -> Result<()> {
    for path in store.list(prefix).await? {
        store.delete(path.as_ref()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ROC AUC from (score bin, positives, total) counts; ties within a bin count half.
    fn auc_from_histogram(hist: &mut [(i64, f64, f64)]) -> f64 {
        hist.sort_by_key(|h| h.0);
        let bins: Vec<(f64, f64)> = hist.iter().map(|h| (h.1, h.2)).collect();
        auc_from_bins(&bins)
    }

    /// ROC AUC from (positives, total) counts of score bins in ascending order; ties within a bin
    /// count half. Empty bins change nothing.
    fn auc_from_bins(bins: &[(f64, f64)]) -> f64 {
        let pos: f64 = bins.iter().map(|b| b.0).sum();
        let neg: f64 = bins.iter().map(|b| b.1 - b.0).sum();
        if pos == 0.0 || neg == 0.0 {
            return 0.5;
        }
        let mut neg_below = 0.0;
        let mut area = 0.0;
        for &(p, total) in bins {
            let n = total - p;
            area += p * (neg_below + 0.5 * n);
            neg_below += n;
        }
        area / (pos * neg)
    }

    #[test]
    fn auc_of_perfect_random_and_reversed_scores() {
        assert_eq!(auc_from_histogram(&mut [(0, 0.0, 5.0), (1, 5.0, 5.0)]), 1.0);
        assert_eq!(auc_from_histogram(&mut [(0, 5.0, 10.0)]), 0.5);
        assert_eq!(auc_from_histogram(&mut [(1, 0.0, 5.0), (0, 5.0, 5.0)]), 0.0);
        let sparse = auc_from_histogram(&mut [(7, 2.0, 5.0), (2, 1.0, 4.0), (40, 3.0, 3.0)]);
        assert!(sparse > 0.5 && sparse < 1.0, "{sparse}");
    }

    /// The engine's AUC of `scores` against `labels`.
    async fn engine_auc(engine: &Engine, scores: Vec<f64>, labels: Vec<f64>) -> f64 {
        use arrow_array::{Float64Array, RecordBatch};
        let schema = std::sync::Arc::new(arrow_schema::Schema::new(vec![
            arrow_schema::Field::new("prob", arrow_schema::DataType::Float64, false),
            arrow_schema::Field::new("label", arrow_schema::DataType::Float64, false),
        ]));
        let batch =
            RecordBatch::try_new(schema, vec![std::sync::Arc::new(Float64Array::from(scores)), std::sync::Arc::new(Float64Array::from(labels))]).unwrap();
        let _ = engine.context().deregister_table("scored");
        engine.context().register_batch("scored", batch).unwrap();
        engine.query_row("AUC", &auc_sql("scored", "prob", "label")).await.unwrap()[0]
    }

    #[tokio::test]
    async fn the_engine_sums_the_auc_histogram_as_the_reference_does() {
        use rand::{Rng, SeedableRng};
        let engine = Engine::local(2).unwrap();
        // Labels that follow the score loosely, with many rows sharing a bin.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let scores: Vec<f64> = (0..50_000).map(|_| (rng.random::<f64>() * 3000.0).floor() / 3000.0).collect();
        let labels: Vec<f64> = scores.iter().map(|s| if rng.random::<f64>() < 0.2 + 0.6 * s { 1.0 } else { 0.0 }).collect();
        let mut bins = std::collections::BTreeMap::<i64, (f64, f64)>::new();
        for (s, l) in scores.iter().zip(&labels) {
            let bin = bins.entry((s * AUC_BINS as f64).floor() as i64).or_default();
            (bin.0, bin.1) = (bin.0 + l, bin.1 + 1.0);
        }
        let reference = auc_from_histogram(&mut bins.into_iter().map(|(b, (p, t))| (b, p, t)).collect::<Vec<_>>());
        let ours = engine_auc(&engine, scores, labels).await;
        assert!((ours - reference).abs() < 1e-12 && ours > 0.6 && ours < 0.9, "engine {ours}, reference {reference}");

        assert_eq!(engine_auc(&engine, vec![0.1, 0.2, 0.8, 0.9], vec![0.0, 0.0, 1.0, 1.0]).await, 1.0);
        assert_eq!(engine_auc(&engine, vec![0.1, 0.2, 0.8, 0.9], vec![1.0, 1.0, 0.0, 0.0]).await, 0.0);
        assert_eq!(engine_auc(&engine, vec![0.3, 0.3, 0.3, 0.3], vec![1.0, 0.0, 1.0, 0.0]).await, 0.5);
        // One class only.
        assert_eq!(engine_auc(&engine, vec![0.1, 0.7], vec![1.0, 1.0]).await, 0.5);
    }

    /// Rows of `features` matching `filter`: standardised features, target, label.
    async fn collect(engine: &Engine, features: &[String], prep: &Prepared, filter: &str) -> (ndarray::Array2<f64>, Vec<f64>, Vec<usize>) {
        let sql = format!("SELECT rating, liked, {} FROM features WHERE {filter} ORDER BY ts, user_id, movie_id", features.join(", "));
        let (mut z, mut rating, mut liked) = (Vec::new(), Vec::new(), Vec::new());
        for b in engine.query("collect", &sql).await.unwrap() {
            for r in 0..b.num_rows() {
                let v: Vec<f64> = (0..b.num_columns()).map(|c| number(&b, c, r).unwrap()).collect();
                rating.push(v[0]);
                liked.push(v[1] as usize);
                z.extend(prep.scaling.apply(&v[2..]));
            }
        }
        (ndarray::Array2::from_shape_vec((rating.len(), features.len()), z).unwrap(), rating, liked)
    }

    fn exact_auc(scores: &[f64], liked: &[usize]) -> f64 {
        let mut hist: Vec<(i64, f64, f64)> = scores.iter().zip(liked).map(|(s, l)| ((s * 1e12) as i64, *l as f64, 1.0)).collect();
        auc_from_histogram(&mut hist)
    }

    /// The solvers' cluster-side statistics give what linfa fits on the same collected rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_statistics_fit_what_linfa_fits_on_the_same_rows() {
        use crate::consume::{commit::commit_batch, offsets::LakeOffsets, writer::Batch};
        use linfa::prelude::*;

        let pipeline = Pipeline::builtin("movielens").unwrap().unwrap();
        let checked = pipeline.check_sql().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().join("lake").to_str().unwrap(), &StorageOptions::default()).unwrap().child("movielens");
        let store = Lake::open(dir.path().join("models").to_str().unwrap(), &StorageOptions::default()).unwrap().child("movielens");
        let mut csv = Vec::new();
        let options = crate::generate::GenerateOptions { ratings: 8_000, seed: 3, ..Default::default() };
        crate::generate::generate(&options, &mut csv).unwrap();
        let mut batch = Batch::new(&pipeline);
        let text = String::from_utf8(csv).unwrap();
        let mut lines = text.lines();
        let layout = pipeline.csv_layout(lines.next().unwrap().split(',').map(str::as_bytes)).unwrap();
        for (i, line) in lines.enumerate() {
            let fields: Vec<&[u8]> = line.split(',').map(str::as_bytes).collect();
            let event = pipeline.event_from_csv(&layout, fields.into_iter()).unwrap();
            batch.partition(0).push_event(i as i64, &event);
        }
        commit_batch(&lake, &mut LakeOffsets::new("t"), &batch, "t", "w").await.unwrap();
        let manifests = lake.manifests().await.unwrap();

        let engine = Engine::standalone(2).await.unwrap();
        let trainer = Trainer {
            pipeline: &pipeline,
            engine: &engine,
            lake: &lake,
            store: &store,
            serving: checked.serving,
            shape: None,
            full: false,
            full_above: 0.5,
            window: None,
            verified: Default::default(),
        };
        let prep = trainer.prepare(&manifests).await.unwrap();
        let regression = trainer.fit_regression(&prep).await.unwrap();
        let classification = trainer.fit_classification(&prep).await.unwrap();

        let features = pipeline.features();
        let (z, rating, liked) = collect(&engine, features, &prep, &prep.train_filter).await;
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
        let (z_test, _, liked_test) = collect(&engine, features, &prep, &prep.test_filter).await;
        let ours: Vec<f64> = z_test.rows().into_iter().map(|row| classification.score(row.as_slice().unwrap())).collect();
        // linfa reports the probability of whichever label it made its "positive" class.
        let flip = logistic.labels().pos.class == 0;
        let theirs: Vec<f64> = logistic.predict_probabilities(&z_test).iter().map(|p| if flip { 1.0 - p } else { *p }).collect();
        let (a, b) = (exact_auc(&ours, &liked_test), exact_auc(&theirs, &liked_test));
        assert!((a - b).abs() < 0.005, "hold-out AUC {a} vs linfa {b}");
        assert!(a > 0.6, "the classifier learned something: AUC {a}");
    }
}
