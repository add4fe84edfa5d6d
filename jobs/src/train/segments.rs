//! Segments: k-means on the clustered entity's profile features, described in words from the
//! centroids.
//!
//! A lookup entity (MovieLens users) is profiled on its state over the training events: the
//! lookup's own SQL runs on the training rows, and the profile features' expressions (the same
//! ones serving evaluates) turn each entity's state into its profile. An `event` entity (a
//! smart-home device) is profiled on its own training row. Either way the table is
//! model-sized, so linfa clusters it here.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray::{Array1, Array2, Axis};

use lensflow_core::Pipeline;
use lensflow_core::model::{Scaling, Segment, Segmentation};
use lensflow_core::pipeline::definition::Clustering;
use lensflow_core::pipeline::expr::{self, FeatureExprs};

use super::Prepared;
use super::engine::{Engine, number};
use crate::{JobError, Result};

/// Fits the pipeline's segments on round `prep.round`'s training rows; returns them and the
/// mean silhouette.
pub async fn fit(engine: &Engine, pipeline: &Pipeline, prep: &Prepared) -> Result<(Segmentation, f64)> {
    let round = prep.round;
    let c = &pipeline.definition.models.clustering;
    let fail = |reason: String| JobError::Round { round, reason };
    let rows: Vec<Vec<f64>> = match pipeline.definition.lookups.iter().find(|l| l.name == c.entity) {
        Some(lookup) => {
            // The lookup's SQL reads `features`; here a CTE of that name holds the training rows.
            let sql = with_training_rows(&lensflow_core::pipeline::substitute(pipeline.sql_text(&lookup.sql), &prep.variables), &prep.train_filter);
            let batches = engine.query("segment profiles", &sql).await?;
            let Some(schema) = batches.first().map(|b| b.schema()) else {
                return Err(fail("no training entities to segment".into()));
            };
            let items = expr::final_select(pipeline.features_sql()).map_err(fail)?;
            let exprs = FeatureExprs::compile_named(&c.profile, &items, schema, &prep.variables).map_err(|(f, e)| fail(format!("profile feature {f}: {e}")))?;
            let mut rows = Vec::new();
            for b in &batches {
                let cols = exprs.evaluate(b).map_err(fail)?;
                rows.extend((0..b.num_rows()).map(|r| cols.iter().map(|col| col.value(r)).collect::<Vec<f64>>()));
            }
            rows
        }
        None => {
            let sql = format!("SELECT {} FROM features WHERE {} ORDER BY {}", c.profile.join(", "), prep.train_filter, prep.order_by);
            let mut rows = Vec::new();
            for b in engine.query("segment profiles", &sql).await? {
                rows.extend((0..b.num_rows()).map(|r| (0..b.num_columns()).map(|col| number(&b, col, r).unwrap_or(0.0)).collect::<Vec<f64>>()));
            }
            rows
        }
    };
    let d = c.profile.len();
    if rows.len() < c.k * 2 {
        return Err(fail(format!("{} entities are too few for {} segments", rows.len(), c.k)));
    }
    let x = Array2::from_shape_fn((rows.len(), d), |(i, j)| rows[i][j]);
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
        let size = labels.iter().filter(|l| **l == id).count() as u64;
        let description = describe(c, &centroid, &profile, &prep.variables).map_err(fail)?;
        segments.push(Segment { id, description, centroid, profile, size });
    }
    Ok((Segmentation { profile: c.profile.clone(), scaling, segments }, silhouette(&z, &labels, 1000)))
}

/// Puts the training rows in a CTE named `features` in front of `sql` (which reads `features`).
fn with_training_rows(sql: &str, train_filter: &str) -> String {
    let cte = format!("features AS (SELECT * FROM features_round WHERE {train_filter})");
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
    fn training_rows_go_in_front_of_any_query() {
        assert_eq!(with_training_rows("SELECT 1 FROM features", "x < 3"), "WITH features AS (SELECT * FROM features_round WHERE x < 3) SELECT 1 FROM features");
        assert_eq!(
            with_training_rows("  with a AS (SELECT 1) SELECT * FROM a", "x < 3"),
            "WITH features AS (SELECT * FROM features_round WHERE x < 3), a AS (SELECT 1) SELECT * FROM a"
        );
    }
}
