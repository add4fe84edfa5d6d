//! The prediction contract: what a client sends to the API, what it gets back, how errors look,
//! and what the API says about each pipeline it serves. The API, the web page and the tests all
//! use these types, so they cannot disagree.
//!
//! A pipeline's request and answer are JSON objects whose fields come from its definition:
//! a request carries the definition's request fields by wire name (`{"userId":1,"movieId":31}`
//! for MovieLens, `{"DeviceType":"Camera",…}` for smart-home) and optionally `features` to
//! override (a what-if); an answer echoes the fields given and adds each model's answer under the
//! name the definition gives it (`prediction_like`, `predicted_rating`, `cluster_id` for
//! MovieLens: the seed's Flask API names, so its clients keep working), plus [`ROUND`],
//! `known_<lookup>` per lookup, [`SEGMENT`] and [`FEATURES`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::lake::OffsetRange;
use crate::model::{Lineage, RoundMetrics, Segment};

/// The request key holding feature overrides (a what-if).
pub const FEATURES: &str = "features";
/// The answer key naming the round that answered.
pub const ROUND: &str = "round";
/// The answer key holding the segment's description.
pub const SEGMENT: &str = "segment";

/// The answer key saying whether a lookup knew the request's key (`known_user`).
pub fn known_field(lookup: &str) -> String {
    format!("known_{lookup}")
}

/// One question: request fields by wire name, optionally with feature values to override.
/// Serving reads the fields its pipeline's definition declares and ignores others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PredictRequest {
    /// Feature values that replace those built from the fields, by feature name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<BTreeMap<String, f64>>,
    /// The request fields, by wire name (`userId`, `DeviceType`, …).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub fields: BTreeMap<String, Value>,
}

/// The answer to one request: the fields given, echoed; each model's answer asked for, under
/// the definition's names; `known_<lookup>` per lookup; the round and the features used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Prediction {
    /// The training round whose models answered.
    pub round: u64,
    /// The feature values the models saw, by name (features whose inputs were missing and
    /// that no model needed are left out).
    pub features: BTreeMap<String, f64>,
    /// Everything else: echoed request fields, answers, `segment`, `known_<lookup>`.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub fields: BTreeMap<String, Value>,
}

impl Prediction {
    /// A field of the answer as a number.
    pub fn number(&self, field: &str) -> Option<f64> {
        self.fields.get(field).and_then(Value::as_f64)
    }
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
    /// Its folder in the pipeline's model store.
    pub path: String,
    /// When the trainer wrote it (unix milliseconds).
    pub created_at_ms: i64,
    /// Its hold-out metrics.
    pub metrics: RoundMetrics,
}

/// One field a request may carry, described for forms and clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RequestField {
    /// The event column's name (also accepted in requests).
    pub name: String,
    /// Its name in requests and answers.
    pub wire: String,
    /// `int64`, `float64` or `string`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Smallest value allowed (numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest value allowed (numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Values must be whole multiples of this (numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<f64>,
    /// The known values of a category (strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// What the field is when a request leaves it out, if it has a default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<f64>,
    /// What the field means.
    pub doc: String,
    /// The lookup this field is the key of, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup: Option<String>,
    /// For a lookup key: some keys the round knows (the most active first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    // Keys are numbers or strings, as the key column is: any JSON value, not an object.
    #[schema(value_type = Vec<Value>)]
    pub suggestions: Vec<Value>,
}

/// A model feature, with what a what-if may set it to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FeatureInfo {
    /// The feature's name.
    pub name: String,
    /// `[low, high]` a what-if may set it to, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<[f64; 2]>,
}

/// A lookup table of the round served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LookupSummary {
    /// The lookup's name (answers say `known_<name>`).
    pub name: String,
    /// The request field (event column) it is keyed by.
    pub key: String,
    /// Entities in it.
    pub rows: u64,
}

/// One of the three models, described for people and forms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskInfo {
    /// The question it answers.
    pub doc: String,
    /// The answer field (0/1, the number, or the segment id).
    pub answer: String,
    /// The probability's answer field (classification only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<String>,
    /// What it predicts: the label, the target, or the clustered entity.
    pub target: String,
    /// The features it needs.
    pub features: Vec<String>,
    /// Its answers are clipped to `[low, high]` (regression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<[f64; 2]>,
}

/// The three models of a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TasksInfo {
    /// Logistic regression of a 0/1 label.
    pub classification: TaskInfo,
    /// Least squares of a number.
    pub regression: TaskInfo,
    /// k-means segments.
    pub clustering: TaskInfo,
}

/// The round being served, in detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServingRound {
    /// Round number, folder, write time and metrics.
    #[serde(flatten)]
    pub summary: RoundSummary,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline in one line.
    pub description: String,
    /// SHA-256 of its `model.json`, as `LATEST` names it.
    pub model_sha256: String,
    /// When this server loaded it (unix milliseconds).
    pub loaded_at_ms: i64,
    /// What it was trained on.
    pub lineage: Lineage,
    /// The fields a request may carry, in the definition's order.
    pub request: Vec<RequestField>,
    /// The model features, in the models' order.
    pub features: Vec<FeatureInfo>,
    /// The lookup tables.
    pub lookups: Vec<LookupSummary>,
    /// The three models.
    pub models: TasksInfo,
    /// The segments of the clustered entity.
    pub segments: Vec<Segment>,
}

/// `GET /models`: the round being served and every round in the store up to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelsResponse {
    /// The round answering predictions.
    pub serving: ServingRound,
    /// All rounds up to the served one, oldest first.
    pub rounds: Vec<RoundSummary>,
}

/// `GET /status`: how far a pipeline has got.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PipelineStatus {
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline's lake URL.
    pub lake: String,
    /// Committed batches.
    pub batches: u64,
    /// Events landed.
    pub events: u64,
    /// Messages dead-lettered.
    pub dead_letters: u64,
    /// Offsets landed per Kafka partition.
    // JSON keys are strings ("0"), whatever the map's key type in Rust.
    #[schema(value_type = BTreeMap<String, OffsetRange>)]
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
    /// Why the lake could not be read just now; the lake's counts are then those of the last
    /// read that worked (zero if none has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lake_error: Option<String>,
}

/// One pipeline the server found in its model store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PipelineSummary {
    /// The pipeline's name: its folder in the model store and its routes' `/pipelines/{name}`.
    pub name: String,
    /// The pipeline in one line (empty until a round is loaded).
    pub description: String,
    /// The round served, if one is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    /// Whether the seed routes (`/predict`, `/models`, `/status`) answer for it.
    pub default: bool,
}

/// `GET /pipelines`: every pipeline in the model store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PipelinesResponse {
    /// The pipeline the seed routes answer for.
    pub default: String,
    /// The pipelines, by name.
    pub pipelines: Vec<PipelineSummary>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_objects_of_named_fields() {
        let req: PredictRequest = serde_json::from_str(r#"{"userId":1,"movieId":31,"features":{"u_mean":4.0}}"#).unwrap();
        assert_eq!(req.fields["userId"], 1);
        assert_eq!(req.features, Some(BTreeMap::from([("u_mean".to_string(), 4.0)])));
        let answer: Prediction = serde_json::from_str(r#"{"userId":1,"round":3,"predicted_rating":3.5,"known_user":true,"features":{"u_mean":4.0}}"#).unwrap();
        assert_eq!((answer.round, answer.number("predicted_rating")), (3, Some(3.5)));
        assert_eq!(answer.fields[&known_field("user")], true);
        let back = serde_json::to_value(&answer).unwrap();
        assert_eq!(back["userId"], 1);
    }
}
