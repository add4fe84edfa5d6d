//! A trained round of one pipeline, loaded for serving: the artifact checked against `LATEST`,
//! the lookup tables checked against the artifact, the pipeline's feature expressions compiled
//! once, and the function that answers a batch of requests with it.
//!
//! A request becomes one row of the pipeline's serving schema: its request fields (given, else
//! the round's default), then each lookup's state columns for the request's key (zeros for a key
//! the round does not know). A batch of requests is one [`RecordBatch`] of N rows, so the compiled
//! expressions (the feature SQL's own final SELECT, see [`FeatureExprs`]) run once per batch,
//! with no per-request planning. Nothing here knows any pipeline by name.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, SchemaRef};
use bytes::Bytes;
use datafusion::arrow::compute::{cast, concat, concat_batches, take};
use lensflow_core::model::{ARTIFACT_FORMAT_VERSION, LatestPointer, MODEL_FILE, ModelArtifact, Segment, sha256_hex};
use lensflow_core::pipeline::definition::{Column, ColumnType};
use lensflow_core::pipeline::event::{EventError, Value, kind, shown};
use lensflow_core::pipeline::expr::FeatureExprs;
use lensflow_core::predict::{
    FEATURES, FeatureInfo, FieldError, LookupSummary, ROUND, RequestField, RoundSummary, SEGMENT, ServingRound, TaskInfo, TasksInfo, known_field,
};
use lensflow_core::store::read_parquet;
use lensflow_core::{Lake, Pipeline};
use object_store::path::Path;
use rustc_hash::FxHashMap;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value as Json;

use crate::ApiError;

/// Which model(s) a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// The 0/1 label and its probability.
    Classification,
    /// The number.
    Regression,
    /// The entity's segment.
    Clustering,
    /// All three.
    All,
}

impl Task {
    /// The endpoint's name for metrics.
    pub fn name(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Regression => "regression",
            Task::Clustering => "clustering",
            Task::All => "all",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Suggestions listed by `GET /models` for each lookup key: this many of the most active keys.
const SUGGESTIONS: usize = 20;

/// One request field of the round: its column and what it defaults to.
#[derive(Debug)]
struct FieldPlan {
    column: Column,
    /// The wire name and the column name, when they differ (both are accepted).
    names: [String; 2],
    default: Option<Value>,
    /// What an absent field without a default stands at in the row. Only features that are
    /// then overridden or not needed read it, so any value of the right type will do; the
    /// column's minimum keeps integer divisions by it away from zero where the column allows.
    placeholder: Value,
}

/// A lookup table's keys: row numbers by key.
#[derive(Debug)]
enum KeyIndex {
    Int(FxHashMap<i64, u32>),
    Text(FxHashMap<String, u32>),
}

/// One lookup table, in memory.
#[derive(Debug)]
struct LookupPlan {
    name: String,
    known: String,
    /// The request field holding the key.
    field: usize,
    keys: KeyIndex,
    /// Entities in the table; row `rows` of every state column is the all-zero row unknown
    /// keys get.
    rows: u32,
    /// The state columns (every column but the key), each with the zero row appended.
    columns: Vec<ArrayRef>,
    suggestions: Vec<Json>,
}

/// A round ready to answer requests.
#[derive(Debug)]
pub struct LoadedRound {
    /// What `LATEST` said when it was loaded.
    pub pointer: LatestPointer,
    /// The artifact.
    pub artifact: ModelArtifact,
    /// When this server loaded it (unix milliseconds).
    pub loaded_at_ms: i64,
    /// Every round in the store up to this one, oldest first.
    pub history: Arc<Vec<RoundSummary>>,
    exprs: FeatureExprs,
    schema: SchemaRef,
    fields: Vec<FieldPlan>,
    lookups: Vec<LookupPlan>,
    /// Per feature that reads one lookup's state and, at most, request fields that have a
    /// default: its value for every row of the table (the zero row last) with those fields at
    /// their defaults, computed once at load.
    per_entity: Vec<Option<PerEntity>>,
    /// The features evaluated per request (those not computed per entity), in feature order:
    /// for every task but clustering, and for clustering (only its profile is shown).
    live: [Vec<usize>; 2],
    live_names: [Vec<String>; 2],
    /// Per serving column: whether a live feature reads it (others are filled cheaply).
    read_live: Vec<bool>,
    /// Per feature: the request fields it cannot be computed without.
    inputs: Vec<Vec<usize>>,
    /// Per task (by [`Task::index`]): the features it needs, in feature order.
    needs: [Vec<usize>; 4],
    /// The clustering profile's features, in centroid order.
    profile: Vec<usize>,
    ranges: Vec<Option<[f64; 2]>>,
    feature_index: FxHashMap<String, usize>,
}

/// A request field a task cannot do without (see [`LoadedRound::needed_fields`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NeededField {
    /// The field's wire name.
    pub name: String,
    /// The features that need it; a request that gives all of them may leave it out.
    pub stand_ins: Vec<String>,
}

/// A feature computed once per entity of a lookup, at load.
#[derive(Debug)]
struct PerEntity {
    lookup: usize,
    /// By row of the lookup table.
    values: Float64Array,
    /// The request fields it reads at their defaults: a request that gives one has the
    /// feature evaluated for it instead.
    defaulted: Vec<usize>,
}

/// One request, checked: a value per request field (`None`: not given) and the overrides.
#[derive(Debug)]
struct Item {
    values: Vec<Option<Value>>,
    overrides: Vec<(usize, f64)>,
}

/// The answer to one request; serialises straight to the answer object, naming its fields
/// after the round's definition.
#[derive(Debug)]
pub struct Answer<'a> {
    round: &'a LoadedRound,
    given: Vec<Option<Value>>,
    known: Vec<bool>,
    features: Vec<f64>,
    /// Which features to echo.
    shown: Vec<bool>,
    probability: Option<f64>,
    predicted: Option<f64>,
    segment: Option<&'a Segment>,
}

