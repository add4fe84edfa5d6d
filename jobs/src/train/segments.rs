//! Segments: k-means on the clustered entity's profile features, described in words from the
//! centroids.
//!
//! A lookup entity (MovieLens users) is profiled on its state over the training events: the
//! lookup's own SQL runs on the training rows, and the profile features' expressions (the same
//! ones serving evaluates) turn each entity's state into its profile. An `event` entity (a
//! smart-home device) is profiled on its own training row. The engine samples the entities
//! (all of them up to 5,000, a uniform sample of that many beyond), and linfa clusters that
//! sample here.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use futures::StreamExt;
use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray::{Array1, Array2, Axis};

use lensflow_core::Pipeline;
use lensflow_core::model::{Scaling, Segment, Segmentation};
use lensflow_core::pipeline::definition::Clustering;
use lensflow_core::pipeline::expr::{self, FeatureExprs};

use super::Prepared;
use super::engine::{Engine, engine_err, number};
use crate::{JobError, Result};

/// Fits the pipeline's segments on round `prep.round`'s training rows; returns them and the
/// mean silhouette.
pub async fn fit(engine: &Engine, pipeline: &Pipeline, prep: &Prepared) -> Result<(Segmentation, f64)> {
    let round = prep.round;
    let c = &pipeline.definition.models.clustering;
    let fail = |reason: String| JobError::Round { round, reason };
    let d = c.profile.len();
    let what = "segment profiles";
    let (x, seen) = engine
        .bounded(what, async {
            let mut values = Vec::new();
            let mut seen = 0;
            match pipeline.definition.lookups.iter().find(|l| l.name == c.entity) {
                Some(lookup) => {
                    // The lookup's SQL reads `features`; here a CTE of that name holds the training rows.
                    let training_rows = format!("SELECT * FROM features_round WHERE {}", prep.train_filter);
                    let entities = with_features(&lensflow_core::pipeline::substitute(pipeline.sql_text(&lookup.sql), &prep.variables), &training_rows);
                    // There are no more entities than lookup rows, so the one partition that
                    // counts them holds no more than serving loads.
                    let sql = sampled(&format!("SELECT *, COUNT(*) OVER () AS {ENTITIES} FROM ({entities}) entities"), &lookup.key);
                    let items = expr::final_select(pipeline.features_sql()).map_err(fail)?;
                    let mut stream = engine.stream(what, &sql).await?;
                    let mut exprs = None;
                    while let Some(b) = stream.next().await.transpose().map_err(engine_err(what))? {
                        let exprs = match exprs.as_mut() {
                            Some(e) => e,
                            None => exprs.insert(
                                FeatureExprs::compile_named(&c.profile, &items, b.schema(), &prep.variables)
                                    .map_err(|(f, e)| fail(format!("profile feature {f}: {e}")))?,
                            ),
                        };
                        let cols = exprs.evaluate(&b).map_err(fail)?;
                        let count = b.schema().index_of(ENTITIES).map_err(|e| fail(e.to_string()))?;
                        for r in 0..b.num_rows() {
                            values.extend(cols.iter().map(|col| col.value(r)));
                            seen = number(&b, count, r).unwrap_or(0.0) as u64;
                        }
                    }
                }
                None => {
                    // An event is identified by its place in the events' order, and by its
                    // profile where events share a place (the same time).
                    let profile = c.profile.join(", ");
                    let sql = sampled(&format!("SELECT {profile} FROM features WHERE {}", prep.train_filter), &format!("{}, {profile}", prep.order_by));
                    seen = engine.query_row(what, &format!("SELECT COUNT(*) FROM features WHERE {}", prep.train_filter)).await?[0] as u64;
                    let mut stream = engine.stream(what, &sql).await?;
                    while let Some(b) = stream.next().await.transpose().map_err(engine_err(what))? {
                        for r in 0..b.num_rows() {
                            values.extend((0..d).map(|col| number(&b, col, r).unwrap_or(0.0)));
                        }
                    }
                }
            }
            let x = Array2::from_shape_vec((values.len() / d.max(1), d), values).map_err(|e| fail(format!("profiles: {e}")))?;
            Ok((x, seen))
        })
        .await?;
    if x.nrows() < c.k * 2 {
        return Err(fail(format!("{} entities are too few for {} segments", x.nrows(), c.k)));
    }
    if seen > x.nrows() as u64 {
        tracing::info!(round, entities = seen, sample = x.nrows(), "segments fitted on a sample of the entities");
    }
    let mean = x.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(d));
    let scale = x.std_axis(Axis(0), 0.0).mapv(|s| if s > 1e-12 { s } else { 1.0 });
    let data = DatasetBase::from((&x - &mean) / &scale);
    let model = KMeans::params(c.k).max_n_iterations(300).tolerance(1e-8).n_runs(1).fit(&data).map_err(|e| fail(format!("k-means: {e}")))?;
    let z = data.records();
    let labels = model.predict(z);
    let scaling = Scaling { mean: mean.to_vec(), scale: scale.to_vec() };
    let mut segments = Vec::with_capacity(c.k);
    for id in 0..c.k {
        let centroid = model.centroids().row(id).to_vec();
        let profile: BTreeMap<String, f64> = c.profile.iter().enumerate().map(|(j, f)| (f.clone(), centroid[j] * scale[j] + mean[j])).collect();
        // A sample's counts stand for the whole population's.
        let size = (labels.iter().filter(|l| **l == id).count() as f64 * seen as f64 / x.nrows() as f64).round() as u64;
        let description = describe(c, &centroid, &profile, &prep.variables).map_err(fail)?;
        segments.push(Segment { id, description, centroid, profile, size });
    }
    Ok((Segmentation { profile: c.profile.clone(), scaling, segments }, silhouette(z, &labels, 1000)))
}

