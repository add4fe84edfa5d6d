//! The model artifact: what a training round leaves in the model store and the API loads.
//!
//! ```text
//! <models>/<pipeline>/round-000003/model.json          the three models, scaling, metrics, lineage,
//!                                                      the pipeline definition, checksums
//! <models>/<pipeline>/round-000003/lookup-<name>.parquet  each lookup table "now"
//! <models>/<pipeline>/LATEST                           {"round":3,"path":"round-000003","model_sha256":…}, written last
//! ```
//!
//! A round carries the whole pipeline definition it was trained with (SQL included), so the
//! API builds a request's features from the same SQL expressions training used, for any
//! pipeline it finds in the store, and refuses an artifact whose format it does not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lake::OffsetRange;
use crate::pipeline::Pipeline;

/// The version of the artifact format this crate writes and reads.
pub const ARTIFACT_FORMAT_VERSION: u32 = 2;
/// Name of the pointer file to the newest complete round.
pub const LATEST: &str = "LATEST";
/// The model file inside a round folder.
pub const MODEL_FILE: &str = "model.json";

/// Folder name of round `n`.
pub fn round_dir(round: u64) -> String {
    format!("round-{round:06}")
}

/// File name of a lookup table inside a round folder.
pub fn lookup_file(name: &str) -> String {
    format!("lookup-{name}.parquet")
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Bytes as lowercase hex (a digest as checksums are written).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Per-feature standardisation: `z = (x - mean) / scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaling {
    /// Mean of each feature on the training rows.
    pub mean: Vec<f64>,
    /// Standard deviation of each feature on the training rows (1 where it is 0).
    pub scale: Vec<f64>,
}

impl Scaling {
    /// Standardises one row.
    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        x.iter().zip(&self.mean).zip(&self.scale).map(|((x, m), s)| (x - m) / s).collect()
    }
}

/// A linear model on standardised features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearModel {
    /// Positions (in the pipeline's feature order) of the features it uses, in coefficient order.
    pub uses: Vec<usize>,
    /// Intercept.
    pub intercept: f64,
    /// One coefficient per feature it uses.
    pub coefficients: Vec<f64>,
}

impl LinearModel {
    /// The linear predictor for an already standardised row of all the pipeline's features.
    pub fn score(&self, z: &[f64]) -> f64 {
        self.intercept + self.coefficients.iter().zip(&self.uses).map(|(c, &i)| c * z.get(i).copied().unwrap_or(0.0)).sum::<f64>()
    }
}

/// A segment: a k-means centroid and what it means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Segment {
    /// Segment id (0-based).
    pub id: usize,
    /// Centroid in standardised profile space.
    pub centroid: Vec<f64>,
    /// Centroid in the features' own units (for people).
    pub profile: BTreeMap<String, f64>,
    /// Training entities in the segment.
    pub size: u64,
    /// The segment in words, e.g. "frequent raters who rate high".
    pub description: String,
}

/// The k-means segmentation of the clustered entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segmentation {
    /// The profile features, in centroid order.
    pub profile: Vec<String>,
    /// Standardisation of the profile features.
    pub scaling: Scaling,
    /// The segments.
    pub segments: Vec<Segment>,
}

impl Segmentation {
    /// The nearest segment to an entity's (unstandardised) profile features.
    pub fn assign(&self, x: &[f64]) -> Option<&Segment> {
        let z = self.scaling.apply(x);
        let dist = |s: &Segment| s.centroid.iter().zip(&z).map(|(c, z)| (c - z).powi(2)).sum::<f64>();
        self.segments.iter().min_by(|a, b| dist(a).total_cmp(&dist(b)))
    }
}

/// Hold-out metrics of a round, each beside its trivial baseline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RoundMetrics {
    /// Ratings the models were fitted on.
    pub train_rows: u64,
    /// Newest ratings held out for evaluation.
    pub test_rows: u64,
    /// Regression RMSE on the hold-out.
    pub rmse: f64,
    /// Regression MAE on the hold-out.
    pub mae: f64,
    /// RMSE of always predicting the training mean.
    pub rmse_baseline: f64,
    /// Classification ROC AUC on the hold-out.
    pub auc: f64,
    /// Classification accuracy at threshold 0.5.
    pub accuracy: f64,
    /// Accuracy of always predicting the training majority class.
    pub accuracy_baseline: f64,
    /// Regression R² on the hold-out against the training mean: 0 is no better than the
    /// baseline, below 0 is worse.
    #[serde(default)]
    pub r2: f64,
    /// Classification AUC of a constant score (the baseline).
    #[serde(default = "half")]
    pub auc_baseline: f64,
    /// Mean silhouette of the segments (on a sample of training entities; 0 is no structure).
    pub silhouette: f64,
}

fn half() -> f64 {
    0.5
}

/// Which lake content a round was trained on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lineage {
    /// Batch numbers used (1..=round).
    pub batches: Vec<u64>,
    /// Offsets covered per partition, over all those batches.
    // JSON keys are strings ("0"), whatever the map's key type in Rust.
    #[schema(value_type = BTreeMap<String, OffsetRange>)]
    pub partitions: BTreeMap<i32, OffsetRange>,
    /// Events in those batches.
    pub rows: u64,
    /// The lake's URL.
    pub lake: String,
    /// The first batch the models were fitted on, when `train --window` left older batches
    /// out of fitting (their events still shaped every feature and lookup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_from: Option<u64>,
}

/// One lookup table of a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LookupTable {
    /// The lookup's name in the definition.
    pub name: String,
    /// Its file in the round folder.
    pub file: String,
    /// Entities in it.
    pub rows: u64,
}

/// Everything a round produced, as stored in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelArtifact {
    /// [`ARTIFACT_FORMAT_VERSION`].
    pub format_version: u32,
    /// The pipeline the round was trained with, SQL included.
    pub pipeline: Pipeline,
    /// The pipeline's [`Pipeline::fingerprint`] at training time.
    pub fingerprint: String,
    /// The round number (= number of batches used).
    pub round: u64,
    /// When it was written (unix milliseconds).
    pub created_at_ms: i64,
    /// Feature names in coefficient order.
    pub features: Vec<String>,
    /// The `${…}` values the round's SQL ran with (constants and per-round variables).
    pub variables: BTreeMap<String, f64>,
    /// What request fields left out default to (`newest` resolved to a value).
    pub defaults: BTreeMap<String, f64>,
    /// Standardisation of the features.
    pub scaling: Scaling,
    /// Regression of the pipeline's target.
    pub regression: LinearModel,
    /// Classification of the pipeline's label (logistic: probability = sigmoid(score)).
    pub classification: LinearModel,
    /// Segments of the clustered entity.
    pub segmentation: Segmentation,
    /// Hold-out metrics.
    pub metrics: RoundMetrics,
    /// What it was trained on.
    pub lineage: Lineage,
    /// The lookup tables, in the definition's order.
    pub lookups: Vec<LookupTable>,
    /// SHA-256 of each other file in the round folder.
    pub checksums: BTreeMap<String, String>,
}

/// The content of `LATEST`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatestPointer {
    /// The newest complete round.
    pub round: u64,
    /// Its folder, relative to the model store.
    pub path: String,
    /// SHA-256 of its `model.json`.
    pub model_sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_segment_is_assigned() {
        let seg = |id, c: f64| Segment { id, centroid: vec![c], profile: BTreeMap::new(), size: 1, description: String::new() };
        let s = Segmentation { profile: vec!["x".into()], scaling: Scaling { mean: vec![10.0], scale: vec![2.0] }, segments: vec![seg(0, -1.0), seg(1, 1.0)] };
        assert_eq!(s.assign(&[8.5]).map(|s| s.id), Some(0));
        assert_eq!(s.assign(&[11.5]).map(|s| s.id), Some(1));
        assert_eq!(round_dir(3), "round-000003");
        assert_eq!(lookup_file("user"), "lookup-user.parquet");
    }
}