impl LoadedRound {
    /// Loads and checks the round `pointer` names in the pipeline store `store` (the folder
    /// `name` of the model store): `model.json` against the pointer's checksum, the format
    /// version, the pipeline's fingerprint and name, and the models' shapes; each lookup table
    /// against the artifact's checksum and the key's type; then compiles the feature
    /// expressions against the tables. Any failure refuses the round.
    pub async fn load(store: &Lake, name: &str, pointer: &LatestPointer) -> Result<LoadedRound, ApiError> {
        let bad = |path: &str, reason: String| ApiError::BadRound { round: pointer.round, path: store.url_of(path), reason };
        let model_path = format!("{}/{MODEL_FILE}", pointer.path);
        let bytes = fetch(store, &model_path, pointer.round).await?;
        let sum = sha256_hex(&bytes);
        if sum != pointer.model_sha256 {
            return Err(bad(&model_path, format!("SHA-256 is {sum}, LATEST says {}", pointer.model_sha256)));
        }
        let artifact: ModelArtifact = serde_json::from_slice(&bytes).map_err(|e| bad(&model_path, e.to_string()))?;
        check_artifact(&artifact, pointer, name).map_err(|reason| bad(&model_path, reason))?;
        let mut tables = Vec::with_capacity(artifact.lookups.len());
        for table in &artifact.lookups {
            let path = format!("{}/{}", pointer.path, table.file);
            let bytes = fetch(store, &path, pointer.round).await?;
            let expected = artifact.checksums.get(&table.file).ok_or_else(|| bad(&model_path, format!("no checksum for {}", table.file)))?;
            let sum = sha256_hex(&bytes);
            if &sum != expected {
                return Err(bad(&path, format!("SHA-256 is {sum}, model.json says {expected}")));
            }
            tables.push(read_table(bytes).map_err(|reason| bad(&path, reason))?);
        }
        LoadedRound::build(pointer.clone(), artifact, tables).map_err(|fault| match fault.file {
            Some(file) => bad(&format!("{}/{file}", pointer.path), fault.reason),
            None => bad(&model_path, fault.reason),
        })
    }