/// Most entities k-means is fitted on. Beyond it the engine keeps a sample, so that the
/// trainer's memory does not grow with the lake (on a cluster it holds no other table whole).
/// Below the 5,307 users a 1M-rating lake's last round trains on, so that the trainer holds the
/// same rows at every size from there up; a few thousand points fix four centroids in a few
/// dimensions to well within the spread between rounds.
const MAX_ENTITIES: usize = 5_000;

/// The column [`sampled`]'s lookup rows count every entity in.
const ENTITIES: &str = "lensflow_entities";

/// `select`'s rows cut to those k-means is fitted on: every one up to [`MAX_ENTITIES`], beyond
/// that the [`MAX_ENTITIES`] whose `identity` (columns `select` reads) hashes lowest. The sample is
/// uniform, the same whatever order the rows arrive in, and taken by the engine (on a cluster,
/// the executors), so that no more rows reach the trainer at any size of lake. The rows come in
/// hash order, so the fit and its silhouette are reproducible.
fn sampled(select: &str, identity: &str) -> String {
    format!("{select} ORDER BY xxhash64({identity}), {identity} LIMIT {MAX_ENTITIES}")
}

/// Puts `rows` in a CTE named `features` in front of `sql` (which reads `features`); `rows`
/// must not read `features` itself.
pub fn with_features(sql: &str, rows: &str) -> String {
    let cte = format!("features AS ({rows})");
    let trimmed = sql.trim_start();
    match trimmed.get(..5) {
        Some(w) if w.eq_ignore_ascii_case("with ") => format!("WITH {cte}, {}", &trimmed[5..]),
        _ => format!("WITH {cte} {trimmed}"),
    }
}

/// Words for a centroid from the definition's `words` (how far it lies from the average), then
/// the figures behind them from its `figures` expression, evaluated on the centroid's profile.
fn describe(c: &Clustering, z: &[f64], profile: &BTreeMap<String, f64>, vars: &BTreeMap<String, f64>) -> Result<String, String> {
    let words: Vec<&str> = c
        .words
        .iter()
        .filter_map(|w| {
            let j = c.profile.iter().position(|p| p == &w.feature)?;
            let word = if z[j] > w.threshold {
                &w.high
            } else if z[j] < -w.threshold {
                &w.low
            } else {
                &w.mid
            };
            Some(word.as_str()).filter(|s| !s.is_empty())
        })
        .collect();
    let mut text = words.join(", ");
    if let Some(figures) = &c.figures {
        let schema = Arc::new(Schema::new(c.profile.iter().map(|f| Field::new(f, DataType::Float64, false)).collect::<Vec<_>>()));
        let columns = c.profile.iter().map(|f| Arc::new(arrow_array::Float64Array::from(vec![profile[f]])) as arrow_array::ArrayRef).collect();
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?;
        let e = expr::compile_text(figures, schema, vars).map_err(|e| format!("clustering figures: {e}"))?;
        let out = expr::evaluate(&e, &batch)?;
        let out = datafusion::arrow::compute::cast(&out, &DataType::Utf8).map_err(|e| e.to_string())?;
        if let Some(s) = out.as_any().downcast_ref::<arrow_array::StringArray>().filter(|s| s.len() == 1 && !s.is_null(0)) {
            text = if text.is_empty() { s.value(0).to_string() } else { format!("{text} ({})", s.value(0)) };
        }
    }
    Ok(text)
}

