//! The model artifact: what a training round leaves in the model store and the API loads.
//!
//! ```text
//! <models>/round-000003/model.json     the three models, scaling, metrics, lineage, checksums
//! <models>/round-000003/users.parquet   per-user statistics "now" (lookup table)
//! <models>/round-000003/movies.parquet  per-movie statistics "now" (lookup table)
//! <models>/LATEST                       {"round":3,"path":"round-000003","model_sha256":…}, written last
//! ```
//!
//! The feature list and the function that turns statistics into a feature row live here, so
//! the trainer (whose SQL computes the same formulas) and the API cannot drift apart: the
//! trainer checks its SQL output against [`feature_row`], and the API refuses an artifact whose
//! format version or feature fingerprint it does not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lake::OffsetRange;

/// The version of the artifact format this crate writes and reads.
pub const ARTIFACT_FORMAT_VERSION: u32 = 1;
/// Name of the pointer file to the newest complete round.
pub const LATEST: &str = "LATEST";
/// The model file inside a round folder.
pub const MODEL_FILE: &str = "model.json";
/// The per-user lookup table inside a round folder.
pub const USERS_FILE: &str = "users.parquet";
/// The per-movie lookup table inside a round folder.
pub const MOVIES_FILE: &str = "movies.parquet";

/// Weight of the prior in every shrunk statistic: a user with `n` earlier ratings gets
/// `(sum + K·prior) / (n + K)`.
pub const SHRINK: f64 = 5.0;
const DAY: f64 = 86_400.0;

/// The model features, in the order every model's coefficients use.
pub const FEATURES: [&str; 12] = [
    "u_log_n",
    "u_mean",
    "u_sd",
    "u_liked",
    "u_bias",
    "u_recency",
    "m_log_n",
    "m_mean",
    "m_sd",
    "m_liked",
    "m_bias",
    "m_age",
];

/// The features the user segments are built on (a subset of a user's statistics).
pub const SEGMENT_FEATURES: [&str; 4] = ["u_log_n", "u_mean", "u_sd", "u_liked"];

/// The values a feature can take (inclusive), for checking what-if inputs: means lie within the
/// rating scale, shares within 0..1, logs of counts and days are non-negative.
pub fn feature_range(name: &str) -> Option<(f64, f64)> {
    Some(match name {
        "u_log_n" | "m_log_n" | "u_recency" | "m_age" => (0.0, 30.0),
        "u_mean" | "m_mean" => (0.5, 5.0),
        "u_sd" | "m_sd" => (0.0, 4.5),
        "u_liked" | "m_liked" => (0.0, 1.0),
        "u_bias" | "m_bias" => (-4.5, 4.5),
        _ => return None,
    })
}

/// Folder name of round `n`.
pub fn round_dir(round: u64) -> String {
    format!("round-{round:06}")
}

/// A fingerprint of the feature list and formulas: changes whenever either does.
pub fn feature_fingerprint() -> String {
    sha256_hex(
        format!(
            "v{ARTIFACT_FORMAT_VERSION}:shrink={SHRINK}:{}",
            FEATURES.join(",")
        )
        .as_bytes(),
    )
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What every shrunk statistic shrinks towards: the training ratings' global figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Priors {
    /// Mean rating.
    pub mean: f64,
    /// Variance of the ratings.
    pub var: f64,
    /// Share of ratings that are "liked".
    pub liked: f64,
}

/// Running statistics of one user or one movie over some set of ratings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SideStats {
    /// Number of ratings.
    pub n: f64,
    /// Sum of ratings.
    pub sum: f64,
    /// Sum of squared ratings.
    pub sumsq: f64,
    /// Number of liked ratings.
    pub liked: f64,
    /// Sum of residuals against the other side's mean at each rating's time.
    pub resid: f64,
    /// For a user: time of the latest rating; for a movie: time of the first. Unix seconds.
    pub ts: f64,
}

impl SideStats {
    fn shrunk(&self, total: f64, prior: f64) -> f64 {
        (total + SHRINK * prior) / (self.n + SHRINK)
    }

    fn sd(&self, p: &Priors) -> f64 {
        let m2 = if self.n > 0.0 {
            (self.sumsq - self.sum * self.sum / self.n).max(0.0)
        } else {
            0.0
        };
        ((m2 + SHRINK * p.var) / (self.n + SHRINK)).sqrt()
    }

    fn days_since(&self, now: f64) -> f64 {
        if self.n > 0.0 {
            (1.0 + ((now - self.ts) / DAY).max(0.0)).ln()
        } else {
            0.0
        }
    }

    /// Features of this side: log count, shrunk mean, shrunk spread, shrunk liked share, bias,
    /// and days (log) since the user's last / the movie's first rating.
    fn features(&self, p: &Priors, now: f64) -> [f64; 6] {
        [
            (1.0 + self.n).ln(),
            self.shrunk(self.sum, p.mean),
            self.sd(p),
            self.shrunk(self.liked, p.liked),
            self.resid / (self.n + SHRINK),
            self.days_since(now),
        ]
    }
}

/// A user's [`SEGMENT_FEATURES`]: the first four of its side of the feature row.
pub fn segment_features(user: &SideStats, priors: &Priors) -> [f64; 4] {
    let f = user.features(priors, user.ts);
    [f[0], f[1], f[2], f[3]]
}

