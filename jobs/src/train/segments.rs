//! Segments: k-means on the clustered entity's profile features, described in words from the
//! centroids.
//!
//! A lookup entity (MovieLens users) is profiled on its state over the training events: the
//! lookup's own SQL runs on the training rows, and the profile features' expressions (the same
//! ones serving evaluates) turn each entity's state into its profile. An `event` entity (a
//! smart-home device) is profiled on its own training row. The rows stream in and linfa
//! clusters them here: all of them up to 10,000 entities, a uniform sample of that many beyond.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use datafusion::common::ScalarValue;
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
    let sample = engine
        .bounded(what, async {
            let mut sample = Sample::new(d);
            match pipeline.definition.lookups.iter().find(|l| l.name == c.entity) {
                Some(lookup) => {
                    // The lookup's SQL reads `features`; here a CTE of that name holds the training rows.
                    let training_rows = format!("SELECT * FROM features_round WHERE {}", prep.train_filter);
                    let sql = with_features(&lensflow_core::pipeline::substitute(pipeline.sql_text(&lookup.sql), &prep.variables), &training_rows);
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
                        // The lookup's first column is the entity's key.
                        for r in 0..b.num_rows() {
                            let key = ScalarValue::try_from_array(b.column(0), r).map_err(|e| fail(format!("entity key: {e}")))?;
                            let mut h = rustc_hash::FxHasher::default();
                            key.hash(&mut h);
                            sample.push(h.finish(), cols.iter().map(|col| col.value(r)));
                        }
                    }
                }
                None => {
                    let sql = format!("SELECT {} FROM features WHERE {} ORDER BY {}", c.profile.join(", "), prep.train_filter, prep.order_by);
                    let mut stream = engine.stream(what, &sql).await?;
                    while let Some(b) = stream.next().await.transpose().map_err(engine_err(what))? {
                        for r in 0..b.num_rows() {
                            // Rows come in the ORDER BY's order: the position identifies one.
                            let position = sample.seen;
                            sample.push(position, (0..b.num_columns()).map(|col| number(&b, col, r).unwrap_or(0.0)));
                        }
                    }
                }
            }
            Ok(sample)
        })
        .await?;
    let (x, seen) = sample.finish();
    if x.nrows() < c.k * 2 {
        return Err(fail(format!("{} entities are too few for {} segments", x.nrows(), c.k)));
    }
    if seen > x.nrows() as u64 {
        tracing::info!(round, entities = seen, sample = x.nrows(), "segments fitted on a sample of the entities");
    }
    let mean = x.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(d));
    let scale = x.std_axis(Axis(0), 0.0).mapv(|s| if s > 1e-12 { s } else { 1.0 });
    let z = (&x - &mean) / &scale;
    let model =
        KMeans::params(c.k).max_n_iterations(300).tolerance(1e-8).n_runs(1).fit(&DatasetBase::from(z.clone())).map_err(|e| fail(format!("k-means: {e}")))?;
    let labels = model.predict(&z);
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
    Ok((Segmentation { profile: c.profile.clone(), scaling, segments }, silhouette(&z, &labels, 1000)))
}

/// Most entities k-means is fitted on. Beyond it the trainer keeps a sample, so that its
/// memory does not grow with the lake (on a cluster it holds no other table whole).
const MAX_ENTITIES: usize = 10_000;

/// The entities' profiles k-means is fitted on: every one, in the query's order, up to
/// [`MAX_ENTITIES`]; beyond that the [`MAX_ENTITIES`] whose identities hash lowest, in hash
/// order: a uniform sample that is the same whatever order the rows arrive in.
struct Sample {
    d: usize,
    hashes: Vec<u64>,
    values: Vec<f64>,
    /// Entities pushed so far.
    seen: u64,
}

impl Sample {
    fn new(d: usize) -> Sample {
        Sample { d, hashes: Vec::new(), values: Vec::new(), seen: 0 }
    }

    /// Adds an entity whose identity hashes to `identity` (mixed again here, so that a plain
    /// position or a weak hash samples uniformly too).
    fn push(&mut self, identity: u64, profile: impl Iterator<Item = f64>) {
        self.seen += 1;
        self.hashes.push(mix(identity));
        self.values.extend(profile);
        if self.hashes.len() >= 2 * MAX_ENTITIES {
            self.keep_lowest();
        }
    }

    fn keep_lowest(&mut self) {
        let mut order: Vec<usize> = (0..self.hashes.len()).collect();
        order.sort_unstable_by_key(|&i| self.hashes[i]);
        order.truncate(MAX_ENTITIES);
        self.values = order.iter().flat_map(|&i| self.values[i * self.d..(i + 1) * self.d].iter().copied()).collect();
        self.hashes = order.iter().map(|&i| self.hashes[i]).collect();
    }

    /// The profiles as rows, and how many entities there were in all.
    fn finish(mut self) -> (Array2<f64>, u64) {
        if self.hashes.len() > MAX_ENTITIES {
            self.keep_lowest();
        }
        let n = self.hashes.len();
        (Array2::from_shape_vec((n, self.d), self.values).unwrap_or_else(|_| Array2::zeros((0, self.d))), self.seen)
    }
}

/// splitmix64's finaliser: every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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

    #[test]
    fn entities_beyond_the_cap_are_a_sample_that_ignores_arrival_order() {
        // Up to the cap: every entity, in arrival order.
        let mut few = Sample::new(2);
        for i in 0..1000u64 {
            few.push(i, [i as f64, 1.0].into_iter());
        }
        let (x, seen) = few.finish();
        assert_eq!((x.nrows(), seen), (1000, 1000));
        assert!(x.column(0).iter().enumerate().all(|(i, v)| *v == i as f64));

        // Beyond it: the same MAX_ENTITIES entities, whichever order they come in.
        let n = (MAX_ENTITIES * 5 / 2) as u64;
        let forward = {
            let mut s = Sample::new(1);
            (0..n).for_each(|i| s.push(i, std::iter::once(i as f64)));
            s.finish()
        };
        let backward = {
            let mut s = Sample::new(1);
            (0..n).rev().for_each(|i| s.push(i, std::iter::once(i as f64)));
            s.finish()
        };
        assert_eq!((forward.0.nrows(), forward.1), (MAX_ENTITIES, n));
        assert_eq!(forward.0, backward.0);
        // Uniform: the sample's mean is near the population's ((n - 1) / 2).
        let mean = forward.0.column(0).mean().unwrap();
        assert!((mean / ((n - 1) as f64 / 2.0) - 1.0).abs() < 0.02, "sample mean {mean}");
    }
}