    /// Builds the round from its checked artifact and its lookup tables (one record batch each,
    /// in the definition's order).
    fn build(pointer: LatestPointer, artifact: ModelArtifact, tables: Vec<RecordBatch>) -> Result<LoadedRound, BuildFault> {
        let p = &artifact.pipeline;
        let d = &p.definition;
        let mut fields = Vec::with_capacity(d.request.fields.len());
        for name in &d.request.fields {
            let column = p.column(name).ok_or_else(|| format!("request field `{name}` is not an event column"))?.clone();
            let default = match artifact.defaults.get(name) {
                None if d.request.defaults.contains_key(name) => return Err(format!("defaults: no value for request field `{name}`").into()),
                None => None,
                Some(v) => Some(typed(&column, *v).ok_or_else(|| format!("defaults: {v} is not a value of `{name}`"))?),
            };
            let placeholder = match column.kind {
                ColumnType::Int64 => Value::Int(column.min.unwrap_or(0.0).max(1.0).min(column.max.unwrap_or(f64::MAX)) as i64),
                ColumnType::Float64 => Value::Float(column.min.unwrap_or(0.0)),
                ColumnType::String => Value::Text(column.values.as_ref().and_then(|v| v.first().cloned()).unwrap_or_default()),
            };
            fields.push(FieldPlan { names: [column.wire().to_string(), column.name.clone()], column, default, placeholder });
        }
        let field_of = |column: &str| fields.iter().position(|f| f.column.name == column);

        let mut lookups = Vec::with_capacity(tables.len());
        let mut schemas = Vec::with_capacity(tables.len());
        for (def, table) in d.lookups.iter().zip(tables) {
            let file = artifact.lookups.iter().find(|l| l.name == def.name).map(|l| l.file.clone());
            let field = field_of(&def.key).ok_or_else(|| format!("lookup `{}`: key `{}` is not a request field", def.name, def.key))?;
            // What is wrong with a table's content is the table file's fault, and named so.
            let (lookup, schema) = lookup_plan(def.name.clone(), field, &fields[field].column, table)
                .map_err(|reason| BuildFault { reason: format!("lookup `{}`: {reason}", def.name), file })?;
            lookups.push(lookup);
            schemas.push(schema);
        }
        let schema = p.serving_schema(&schemas);
        let exprs = FeatureExprs::compile(p, schema.clone(), &artifact.variables).map_err(|(feature, e)| format!("feature {feature}: {e}"))?;

        // Where each serving column comes from: a request field, or the lookup keyed by one.
        let mut source: FxHashMap<&str, usize> = FxHashMap::default();
        for (i, f) in fields.iter().enumerate() {
            source.insert(f.column.name.as_str(), i);
        }
        for (l, s) in lookups.iter().zip(&schemas) {
            for f in s.fields().iter().skip(1) {
                source.insert(f.name().as_str(), l.field);
            }
        }
        let n = artifact.features.len();
        let inputs: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                let set: BTreeSet<usize> =
                    exprs.columns_used(i).iter().filter_map(|c| source.get(c.as_str()).copied()).filter(|&f| fields[f].default.is_none()).collect();
                set.into_iter().collect()
            })
            .collect();
        let feature_index: FxHashMap<String, usize> = artifact.features.iter().enumerate().map(|(i, f)| (f.clone(), i)).collect();
        let profile: Vec<usize> = artifact.segmentation.profile.iter().filter_map(|f| feature_index.get(f).copied()).collect();
        let sorted = |v: &[usize]| -> Vec<usize> { v.iter().copied().collect::<BTreeSet<_>>().into_iter().collect() };
        let classification = sorted(&artifact.classification.uses);
        let regression = sorted(&artifact.regression.uses);
        let clustering = sorted(&profile);
        let all = sorted(&[classification.as_slice(), &regression, &clustering].concat());
        let ranges = artifact.features.iter().map(|f| d.features.ranges.get(f).copied()).collect();
        let (per_entity, live, read_live) = per_entity_features(&exprs, &schema, &fields, &lookups, &schemas, &profile);
        let live_names = live.clone().map(|l| l.iter().map(|&i| artifact.features[i].clone()).collect());

        Ok(LoadedRound {
            pointer,
            loaded_at_ms: lensflow_core::now_ms(),
            history: Arc::new(Vec::new()),
            exprs,
            schema,
            fields,
            lookups,
            per_entity,
            live,
            live_names,
            read_live,
            inputs,
            needs: [classification, regression, clustering, all],
            profile,
            ranges,
            feature_index,
            artifact,
        })
    }

    /// The round number.
    pub fn round(&self) -> u64 {
        self.artifact.round
    }

    /// The round's pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.artifact.pipeline
    }

    /// This round's line in the list of rounds.
    pub fn summary(&self) -> RoundSummary {
        summary(&self.artifact, &self.pointer.path)
    }

    /// The round in detail, for `GET /models`.
    pub fn describe(&self) -> ServingRound {
        let a = &self.artifact;
        let d = &a.pipeline.definition;
        let names = |v: &[usize]| v.iter().map(|&i| a.features[i].clone()).collect::<Vec<_>>();
        let m = &d.models;
        ServingRound {
            summary: self.summary(),
            pipeline: a.pipeline.name().to_string(),
            description: d.description.clone(),
            model_sha256: self.pointer.model_sha256.clone(),
            loaded_at_ms: self.loaded_at_ms,
            lineage: a.lineage.clone(),
            request: self
                .fields
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let c = &f.column;
                    let lookup = self.lookups.iter().find(|l| l.field == i);
                    RequestField {
                        name: c.name.clone(),
                        wire: c.wire().to_string(),
                        kind: match c.kind {
                            ColumnType::Int64 => "int64",
                            ColumnType::Float64 => "float64",
                            ColumnType::String => "string",
                        }
                        .into(),
                        min: c.min,
                        max: c.max,
                        step: c.step,
                        values: c.values.clone(),
                        default: f.default.as_ref().and_then(Value::as_f64),
                        doc: c.doc.clone(),
                        lookup: lookup.map(|l| l.name.clone()),
                        suggestions: lookup.map(|l| l.suggestions.clone()).unwrap_or_default(),
                    }
                })
                .collect(),
            features: a.features.iter().zip(&self.ranges).map(|(name, range)| FeatureInfo { name: name.clone(), range: *range }).collect(),
            lookups: self
                .lookups
                .iter()
                .map(|l| LookupSummary { name: l.name.clone(), key: self.fields[l.field].column.name.clone(), rows: u64::from(l.rows) })
                .collect(),
            models: TasksInfo {
                classification: TaskInfo {
                    doc: m.classification.doc.clone(),
                    answer: m.classification.answer.clone(),
                    probability: Some(m.classification.probability.clone()),
                    target: m.classification.label.clone(),
                    features: names(&self.needs[Task::Classification.index()]),
                    clip: None,
                },
                regression: TaskInfo {
                    doc: m.regression.doc.clone(),
                    answer: m.regression.answer.clone(),
                    probability: None,
                    target: m.regression.target.clone(),
                    features: names(&self.needs[Task::Regression.index()]),
                    clip: m.regression.clip,
                },
                clustering: TaskInfo {
                    doc: m.clustering.doc.clone(),
                    answer: m.clustering.answer.clone(),
                    probability: None,
                    target: m.clustering.entity.clone(),
                    features: a.segmentation.profile.clone(),
                    clip: None,
                },
            },
            segments: a.segmentation.segments.clone(),
        }
    }

    /// Answers a batch of requests (one JSON object each) in one evaluation of the feature
    /// expressions. `batch` says whether the body was an array, so errors name `[i].field`.
    /// Every problem in every request is reported, or none is answered.
    pub fn predict(&self, requests: &[Json], task: Task, batch: bool) -> Result<Vec<Answer<'_>>, ApiError> {
        let mut errors = Vec::new();
        let mut items = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            let at = if batch { format!("[{i}].") } else { String::new() };
            if let Some(item) = self.parse(request, task, &at, &mut errors) {
                items.push(item);
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::Invalid(errors));
        }
        // Each request's row in each lookup table (the zero row for an unknown or absent key).
        let rows: Vec<Vec<u32>> = self.lookups.iter().map(|l| items.iter().map(|item| l.find(self.key(item, l)).unwrap_or(l.rows)).collect()).collect();
        let which = usize::from(task == Task::Clustering);
        // Features computed per entity at a default a request overrides are evaluated for the
        // batch instead (rare: most requests leave those fields at their defaults).
        let given: Vec<usize> = (0..self.fields.len()).filter(|&f| items.iter().any(|item| item.values[f].is_some())).collect();
        let extra: Vec<usize> = self
            .per_entity
            .iter()
            .enumerate()
            .filter(|(i, p)| p.as_ref().is_some_and(|p| p.defaulted.iter().any(|f| given.contains(f))) && (which == 0 || self.profile.contains(i)))
            .map(|(i, _)| i)
            .collect();
        let (live, live_names): (std::borrow::Cow<'_, [usize]>, std::borrow::Cow<'_, [String]>) = if extra.is_empty() {
            (self.live[which].as_slice().into(), self.live_names[which].as_slice().into())
        } else {
            let mut live: Vec<usize> = self.live[which].iter().copied().chain(extra).collect();
            live.sort_unstable();
            let names = live.iter().map(|&i| self.artifact.features[i].clone()).collect::<Vec<_>>();
            (live.into(), names.into())
        };
        let values = if live.is_empty() {
            vec![]
        } else {
            let batch = self.row_batch(&items, &rows).map_err(|e| self.evaluate_error(e))?;
            self.exprs.evaluate_some(&batch, &live_names).map_err(|e| self.evaluate_error(e))?
        };
        let a = &self.artifact;
        let n = a.features.len();
        let needs = &self.needs[task.index()];
        let mut answers = Vec::with_capacity(items.len());
        for (r, item) in items.into_iter().enumerate() {
            let present = |f: usize| item.values[f].is_some() || self.fields[f].default.is_some();
            let mut features = vec![f64::NAN; n];
            let mut shown = Vec::with_capacity(n);
            for (i, slot) in self.per_entity.iter().enumerate() {
                if let Some(p) = slot {
                    let row = rows[p.lookup][r] as usize;
                    features[i] = if p.values.is_null(row) { f64::NAN } else { p.values.value(row) };
                }
                shown.push(self.inputs[i].iter().all(|&f| present(f)));
            }
            for (&i, column) in live.iter().zip(&values) {
                features[i] = if column.is_null(r) { f64::NAN } else { column.value(r) };
            }
            for &(i, v) in &item.overrides {
                features[i] = v;
                shown[i] = true;
            }
            if let Some(&i) = needs.iter().find(|&&i| !features[i].is_finite()) {
                let at = if batch { format!("[{r}].") } else { String::new() };
                errors.push(FieldError {
                    field: format!("{at}{FEATURES}.{}", a.features[i]),
                    message: format!("this request's fields give no number for it ({}); give it in `{FEATURES}`", features[i]),
                });
                continue;
            }
            if task == Task::Clustering {
                shown.iter_mut().enumerate().for_each(|(i, s)| *s &= self.profile.contains(&i));
            }
            let z = a.scaling.apply(&features);
            let mut answer = Answer {
                round: self,
                known: self.lookups.iter().zip(&rows).map(|(l, rows)| rows[r] < l.rows).collect(),
                given: item.values,
                features,
                shown,
                probability: None,
                predicted: None,
                segment: None,
            };
            if matches!(task, Task::Classification | Task::All) {
                answer.probability = Some(1.0 / (1.0 + (-a.classification.score(&z)).exp()));
            }
            if matches!(task, Task::Regression | Task::All) {
                let r = &a.pipeline.definition.models.regression;
                let mut y = a.regression.score(&z);
                if let Some([lo, hi]) = r.clip {
                    y = y.clamp(lo, hi);
                }
                if let Some(d) = r.decimals {
                    let scale = 10f64.powi(d.min(15) as i32);
                    y = (y * scale).round() / scale;
                }
                answer.predicted = Some(y);
            }
            if matches!(task, Task::Clustering | Task::All) {
                let x: Vec<f64> = self.profile.iter().map(|&i| answer.features[i]).collect();
                answer.segment = a.segmentation.assign(&x);
            }
            answers.push(answer);
        }
        if !errors.is_empty() {
            return Err(ApiError::Invalid(errors));
        }
        Ok(answers)
    }

    fn evaluate_error(&self, reason: String) -> ApiError {
        ApiError::Evaluate { pipeline: self.pipeline().name().to_string(), reason }
    }

    /// Checks one request: each field against its column, each override against its feature,
    /// and that every feature the task needs can be built or is given.
    fn parse(&self, request: &Json, task: Task, at: &str, errors: &mut Vec<FieldError>) -> Option<Item> {
        let before = errors.len();
        let mut err = |field: &str, message: String| errors.push(FieldError { field: format!("{at}{field}"), message });
        let Json::Object(map) = request else {
            let field = if at.is_empty() { "body".to_string() } else { at.trim_end_matches('.').to_string() };
            errors.push(FieldError { field, message: format!("expected an object of request fields ({}), got {}", self.wire_names(), kind(request)) });
            return None;
        };
        let mut values = Vec::with_capacity(self.fields.len());
        let mut invalid = Vec::new();
        for (i, f) in self.fields.iter().enumerate() {
            // By wire name, else by column name; an error names the key the client used.
            let given = f.names.iter().find_map(|k| map.get(k).filter(|v| !v.is_null()).map(|v| (k, v)));
            values.push(match given.map(|(k, v)| (k, f.column.parse(v))) {
                None => None,
                Some((_, Ok(v))) => Some(v),
                Some((key, Err(e))) => {
                    err(key, field_message(&e));
                    invalid.push(i);
                    None
                }
            });
        }
        let mut overrides = Vec::new();
        match map.get(FEATURES) {
            None | Some(Json::Null) => {}
            Some(Json::Object(given)) => {
                for (name, value) in given {
                    let field = format!("{FEATURES}.{name}");
                    let Some(&i) = self.feature_index.get(name) else {
                        err(&field, format!("unknown feature; the features are {}", self.artifact.features.join(", ")));
                        continue;
                    };
                    match (value.as_f64().filter(|v| v.is_finite()), self.ranges[i]) {
                        (None, _) => err(&field, format!("invalid type: expected a number, found {}", shown(value))),
                        (Some(v), Some([lo, hi])) if !(lo..=hi).contains(&v) => err(&field, format!("must be between {lo} and {hi}, got {v}")),
                        (Some(v), _) => overrides.push((i, v)),
                    }
                }
            }
            Some(other) => err(FEATURES, format!("expected an object of feature values, got {}", kind(other))),
        }
        // A needed feature whose inputs are missing must be given; name the field, and which
        // features could stand in for it.
        for (f, field) in self.fields.iter().enumerate() {
            if values[f].is_some() || field.default.is_some() || invalid.contains(&f) {
                continue;
            }
            let stand_ins: Vec<&str> =
                self.needing(task, f).filter(|&i| !overrides.iter().any(|(o, _)| *o == i)).map(|i| self.artifact.features[i].as_str()).collect();
            if !stand_ins.is_empty() {
                err(&field.names[0], format!("missing: give {}, or these features: {}", field.names[0], stand_ins.join(", ")));
            }
        }
        (errors.len() == before).then_some(Item { values, overrides })
    }

    /// The features `task` needs that cannot be built without request field `f`.
    fn needing(&self, task: Task, f: usize) -> impl Iterator<Item = usize> + '_ {
        self.needs[task.index()].iter().copied().filter(move |&i| self.inputs[i].contains(&f))
    }

    /// The request fields `task` cannot do without, each with the features that stand in for
    /// it: the rule [`LoadedRound::predict`] applies to a field left out, for the API's
    /// description.
    pub fn needed_fields(&self, task: Task) -> Vec<NeededField> {
        self.fields
            .iter()
            .enumerate()
            .filter(|(_, field)| field.default.is_none())
            .map(|(f, field)| NeededField {
                name: field.names[0].clone(),
                stand_ins: self.needing(task, f).map(|i| self.artifact.features[i].clone()).collect(),
            })
            .filter(|n| !n.stand_ins.is_empty())
            .collect()
    }

    fn wire_names(&self) -> String {
        self.fields.iter().map(|f| f.names[0].as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The key value the request gives for lookup `l` (or its default).
    fn key<'a>(&'a self, item: &'a Item, l: &LookupPlan) -> Option<&'a Value> {
        item.values[l.field].as_ref().or(self.fields[l.field].default.as_ref())
    }

    /// The serving rows of a batch of checked requests; `rows` is each request's row in each
    /// lookup table.
    fn row_batch<'a>(&'a self, items: &'a [Item], rows: &[Vec<u32>]) -> Result<RecordBatch, String> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for (f, plan) in self.fields.iter().enumerate() {
            let value = |item: &'a Item| -> &'a Value { item.values[f].as_ref().or(plan.default.as_ref()).unwrap_or(&plan.placeholder) };
            let array: ArrayRef = match plan.column.kind {
                ColumnType::Int64 => Arc::new(Int64Array::from_iter_values(items.iter().map(|i| match value(i) {
                    Value::Int(v) => *v,
                    Value::Float(v) => *v as i64,
                    Value::Text(_) => 0,
                }))),
                ColumnType::Float64 => Arc::new(Float64Array::from_iter_values(items.iter().map(|i| value(i).as_f64().unwrap_or(0.0)))),
                ColumnType::String => Arc::new(StringArray::from_iter_values(items.iter().map(|i| match value(i) {
                    Value::Text(s) => s.as_str(),
                    _ => "",
                }))),
            };
            columns.push(array);
        }
        for (l, rows) in self.lookups.iter().zip(rows) {
            let indices = UInt32Array::from(rows.clone());
            for c in &l.columns {
                // A column no live feature reads only has to be there: for one request, the
                // zero row (a shared slice) does, with no copy.
                let array = if !self.read_live[columns.len()] && items.len() == 1 {
                    c.slice(l.rows as usize, 1)
                } else {
                    take(c.as_ref(), &indices, None).map_err(|e| e.to_string())?
                };
                columns.push(array);
            }
        }
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| e.to_string())
    }
}