/// Mean silhouette over the first `limit` entities (in the profile query's order, so it is
/// reproducible).
fn silhouette(z: &Array2<f64>, labels: &Array1<usize>, limit: usize) -> f64 {
    let n = z.nrows().min(limit);
    let k = labels.iter().take(n).max().map(|m| m + 1).unwrap_or(0);
    let dist = |a: usize, b: usize| z.row(a).iter().zip(z.row(b).iter()).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let mut total = 0.0;
    for i in 0..n {
        let mut sums = vec![0.0; k];
        let mut counts = vec![0usize; k];
        for j in 0..n {
            if i != j {
                sums[labels[j]] += dist(i, j);
                counts[labels[j]] += 1;
            }
        }
        let own = labels[i];
        if counts[own] == 0 {
            continue;
        }
        let a = sums[own] / counts[own] as f64;
        let b = (0..k).filter(|&c| c != own && counts[c] > 0).map(|c| sums[c] / counts[c] as f64).fold(f64::INFINITY, f64::min);
        if b.is_finite() {
            total += (b - a) / a.max(b);
        }
    }
    total / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rows_go_in_front_of_any_query() {
        assert_eq!(
            with_features("SELECT 1 FROM features", "SELECT * FROM features_round WHERE x < 3"),
            "WITH features AS (SELECT * FROM features_round WHERE x < 3) SELECT 1 FROM features"
        );
        assert_eq!(
            with_features("  with a AS (SELECT 1) SELECT * FROM a", "SELECT * FROM features_round WHERE x < 3"),
            "WITH features AS (SELECT * FROM features_round WHERE x < 3), a AS (SELECT 1) SELECT * FROM a"
        );
    }

    /// The keys and values of `sampled` over `rows` (columns `key`, `x`), and the entity count.
    async fn sample_of(engine: &Engine, rows: &str) -> (Vec<(i64, f64)>, Vec<f64>) {
        let sql = sampled(&format!("SELECT *, COUNT(*) OVER () AS {ENTITIES} FROM ({rows}) entities"), "key");
        let (mut taken, mut counts) = (Vec::new(), Vec::new());
        for b in engine.query("sample", &sql).await.unwrap() {
            for r in 0..b.num_rows() {
                taken.push((number(&b, 0, r).unwrap() as i64, number(&b, 1, r).unwrap()));
                counts.push(number(&b, 2, r).unwrap());
            }
        }
        (taken, counts)
    }

    #[tokio::test]
    async fn entities_beyond_the_cap_are_a_uniform_sample_the_engine_takes_whatever_the_order() {
        let engine = Engine::local(2).unwrap();
        // Up to the cap: every entity, each row counting them all.
        let (few, counts) = sample_of(&engine, "SELECT value AS key, value * 0.5 AS x FROM generate_series(1, 1000)").await;
        let mut keys: Vec<i64> = few.iter().map(|(k, _)| *k).collect();
        keys.sort();
        assert_eq!(keys, (1..=1000).collect::<Vec<i64>>());
        assert!(few.iter().all(|(k, x)| *x == *k as f64 * 0.5));
        assert!(counts.iter().all(|c| *c == 1000.0), "{counts:?}");

        // Beyond it: MAX_ENTITIES of them, the same ones in the same order whichever order the
        // rows come in, and the count is of all of them.
        let n = (MAX_ENTITIES * 5 / 2) as i64;
        let (forward, counts) = sample_of(&engine, &format!("SELECT value AS key, value * 0.5 AS x FROM generate_series(1, {n})")).await;
        let (backward, _) = sample_of(&engine, &format!("SELECT value AS key, value * 0.5 AS x FROM generate_series({n}, 1, -1)")).await;
        assert_eq!(forward.len(), MAX_ENTITIES);
        assert!(counts.iter().all(|c| *c == n as f64));
        assert_eq!(forward, backward);
        // Uniform: the sample's mean key is near the population's ((n + 1) / 2).
        let mean = forward.iter().map(|(k, _)| *k as f64).sum::<f64>() / forward.len() as f64;
        assert!((mean / ((n + 1) as f64 / 2.0) - 1.0).abs() < 0.02, "sample mean {mean}");
    }
}
