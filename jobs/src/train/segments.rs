//! User segments: k-means on each user's training statistics (activity, mean, spread, liked
//! share), described in words from the centroids.
//!
//! The per-user statistics are one aggregate query on the cluster; the table it returns has a
//! row per user (model-sized: it grows with users, not ratings) and linfa clusters it here.

use std::collections::BTreeMap;

use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray::{Array1, Array2, Axis};

use lensflow_core::model::{segment_features, Priors, Scaling, Segment, Segmentation, SideStats, SEGMENT_FEATURES};

use super::engine::{number, Engine};
use crate::{JobError, Result};

/// Fits `k` segments on the users of round `round`'s training rows; returns them and the mean
/// silhouette.
pub async fn fit(engine: &Engine, round: u64, train_filter: &str, priors: &Priors, k: usize) -> Result<(Segmentation, f64)> {
    let sql = format!(
        "SELECT user_id, CAST(COUNT(rating) AS DOUBLE), SUM(rating), SUM(rating * rating), SUM(liked) \
         FROM features WHERE {train_filter} GROUP BY user_id ORDER BY user_id"
    );
    let mut rows: Vec<[f64; 4]> = Vec::new();
    for b in engine.query("user segment statistics", &sql).await? {
        for r in 0..b.num_rows() {
            let v = |c| number(&b, c, r).unwrap_or(0.0);
            let stats = SideStats { n: v(1), sum: v(2), sumsq: v(3), liked: v(4), resid: 0.0, ts: 0.0 };
            rows.push(segment_features(&stats, priors));
        }
    }
    if rows.len() < k * 2 {
        return Err(JobError::Round { round, reason: format!("{} users are too few for {k} segments", rows.len()) });
    }
    let x = Array2::from_shape_fn((rows.len(), 4), |(i, j)| rows[i][j]);
    let mean = x.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(4));
    let scale = x.std_axis(Axis(0), 0.0).mapv(|s| if s > 1e-12 { s } else { 1.0 });
    let z = (&x - &mean) / &scale;
    let model = KMeans::params(k)
        .max_n_iterations(300)
        .tolerance(1e-8)
        .n_runs(1)
        .fit(&DatasetBase::from(z.clone()))
        .map_err(|e| JobError::Round { round, reason: format!("k-means: {e}") })?;
    let labels = model.predict(&z);
    let scaling = Scaling { mean: mean.to_vec(), scale: scale.to_vec() };
    let segments = (0..k)
        .map(|id| {
            let centroid = model.centroids().row(id).to_vec();
            let profile: BTreeMap<String, f64> =
                SEGMENT_FEATURES.iter().enumerate().map(|(j, f)| (f.to_string(), centroid[j] * scale[j] + mean[j])).collect();
            let size = labels.iter().filter(|l| **l == id).count() as u64;
            Segment { id, description: describe(&centroid, &profile), centroid, profile, size }
        })
        .collect();
    Ok((Segmentation { scaling, segments }, silhouette(&z, &labels, 1000)))
}

/// Words for a centroid: how active, how high, how varied, with the figures behind them.
fn describe(z: &[f64], profile: &BTreeMap<String, f64>) -> String {
    let activity = if z[0] > 0.5 { "frequent raters" } else if z[0] < -0.5 { "occasional raters" } else { "regular raters" };
    let level = if z[1] > 0.5 { "who rate high" } else if z[1] < -0.5 { "who rate low" } else { "who rate near the average" };
    let spread = if z[2] > 0.7 { ", with widely varied ratings" } else if z[2] < -0.7 { ", consistently" } else { "" };
    let n = profile.get("u_log_n").map(|l| l.exp() - 1.0).unwrap_or(0.0);
    let mean = profile.get("u_mean").copied().unwrap_or(0.0);
    let liked = profile.get("u_liked").copied().unwrap_or(0.0);
    format!("{activity} {level}{spread} (about {n:.0} ratings, mean {mean:.2}, {:.0}% liked)", liked * 100.0)
}

/// Mean silhouette over the first `limit` users (ordered by id, so it is reproducible).
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