impl LookupPlan {
    /// The row of `key`, if the table has it.
    fn find(&self, key: Option<&Value>) -> Option<u32> {
        match (&self.keys, key?) {
            (KeyIndex::Int(m), Value::Int(k)) => m.get(k).copied(),
            (KeyIndex::Text(m), Value::Text(k)) => m.get(k).copied(),
            _ => None,
        }
    }
}

impl serde::Serialize for Answer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let round = self.round;
        let models = &round.artifact.pipeline.definition.models;
        let mut map = s.serialize_map(None)?;
        for (f, value) in round.fields.iter().zip(&self.given) {
            if let Some(v) = value {
                map.serialize_entry(&f.names[0], &JsonValue(v))?;
            }
        }
        map.serialize_entry(ROUND, &round.artifact.round)?;
        for (l, known) in round.lookups.iter().zip(&self.known) {
            map.serialize_entry(&l.known, known)?;
        }
        if let Some(p) = self.probability {
            map.serialize_entry(&models.classification.probability, &p)?;
            map.serialize_entry(&models.classification.answer, &u8::from(p >= 0.5))?;
        }
        if let Some(y) = self.predicted {
            map.serialize_entry(&models.regression.answer, &y)?;
        }
        if let Some(segment) = self.segment {
            map.serialize_entry(&models.clustering.answer, &segment.id)?;
            map.serialize_entry(SEGMENT, &segment.description)?;
        }
        map.serialize_entry(FEATURES, &ShownFeatures(self))?;
        map.end()
    }
}

