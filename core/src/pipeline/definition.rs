//! The pipeline definition file (`pipeline.toml`) as typed structs. Unknown keys are refused, so
//! a typo is an error that names the key, not a setting silently ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything `pipeline.toml` says, with the SQL files it names read in beside it. This is what
/// a round stores in its artifact, so serving needs nothing but the model store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// The pipeline's name: its folder in the lake and the model store, and its API routes.
    pub name: String,
    /// One line for people.
    #[serde(default)]
    pub description: String,
    /// The events.
    pub events: Events,
    /// The feature SQL and what its output means.
    pub features: Features,
    /// Per-entity state tables that serving looks a request's ids up in.
    #[serde(default)]
    pub lookups: Vec<Lookup>,
    /// What a prediction request carries.
    pub request: Request,
    /// Which events are held out for evaluation.
    #[serde(default)]
    pub holdout: Holdout,
    /// The three models.
    pub models: Models,
}

/// The event stream: columns, key, time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Events {
    /// The SQL table name of the events (and the folder of the lake's batch files).
    pub table: String,
    /// The Kafka topic [default: the pipeline's name].
    #[serde(default)]
    pub topic: Option<String>,
    /// The column whose value is the Kafka message key.
    pub key: String,
    /// The event-time column; without one, event time is the arrival order (Kafka offset).
    #[serde(default)]
    pub time: Option<String>,
    /// The columns, in CSV order.
    pub columns: Vec<Column>,
}

/// One event column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    /// Name in the lake and in SQL (snake_case, so Spark and DataFusion read it unquoted).
    pub name: String,
    /// Name in the CSV header, the Kafka payload and the API [default: `name`].
    #[serde(default)]
    pub wire: Option<String>,
    /// Its type.
    #[serde(rename = "type")]
    pub kind: ColumnType,
    /// Smallest value allowed (numbers).
    #[serde(default)]
    pub min: Option<f64>,
    /// Largest value allowed (numbers).
    #[serde(default)]
    pub max: Option<f64>,
    /// The value must be a whole multiple of this (numbers).
    #[serde(default)]
    pub step: Option<f64>,
    /// The values allowed (strings): a category's known values.
    #[serde(default)]
    pub values: Option<Vec<String>>,
    /// What the column means, for people and the API description.
    #[serde(default)]
    pub doc: String,
}

impl Column {
    /// The name on the wire.
    pub fn wire(&self) -> &str {
        self.wire.as_deref().unwrap_or(&self.name)
    }
}

/// The type of an event column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// A 64-bit integer.
    Int64,
    /// A 64-bit float.
    Float64,
    /// UTF-8 text.
    String,
}

/// The feature SQL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Features {
    /// The SQL file, relative to the definition (replaced by its text once loaded).
    pub sql: String,
    /// The model features, in coefficient order: columns of the SQL's final SELECT.
    pub names: Vec<String>,
    /// `${name}` constants.
    #[serde(default)]
    pub constants: BTreeMap<String, f64>,
    /// `${name}` figures computed per round: an SQL aggregate over the training events.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// What a what-if may set a feature to, `[low, high]`.
    #[serde(default)]
    pub ranges: BTreeMap<String, [f64; 2]>,
}

/// A lookup table: one row of state per entity, computed over all of a round's events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lookup {
    /// The entity's name (`user`): answers say `known_user`.
    pub name: String,
    /// The event column that identifies the entity; also the table's first column.
    pub key: String,
    /// The SQL over `features` (the feature SQL's output) giving the state columns.
    pub sql: String,
}

/// What a prediction request carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Event columns a request carries: lookup keys and raw columns.
    pub fields: Vec<String>,
    /// Fields a request may leave out, and their default: `newest` (the newest value the round
    /// saw) or a number.
    #[serde(default)]
    pub defaults: BTreeMap<String, FieldDefault>,
}

/// A request field's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldDefault {
    /// A fixed number.
    Number(f64),
    /// A word: `newest`.
    Word(String),
}

/// Which events are held out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holdout {
    /// The newest share of events (by event time, or by arrival within each partition).
    pub newest: f64,
}

impl Default for Holdout {
    fn default() -> Self {
        Holdout { newest: 0.2 }
    }
}

/// The three models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Models {
    /// Logistic regression of a 0/1 label.
    pub classification: Classification,
    /// Least squares of a number.
    pub regression: Regression,
    /// k-means segments of an entity.
    pub clustering: Clustering,
}

/// The classification model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Classification {
    /// A 0/1 column of the feature SQL's output.
    pub label: String,
    /// The question, for people.
    #[serde(default)]
    pub doc: String,
    /// The answer's field name for the 0/1 prediction.
    #[serde(default = "default_class_answer")]
    pub answer: String,
    /// The answer's field name for the probability.
    #[serde(default = "default_probability")]
    pub probability: String,
    /// The features it uses [default: all].
    #[serde(default)]
    pub features: Option<Vec<String>>,
    /// L2 penalty on the standardised coefficients (keeps separable data finite) [default 0].
    #[serde(default)]
    pub ridge: f64,
}

/// The regression model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Regression {
    /// A numeric column of the feature SQL's output.
    pub target: String,
    /// The question, for people.
    #[serde(default)]
    pub doc: String,
    /// The answer's field name.
    #[serde(default = "default_reg_answer")]
    pub answer: String,
    /// Predictions are clipped to `[low, high]`.
    #[serde(default)]
    pub clip: Option<[f64; 2]>,
    /// Predictions are rounded to this many decimals.
    #[serde(default)]
    pub decimals: Option<u32>,
    /// The features it uses [default: all].
    #[serde(default)]
    pub features: Option<Vec<String>>,
}

/// The clustering model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clustering {
    /// What is clustered: a lookup's name (its entities, on their training state), or `event`
    /// (each training event).
    pub entity: String,
    /// The features a segment is built on.
    pub profile: Vec<String>,
    /// Number of segments.
    #[serde(default = "default_k")]
    pub k: usize,
    /// The question, for people.
    #[serde(default)]
    pub doc: String,
    /// The answer's field name for the segment id.
    #[serde(default = "default_cluster_answer")]
    pub answer: String,
    /// Words for a segment, by how far its centroid lies from the average.
    #[serde(default)]
    pub words: Vec<Words>,
    /// An SQL expression over the profile features giving the figures behind the words.
    #[serde(default)]
    pub figures: Option<String>,
}

/// Words for one profile feature of a segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Words {
    /// The profile feature.
    pub feature: String,
    /// Said when the centroid is more than `threshold` standard deviations above the average.
    pub high: String,
    /// Said when it is more than `threshold` below.
    pub low: String,
    /// Said otherwise [default: nothing].
    #[serde(default)]
    pub mid: String,
    /// In standard deviations [default 0.5].
    #[serde(default = "default_threshold")]
    pub threshold: f64,
}

fn default_class_answer() -> String {
    "prediction".into()
}
fn default_probability() -> String {
    "probability".into()
}
fn default_reg_answer() -> String {
    "predicted".into()
}
fn default_cluster_answer() -> String {
    "cluster_id".into()
}
fn default_k() -> usize {
    4
}
fn default_threshold() -> f64 {
    0.5
}
