//! The prediction contract: what a client sends to the API, what it gets back, and how errors
//! look. The API, the web page and the tests all use these types, so they cannot disagree.
//!
//! A client written for the seed's Flask API keeps working: it sent `{"userId":1,"movieId":31}`
//! (or an array of them) and read `prediction_like`, `predicted_rating` and `cluster_id`; those
//! names are all here, beside the probability, the segment's description and the round.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::lake::OffsetRange;
use crate::model::{Lineage, Priors, RoundMetrics, Segment};

/// One question: a (user, movie) pair by id, optionally with feature values to override
/// (a what-if), or with every feature given and no ids at all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PredictRequest {
    /// The user's id; unknown users get the priors.
    #[serde(
        rename = "userId",
        alias = "user_id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub user_id: Option<i64>,
    /// The movie's id; unknown movies get the priors.
    #[serde(
        rename = "movieId",
        alias = "movie_id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub movie_id: Option<i64>,
    /// When the rating would happen (unix seconds) [default: the newest rating the round saw].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<f64>,
    /// Feature values that replace those built from the ids, by feature name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<BTreeMap<String, f64>>,
}

/// The answer to one [`PredictRequest`]: the input echoed, then each model's answer (only the
/// ones the endpoint asked for).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Prediction {
    /// The user's id, as asked.
    #[serde(rename = "userId", default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
    /// The movie's id, as asked.
    #[serde(rename = "movieId", default, skip_serializing_if = "Option::is_none")]
    pub movie_id: Option<i64>,
    /// The training round whose models answered.
    pub round: u64,
    /// Whether the round has ratings of this user (otherwise the priors stood in).
    pub known_user: bool,
    /// Whether the round has ratings of this movie (otherwise the priors stood in).
    pub known_movie: bool,
    /// Classification: probability that the user likes the movie (rates it 4 or more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability_like: Option<f64>,
    /// Classification: 1 if liked (probability ≥ 0.5), else 0 (the seed's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_like: Option<u8>,
    /// Regression: the predicted rating, 0.5..5, two decimals (the seed's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_rating: Option<f64>,
    /// Clustering: the user's segment (the seed's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<usize>,
    /// Clustering: the segment in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    /// The feature values the models saw, by name.
    pub features: BTreeMap<String, f64>,
}

/// One problem with a request: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// Where: a field (`userId`), a feature (`features.u_mean`), an array element (`[3].movieId`)
    /// or `body`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// The body of every 4xx and 5xx answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The first problem in words, with its field.
    pub error: String,
    /// The field of the first problem, if the problem has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every problem found (a batch may have several).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// A round in the model store, as listed by `GET /models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoundSummary {
    /// The round number (= batches it was trained on).
    pub round: u64,
    /// Its folder in the model store.
    pub path: String,
    /// When the trainer wrote it (unix milliseconds).
    pub created_at_ms: i64,
    /// Its hold-out metrics.
    pub metrics: RoundMetrics,
}

/// The round being served, in detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServingRound {
    /// Round number, folder, write time and metrics.
    #[serde(flatten)]
    pub summary: RoundSummary,
    /// SHA-256 of its `model.json`, as `LATEST` names it.
    pub model_sha256: String,
    /// When this server loaded it (unix milliseconds).
    pub loaded_at_ms: i64,
    /// What it was trained on.
    pub lineage: Lineage,
    /// Feature names, in the models' order.
    pub features: Vec<String>,
    /// What unknown users and movies get.
    pub priors: Priors,
    /// The user segments.
    pub segments: Vec<Segment>,
    /// Users in its lookup tables.
    pub users: u64,
    /// Movies in its lookup tables.
    pub movies: u64,
    /// Some known user ids (the most active), for suggestions.
    pub sample_users: Vec<i64>,
    /// Some known movie ids (the most rated), for suggestions.
    pub sample_movies: Vec<i64>,
    /// The time predictions default to: the newest rating the round saw (unix seconds).
    pub default_ts: f64,
}

/// `GET /models`: the round being served and every round in the store up to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelsResponse {
    /// The round answering predictions.
    pub serving: ServingRound,
    /// All rounds up to the served one, oldest first.
    pub rounds: Vec<RoundSummary>,
}

/// `GET /status`: how far the pipeline has got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PipelineStatus {
    /// The lake's URL.
    pub lake: String,
    /// Committed batches.
    pub batches: u64,
    /// Ratings landed.
    pub ratings: u64,
    /// Messages dead-lettered.
    pub dead_letters: u64,
    /// Offsets landed per Kafka partition.
    pub partitions: BTreeMap<i32, OffsetRange>,
    /// When the newest batch was committed (unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_batch_at_ms: Option<i64>,
    /// The round being served, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    /// When that round was written (unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_created_at_ms: Option<i64>,
    /// Batches landed that the served round does not include yet.
    pub batches_behind: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_request_and_snake_case_both_parse() {
        let seed: PredictRequest = serde_json::from_str(r#"{"userId":1,"movieId":31}"#).unwrap();
        let snake: PredictRequest = serde_json::from_str(r#"{"user_id":1,"movie_id":31}"#).unwrap();
        assert_eq!(seed, snake);
        assert_eq!(seed.user_id, Some(1));
        assert_eq!(seed.movie_id, Some(31));
    }

    #[test]
    fn an_answer_carries_the_seed_field_names() {
        let p = Prediction {
            user_id: Some(1),
            movie_id: Some(31),
            prediction_like: Some(1),
            predicted_rating: Some(3.5),
            cluster_id: Some(2),
            ..Default::default()
        };
        let v = serde_json::to_value(&p).unwrap();
        for key in [
            "userId",
            "movieId",
            "prediction_like",
            "predicted_rating",
            "cluster_id",
            "round",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert!(
            v.get("segment").is_none(),
            "answers skip what was not asked: {v}"
        );
    }
}