struct JsonValue<'a>(&'a Value);

impl serde::Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Int(v) => s.serialize_i64(*v),
            Value::Float(v) => s.serialize_f64(*v),
            Value::Text(v) => s.serialize_str(v),
        }
    }
}

struct ShownFeatures<'a, 'b>(&'b Answer<'a>);

impl serde::Serialize for ShownFeatures<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let a = self.0;
        let mut map = s.serialize_map(None)?;
        for ((name, value), shown) in a.round.artifact.features.iter().zip(&a.features).zip(&a.shown) {
            if *shown {
                map.serialize_entry(name, value)?;
            }
        }
        map.end()
    }
}

/// Splits the features into those computed once per entity at load and those evaluated per
/// request. A feature that reads the state of one lookup and, at most, request fields that have
/// a default (a user's mean rating; a user's recency "now", the newest event the round saw) has
/// the same value for every request with that key that leaves those fields out, so it is
/// evaluated once over the whole table, vectorised, and looked up per request. Only the
/// features that read request fields without a default (a device's usage hours) are evaluated
/// per request, and those computed at a default that a request overrides. A feature whose
/// table-wide evaluation fails is simply left to be evaluated per request.
#[allow(clippy::type_complexity)]
fn per_entity_features(
    exprs: &FeatureExprs,
    schema: &SchemaRef,
    fields: &[FieldPlan],
    lookups: &[LookupPlan],
    schemas: &[SchemaRef],
    profile: &[usize],
) -> (Vec<Option<PerEntity>>, [Vec<usize>; 2], Vec<bool>) {
    let n = exprs.names().len();
    // The lookup whose state each serving column is, if it is one.
    let mut owner: FxHashMap<&str, usize> = FxHashMap::default();
    for (l, s) in schemas.iter().enumerate() {
        for f in s.fields().iter().skip(1) {
            owner.insert(f.name().as_str(), l);
        }
    }
    let defaulted = |c: &str| fields.iter().position(|f| f.column.name == c && f.default.is_some());
    let mut per_entity: Vec<Option<PerEntity>> = (0..n).map(|_| None).collect();
    for (l, lookup) in lookups.iter().enumerate() {
        let mine: Vec<usize> = (0..n)
            .filter(|&i| {
                let used = exprs.columns_used(i);
                used.iter().any(|c| owner.get(c.as_str()) == Some(&l)) && used.iter().all(|c| owner.get(c.as_str()) == Some(&l) || defaulted(c).is_some())
            })
            .collect();
        if mine.is_empty() {
            continue;
        }
        let names: Vec<String> = mine.iter().map(|&i| exprs.names()[i].clone()).collect();
        match table_rows(schema, fields, lookups, l).and_then(|batch| exprs.evaluate_some(&batch, &names)) {
            Ok(values) => {
                for (&i, values) in mine.iter().zip(values) {
                    let defaulted = exprs.columns_used(i).iter().filter_map(|c| defaulted(c)).collect();
                    per_entity[i] = Some(PerEntity { lookup: l, values, defaulted });
                }
            }
            Err(e) => tracing::warn!(lookup = lookup.name, error = %e, "features of the lookup's state are evaluated per request instead"),
        }
    }
    let live_all: Vec<usize> = (0..n).filter(|&i| per_entity[i].is_none()).collect();
    let live_profile: Vec<usize> = live_all.iter().copied().filter(|i| profile.contains(i)).collect();
    // Columns a feature evaluated per request may read (including those computed at a default).
    let mut read_live = vec![false; schema.fields().len()];
    for i in (0..n).filter(|&i| per_entity[i].as_ref().is_none_or(|p| !p.defaulted.is_empty())) {
        for c in exprs.columns_used(i) {
            if let Ok(k) = schema.index_of(c) {
                read_live[k] = true;
            }
        }
    }
    (per_entity, [live_all, live_profile], read_live)
}