/// The feature row of a (user, movie) pair at time `now`, in [`FEATURES`] order. An unknown user
/// or movie has all-zero statistics, which gives the priors.
pub fn feature_row(user: &SideStats, movie: &SideStats, priors: &Priors, now: f64) -> [f64; 12] {
    let (u, m) = (user.features(priors, now), movie.features(priors, now));
    std::array::from_fn(|i| if i < 6 { u[i] } else { m[i - 6] })
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
        x.iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .map(|((x, m), s)| (x - m) / s)
            .collect()
    }
}

/// A linear model on standardised features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearModel {
    /// Intercept.
    pub intercept: f64,
    /// One coefficient per feature, in [`FEATURES`] order.
    pub coefficients: Vec<f64>,
}

impl LinearModel {
    /// The linear predictor for an already standardised row.
    pub fn score(&self, z: &[f64]) -> f64 {
        self.intercept
            + self
                .coefficients
                .iter()
                .zip(z)
                .map(|(c, z)| c * z)
                .sum::<f64>()
    }
}

/// A user segment: a k-means centroid and what it means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Segment {
    /// Segment id (0-based).
    pub id: usize,
    /// Centroid in standardised [`SEGMENT_FEATURES`] space.
    pub centroid: Vec<f64>,
    /// Centroid in the features' own units (for people).
    pub profile: BTreeMap<String, f64>,
    /// Training users in the segment.
    pub size: u64,
    /// The segment in words, e.g. "frequent raters who rate high".
    pub description: String,
}

/// The k-means segmentation of users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segmentation {
    /// Standardisation of [`SEGMENT_FEATURES`].
    pub scaling: Scaling,
    /// The segments.
    pub segments: Vec<Segment>,
}

impl Segmentation {
    /// The nearest segment to a user's (unstandardised) segment features.
    pub fn assign(&self, x: &[f64]) -> Option<&Segment> {
        let z = self.scaling.apply(x);
        let dist = |s: &Segment| {
            s.centroid
                .iter()
                .zip(&z)
                .map(|(c, z)| (c - z).powi(2))
                .sum::<f64>()
        };
        self.segments
            .iter()
            .min_by(|a, b| dist(a).total_cmp(&dist(b)))
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
    /// Mean silhouette of the user segments (on a sample of users).
    pub silhouette: f64,
}

/// Which lake content a round was trained on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lineage {
    /// Batch numbers used (1..=round).
    pub batches: Vec<u64>,
    /// Offsets covered per partition, over all those batches.
    pub partitions: BTreeMap<i32, OffsetRange>,
    /// Ratings in those batches.
    pub rows: u64,
    /// The lake's URL.
    pub lake: String,
}

/// Everything a round produced, as stored in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelArtifact {
    /// [`ARTIFACT_FORMAT_VERSION`].
    pub format_version: u32,
    /// [`feature_fingerprint`] of the trainer that wrote it.
    pub feature_fingerprint: String,
    /// The round number (= number of batches used).
    pub round: u64,
    /// When it was written (unix milliseconds).
    pub created_at_ms: i64,
    /// Feature names in coefficient order.
    pub features: Vec<String>,
    /// Priors of the shrunk statistics.
    pub priors: Priors,
    /// Standardisation of [`FEATURES`].
    pub scaling: Scaling,
    /// Rating regression (prediction clipped to 0.5..5.0).
    pub regression: LinearModel,
    /// Liked classification (logistic: probability = sigmoid(score)).
    pub classification: LinearModel,
    /// User segments.
    pub segmentation: Segmentation,
    /// Hold-out metrics.
    pub metrics: RoundMetrics,
    /// What it was trained on.
    pub lineage: Lineage,
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

    const P: Priors = Priors {
        mean: 3.5,
        var: 1.0,
        liked: 0.5,
    };

    #[test]
    fn an_unknown_user_and_movie_get_the_priors() {
        let row = feature_row(&SideStats::default(), &SideStats::default(), &P, 1e9);
        assert_eq!(
            row,
            [0.0, 3.5, 1.0, 0.5, 0.0, 0.0, 0.0, 3.5, 1.0, 0.5, 0.0, 0.0]
        );
    }

    #[test]
    fn statistics_are_shrunk_towards_the_priors() {
        let user = SideStats {
            n: 5.0,
            sum: 25.0,
            sumsq: 125.0,
            liked: 5.0,
            resid: 5.0,
            ts: 0.0,
        };
        let row = feature_row(&user, &SideStats::default(), &P, 86_400.0);
        assert!(
            (row[1] - 4.25).abs() < 1e-12,
            "mean halfway between 5.0 and 3.5: {}",
            row[1]
        );
        assert!(
            (row[2] - 0.5f64.sqrt()).abs() < 1e-12,
            "no spread of its own: half the prior variance"
        );
        assert!((row[3] - 0.75).abs() < 1e-12);
        assert!((row[4] - 0.5).abs() < 1e-12);
        assert!(
            (row[5] - 2f64.ln()).abs() < 1e-12,
            "one day since the last rating"
        );
    }

    #[test]
    fn the_fingerprint_follows_the_feature_list() {
        assert_eq!(feature_fingerprint(), feature_fingerprint());
        assert_eq!(feature_fingerprint().len(), 64);
    }
}