/// Serving rows for every row of lookup `l` (its zero row last): its state columns, request
/// fields at their defaults, and placeholders elsewhere (the features evaluated on them read
/// nothing else).
fn table_rows(schema: &SchemaRef, fields: &[FieldPlan], lookups: &[LookupPlan], l: usize) -> Result<RecordBatch, String> {
    let rows = lookups[l].rows as usize + 1;
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in fields {
        columns.push(match f.default.as_ref().unwrap_or(&f.placeholder) {
            Value::Int(v) => Arc::new(Int64Array::from(vec![*v; rows])),
            Value::Float(v) => Arc::new(Float64Array::from(vec![*v; rows])),
            Value::Text(v) => Arc::new(StringArray::from(vec![v.as_str(); rows])),
        });
    }
    for (k, other) in lookups.iter().enumerate() {
        let zero_rows = UInt32Array::from(vec![other.rows; rows]);
        for c in &other.columns {
            columns.push(if k == l { c.clone() } else { take(c.as_ref(), &zero_rows, None).map_err(|e| e.to_string())? });
        }
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

/// A column's value for a number given in the artifact (a default).
fn typed(column: &Column, v: f64) -> Option<Value> {
    match column.kind {
        ColumnType::Int64 if v.fract() == 0.0 && v.is_finite() => Some(Value::Int(v as i64)),
        ColumnType::Float64 if v.is_finite() => Some(Value::Float(v)),
        _ => None,
    }
}

/// A field's problem in words, without the field's name (the error names it beside).
fn field_message(e: &EventError) -> String {
    match e {
        EventError::WrongType { expected, found, .. } => format!("invalid type: expected {expected}, found {found}"),
        EventError::OutOfRange { value, allowed, .. } if allowed.starts_with("one of") => format!("\"{value}\" is not a known value ({allowed})"),
        EventError::OutOfRange { value, allowed, .. } => format!("{value} is out of range ({allowed})"),
        other => other.to_string(),
    }
}

/// Reads one file of a round; a missing file makes the round bad (a partial round), while
/// other store errors stay store errors (worth retrying).
async fn fetch(store: &Lake, path: &str, round: u64) -> Result<Bytes, ApiError> {
    match store.get(&Path::from(path)).await {
        Err(e) if e.is_not_found() => Err(ApiError::BadRound { round, path: store.url_of(path), reason: "missing: the round is incomplete".into() }),
        other => Ok(other?),
    }
}

/// A round's line in the list of rounds.
pub fn summary(artifact: &ModelArtifact, path: &str) -> RoundSummary {
    RoundSummary { round: artifact.round, path: path.to_string(), created_at_ms: artifact.created_at_ms, metrics: artifact.metrics.clone() }
}

/// Whether this server can use the artifact at all: the format, the pipeline it was trained
/// with, and every model's shape against the pipeline's features.
fn check_artifact(a: &ModelArtifact, pointer: &LatestPointer, folder: &str) -> Result<(), String> {
    if a.format_version != ARTIFACT_FORMAT_VERSION {
        return Err(format!("artifact format version {} (this server reads {ARTIFACT_FORMAT_VERSION})", a.format_version));
    }
    let p = &a.pipeline;
    if a.fingerprint != p.fingerprint() {
        return Err("the pipeline's fingerprint differs from the pipeline stored beside it: the definition was changed after training".into());
    }
    if p.name() != folder {
        return Err(format!("the round is of pipeline `{}`, but lies in the model store's folder `{folder}`", p.name()));
    }
    if a.round != pointer.round {
        return Err(format!("model.json is round {}, LATEST says {}", a.round, pointer.round));
    }
    if a.features != p.features() {
        return Err(format!("features {:?}, the pipeline's are {:?}", a.features, p.features()));
    }
    let n = a.features.len();
    let profile = &p.definition.models.clustering.profile;
    if &a.segmentation.profile != profile {
        return Err(format!("segmentation.profile {:?}, the pipeline's is {profile:?}", a.segmentation.profile));
    }
    let k = profile.len();
    let mut lengths = vec![
        ("scaling.mean", a.scaling.mean.len(), n),
        ("scaling.scale", a.scaling.scale.len(), n),
        ("segmentation.scaling.mean", a.segmentation.scaling.mean.len(), k),
        ("segmentation.scaling.scale", a.segmentation.scaling.scale.len(), k),
    ];
    for (what, m) in [("classification", &a.classification), ("regression", &a.regression)] {
        lengths.push((what, m.coefficients.len(), m.uses.len()));
        if let Some(i) = m.uses.iter().find(|&&i| i >= n) {
            return Err(format!("{what}.uses names feature {i}; there are {n}"));
        }
    }
    for (what, got, want) in lengths {
        if got != want {
            return Err(format!("{what} has {got} values, expected {want}"));
        }
    }
    if a.segmentation.segments.is_empty() {
        return Err("segmentation has no segments".into());
    }
    if let Some(s) = a.segmentation.segments.iter().find(|s| s.centroid.len() != k) {
        return Err(format!("segment {} centroid has {} values, expected {k}", s.id, s.centroid.len()));
    }
    let numbers = a
        .scaling
        .mean
        .iter()
        .chain(&a.scaling.scale)
        .chain(&a.regression.coefficients)
        .chain(&a.classification.coefficients)
        .chain(&a.segmentation.scaling.mean)
        .chain(&a.segmentation.scaling.scale)
        .chain(a.segmentation.segments.iter().flat_map(|s| &s.centroid))
        .chain(a.variables.values())
        .chain(a.defaults.values());
    if !numbers.chain([&a.regression.intercept, &a.classification.intercept]).all(|v| v.is_finite()) {
        return Err("a coefficient, scaling value, centroid, variable or default is not finite".into());
    }
    if a.scaling.scale.iter().chain(&a.segmentation.scaling.scale).any(|s| *s == 0.0) {
        return Err("a scaling scale is 0".into());
    }
    let declared: Vec<&str> = p.definition.lookups.iter().map(|l| l.name.as_str()).collect();
    let stored: Vec<&str> = a.lookups.iter().map(|l| l.name.as_str()).collect();
    if declared != stored {
        return Err(format!("lookup tables {stored:?}, the pipeline declares {declared:?}"));
    }
    Ok(())
}

/// Why a round's files do not make a servable round, and which lookup table file is at fault
/// (none: `model.json` is).
struct BuildFault {
    file: Option<String>,
    reason: String,
}

impl From<String> for BuildFault {
    fn from(reason: String) -> Self {
        BuildFault { file: None, reason }
    }
}

/// Reads a lookup table whole (a damaged file is an error, even where the Parquet reader would
/// panic: see [`read_parquet`]).
fn read_table(bytes: Bytes) -> Result<RecordBatch, String> {
    let (schema, batches) = read_parquet(bytes)?;
    concat_batches(&schema, &batches).map_err(|e| e.to_string())
}

/// Indexes a lookup table by its key (its first column) and returns it with the schema serving
/// compiles against (strings as plain UTF-8).
fn lookup_plan(name: String, field: usize, key_column: &Column, table: RecordBatch) -> Result<(LookupPlan, SchemaRef), String> {
    let schema = table.schema();
    if schema.fields().is_empty() || schema.field(0).name() != &key_column.name {
        let first = schema.fields().first().map(|f| f.name().as_str()).unwrap_or("nothing");
        return Err(format!("the first column must be the key `{}`, found `{first}`", key_column.name));
    }
    let mut columns = Vec::with_capacity(table.num_columns());
    let mut fields = Vec::with_capacity(table.num_columns());
    for (f, c) in schema.fields().iter().zip(table.columns()) {
        if c.null_count() > 0 {
            return Err(format!("column `{}` has nulls", f.name()));
        }
        // Parquet readers may give strings as views or large strings; serving rows hold plain ones.
        let c = match c.data_type() {
            DataType::Utf8View | DataType::LargeUtf8 => cast(c, &DataType::Utf8).map_err(|e| format!("column `{}`: {e}", f.name()))?,
            _ => c.clone(),
        };
        fields.push(arrow_schema::Field::new(f.name(), c.data_type().clone(), false));
        columns.push(c);
    }
    let rows = u32::try_from(table.num_rows()).map_err(|_| "more than 4 billion rows".to_string())?;
    let duplicate = |k: &dyn std::fmt::Display| format!("key {k} appears twice");
    let key = &columns[0];
    let keys = match (key_column.kind, key.as_any().downcast_ref::<Int64Array>(), key.as_any().downcast_ref::<StringArray>()) {
        (ColumnType::Int64, Some(ids), _) => {
            let mut m = FxHashMap::with_capacity_and_hasher(ids.len(), Default::default());
            for (r, id) in ids.values().iter().enumerate() {
                if m.insert(*id, r as u32).is_some() {
                    return Err(duplicate(id));
                }
            }
            KeyIndex::Int(m)
        }
        (ColumnType::String, _, Some(ids)) => {
            let mut m = FxHashMap::with_capacity_and_hasher(ids.len(), Default::default());
            for (r, id) in ids.iter().enumerate() {
                let id = id.unwrap_or_default().to_string();
                if m.contains_key(&id) {
                    return Err(duplicate(&id));
                }
                m.insert(id, r as u32);
            }
            KeyIndex::Text(m)
        }
        _ => return Err(format!("the key `{}` is {}, but the event column is {:?}", key_column.name, key.data_type(), key_column.kind)),
    };
    let suggestions = most_active(&columns, &keys);
    let zero: ArrayRef = Arc::new(Float64Array::from(vec![0.0]));
    let mut state = Vec::with_capacity(columns.len() - 1);
    for (f, c) in fields.iter().zip(&columns).skip(1) {
        let z = cast(&zero, c.data_type()).map_err(|e| format!("column `{}` ({}): no zero for unknown keys: {e}", f.name(), c.data_type()))?;
        state.push(concat(&[c.as_ref(), z.as_ref()]).map_err(|e| e.to_string())?);
    }
    let schema = Arc::new(arrow_schema::Schema::new(fields));
    let known = known_field(&name);
    Ok((LookupPlan { name, known, field, keys, rows, columns: state, suggestions }, schema))
}

/// The most active keys: by the first numeric state column (a count, in the shipped
/// pipelines), highest first; ties by key.
fn most_active(columns: &[ArrayRef], keys: &KeyIndex) -> Vec<Json> {
    let activity = columns.iter().skip(1).find(|c| c.data_type().is_numeric()).and_then(|c| cast(c, &DataType::Float64).ok());
    let Some(activity) = activity else { return vec![] };
    let Some(activity) = activity.as_any().downcast_ref::<Float64Array>() else { return vec![] };
    let mut ranked: Vec<(f64, Json)> = match keys {
        KeyIndex::Int(m) => m.iter().map(|(k, &r)| (activity.value(r as usize), Json::from(*k))).collect(),
        KeyIndex::Text(m) => m.iter().map(|(k, &r)| (activity.value(r as usize), Json::from(k.as_str()))).collect(),
    };
    let order = |a: &Json, b: &Json| match (a.as_i64(), b.as_i64()) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => a.as_str().cmp(&b.as_str()),
    };
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| order(&a.1, &b.1)));
    ranked.into_iter().take(SUGGESTIONS).map(|(_, k)| k).collect()
}

/// The event columns a request of pipeline `p` may carry, in the definition's order.
pub fn request_columns(p: &Pipeline) -> Vec<&Column> {
    p.definition.request.fields.iter().filter_map(|f| p.column(f)).collect()
}

#[cfg(test)]
mod tests;
