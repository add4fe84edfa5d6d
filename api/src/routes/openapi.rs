//! The OpenAPI description, generated from the pipelines' definitions: each pipeline the server
//! knows (a round loaded, or the built-in definition of the default pipeline before its first
//! round) gets its own request and answer schemas and its own paths, so a client generator sees
//! `{"userId":…}` for MovieLens and `{"DeviceType":…}` for smart-home.

use std::collections::BTreeMap;
use std::sync::Arc;

use lensflow_core::Pipeline;
use lensflow_core::pipeline::definition::ColumnType;
use lensflow_core::predict::{FEATURES, ROUND, SEGMENT, known_field};
use serde_json::json;
use utoipa::OpenApi;
use utoipa::openapi::path::{HttpMethod, OperationBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::{ResponseBuilder, ResponsesBuilder};
use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Ref, Schema, SchemaType, Type};
use utoipa::openapi::{Content, RefOr, Required};

use crate::round::{LoadedRound, Task, request_columns};
use crate::watcher::Models;

/// The prediction endpoints: path suffix, task words, and the task.
const ENDPOINTS: [(&str, &str, Task); 4] = [
    ("predict", "All three answers", Task::All),
    ("predict_classification", "The classification answer", Task::Classification),
    ("predict_regression", "The regression answer", Task::Regression),
    ("predict_clustering", "The segment", Task::Clustering),
];

/// The OpenAPI description of this server as it is now: the fixed routes, and the routes and
/// schemas of every pipeline it can answer for; a batch holds at most `max_batch` requests.
pub fn openapi(models: &Models, max_batch: usize) -> utoipa::openapi::OpenApi {
    let mut doc = super::ApiDoc::openapi();
    let default = models.default_pipeline();
    let mut known: BTreeMap<String, Pipeline> = BTreeMap::new();
    let mut rounds: BTreeMap<String, Arc<LoadedRound>> = BTreeMap::new();
    for (name, p) in models.pipelines().iter() {
        if let Some(round) = p.current() {
            known.insert(name.clone(), round.pipeline().clone());
            rounds.insert(name.clone(), round);
        }
    }
    for name in models.pipelines().keys().map(String::as_str).chain([default]) {
        if !known.contains_key(name)
            && let Some(Ok(p)) = Pipeline::builtin(name)
        {
            known.insert(name.to_string(), p);
        }
    }
    let components = doc.components.get_or_insert_with(Default::default);
    for (name, p) in &known {
        components.schemas.insert(format!("{name}.PredictRequest"), RefOr::T(request_schema(p)));
        components.schemas.insert(format!("{name}.Prediction"), RefOr::T(answer_schema(p)));
    }
    for (name, p) in &known {
        let mut prefixes = vec![format!("/pipelines/{name}")];
        if name == default {
            prefixes.push(String::new());
        }
        for prefix in prefixes {
            let id = if prefix.is_empty() { String::new() } else { format!("{name}.") };
            for (suffix, words, task) in ENDPOINTS {
                let path = format!("{prefix}/{suffix}");
                let needs = needs_in_words(rounds.get(name).map(|r| r.as_ref()), task);
                let op = predict_operation(p, suffix, words, &needs, max_batch).operation_id(Some(format!("{id}{suffix}")));
                doc.paths.add_path_operation(&path, vec![HttpMethod::Post], op);
            }
            let get = |what: &str, schema: &str, text: String| {
                OperationBuilder::new().summary(Some(text)).operation_id(Some(format!("{id}{what}"))).tag(name.clone()).responses(
                    ResponsesBuilder::new()
                        .response(
                            "200",
                            ResponseBuilder::new().description("OK").content("application/json", Content::new(Some(Ref::from_schema_name(schema)))),
                        )
                        .response("404", error_response("No such pipeline in the model store"))
                        .response("503", error_response("No round of the pipeline is loaded yet")),
                )
            };
            doc.paths.add_path_operation(
                format!("{prefix}/models"),
                vec![HttpMethod::Get],
                get("models", "ModelsResponse", format!("{name}: the round served (metrics, lineage, request fields, segments) and every round before it")),
            );
            doc.paths.add_path_operation(
                format!("{prefix}/status"),
                vec![HttpMethod::Get],
                get("status", "PipelineStatus", format!("{name}: batches and events in the lake, the round served")),
            );
        }
    }
    // Any request may wait for a turn past the timeout; the answer is then a bare 408.
    for item in doc.paths.paths.values_mut() {
        for op in [&mut item.get, &mut item.post].into_iter().flatten() {
            op.responses.responses.entry("408".into()).or_insert_with(|| {
                RefOr::T(ResponseBuilder::new().description("Not answered within the request timeout (waiting for a turn included); no body").build())
            });
        }
    }
    doc
}

fn error_response(text: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(text).content("application/json", Content::new(Some(Ref::from_schema_name("ErrorBody"))))
}

/// One object, or an array of 1 to `max` of them.
fn one_or_many(schema: &str, max: usize) -> OneOfBuilder {
    let array = ArrayBuilder::new().items(Ref::from_schema_name(schema)).min_items(Some(1)).max_items(Some(max));
    OneOfBuilder::new().item(Ref::from_schema_name(schema)).item(array)
}

/// What a request to `task` must give, in words, when a round is loaded: each field the task
/// cannot do without, unless every feature that needs it is given instead (the rule the round
/// applies, see [`LoadedRound::needed_fields`]). Said in words rather than as `anyOf` schemas,
/// which client generators and schema-driven testers handle poorly.
fn needs_in_words(round: Option<&LoadedRound>, task: Task) -> String {
    let needed = round.map(|r| r.needed_fields(task)).unwrap_or_default();
    let each: Vec<String> = needed.iter().map(|f| format!("`{}` (or all of {} in `{FEATURES}`)", f.name, f.stand_ins.join(", "))).collect();
    if each.is_empty() { String::new() } else { format!(" Each request needs {}.", each.join(", ")) }
}

fn predict_operation(p: &Pipeline, suffix: &str, words: &str, needs: &str, max_batch: usize) -> OperationBuilder {
    let name = p.name();
    let m = &p.definition.models;
    let what = match suffix {
        "predict_classification" => format!("`{}` (0/1) and `{}`: {}", m.classification.answer, m.classification.probability, m.classification.doc),
        "predict_regression" => format!("`{}`: {}", m.regression.answer, m.regression.doc),
        "predict_clustering" => format!("`{}` and `{SEGMENT}`: {} (needs only what the profile features read)", m.clustering.answer, m.clustering.doc),
        _ => format!("`{}`, `{}`, `{}`, `{}`", m.classification.answer, m.classification.probability, m.regression.answer, m.clustering.answer),
    };
    let request = format!("{name}.PredictRequest");
    let answer = format!("{name}.Prediction");
    OperationBuilder::new()
        .summary(Some(format!("{name}: {words}")))
        .description(Some(format!("{what}. One request object, or a JSON array of them (answered with an array in the same order).{needs}")))
        .tag(name)
        .request_body(Some(
            RequestBodyBuilder::new().required(Some(Required::True)).content("application/json", Content::new(Some(one_or_many(&request, max_batch)))).build(),
        ))
        .responses(
            ResponsesBuilder::new()
                .response(
                    "200",
                    ResponseBuilder::new().description("The answers").content("application/json", Content::new(Some(one_or_many(&answer, max_batch)))),
                )
                .response("400", error_response("Malformed JSON"))
                .response("404", error_response("No such pipeline in the model store"))
                .response("413", error_response("Body over the size limit"))
                .response("422", error_response("A field is wrong or missing: `field` names it (`[3].movieId`, `features.u_mean`)"))
                .response("503", error_response("No round of the pipeline is loaded yet")),
        )
}

/// The schema of one request field's value; `nullable` in a request, where `null` is the
/// same as leaving the field out.
fn field_schema(c: &lensflow_core::pipeline::definition::Column, default: bool, nullable: bool) -> ObjectBuilder {
    let ty = match c.kind {
        ColumnType::Int64 => Type::Integer,
        ColumnType::Float64 => Type::Number,
        ColumnType::String => Type::String,
    };
    let ty = if nullable { SchemaType::from_iter([ty, Type::Null]) } else { SchemaType::new(ty) };
    let mut doc = c.doc.clone();
    if c.wire() != c.name {
        doc.push_str(&format!(" (also accepted as `{}`)", c.name));
    }
    if default {
        doc.push_str(" [optional: defaults to the round's value, see /models]");
    }
    let mut schema = ObjectBuilder::new().schema_type(ty).description(Some(doc)).minimum(c.min).maximum(c.max).multiple_of(c.step);
    if let Some(values) = &c.values {
        let null = nullable.then_some(serde_json::Value::Null);
        schema = schema.enum_values(Some(values.iter().map(|v| json!(v)).chain(null)));
    }
    schema
}

fn request_schema(p: &Pipeline) -> Schema {
    let d = &p.definition;
    let mut features = ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .description(Some("Feature values to use instead of those built from the fields (a what-if), by feature name"))
        .additional_properties(Some(AdditionalProperties::FreeForm(false)));
    for f in p.features() {
        let range = d.features.ranges.get(f);
        features =
            features.property(f, ObjectBuilder::new().schema_type(SchemaType::new(Type::Number)).minimum(range.map(|r| r[0])).maximum(range.map(|r| r[1])));
    }
    let mut schema = ObjectBuilder::new().schema_type(SchemaType::new(Type::Object)).description(Some(format!(
        "A question to pipeline {}: {}. A field may be left out when every feature that needs it is given in `{FEATURES}` (or, for a field with a default, always).",
        p.name(),
        d.description
    )));
    let mut example = serde_json::Map::new();
    for c in request_columns(p) {
        schema = schema.property(c.wire(), field_schema(c, d.request.defaults.contains_key(&c.name), true));
        if !d.request.defaults.contains_key(&c.name) {
            example.insert(c.wire().to_string(), example_value(c));
        }
    }
    schema.property(FEATURES, features).examples([json!(example)]).into()
}

/// A value of the column for the example request.
fn example_value(c: &lensflow_core::pipeline::definition::Column) -> serde_json::Value {
    match c.kind {
        ColumnType::String => json!(c.values.as_ref().and_then(|v| v.first()).cloned().unwrap_or_default()),
        ColumnType::Int64 => json!(c.min.unwrap_or(0.0).max(1.0).min(c.max.unwrap_or(f64::MAX)) as i64),
        ColumnType::Float64 => json!(c.min.unwrap_or(0.0).max(1.0).min(c.max.unwrap_or(f64::MAX))),
    }
}

fn answer_schema(p: &Pipeline) -> Schema {
    let d = &p.definition;
    let m = &d.models;
    let number = |doc: &str| ObjectBuilder::new().schema_type(SchemaType::new(Type::Number)).description(Some(doc.to_string()));
    let integer = |doc: &str| ObjectBuilder::new().schema_type(SchemaType::new(Type::Integer)).description(Some(doc.to_string()));
    let mut schema = ObjectBuilder::new()
        .schema_type(SchemaType::new(Type::Object))
        .description(Some(format!("An answer of pipeline {}: the fields given, echoed, and the answers the endpoint asked for", p.name())));
    for c in request_columns(p) {
        schema = schema.property(c.wire(), field_schema(c, false, false).description(Some(format!("{} (as asked)", c.doc))));
    }
    schema = schema.property(ROUND, integer("The training round whose models answered")).required(ROUND);
    for l in &d.lookups {
        let field = known_field(&l.name);
        schema = schema
            .property(
                &field,
                ObjectBuilder::new()
                    .schema_type(SchemaType::new(Type::Boolean))
                    .description(Some(format!("Whether the round knows this {} (otherwise its state counts as zero, as for a first event)", l.name))),
            )
            .required(field);
    }
    let (lo, hi) = m.regression.clip.map(|[lo, hi]| (Some(lo), Some(hi))).unwrap_or((None, None));
    schema
        .property(
            &m.classification.probability,
            number(&format!("Classification: probability that {}", m.classification.doc)).minimum(Some(0.0)).maximum(Some(1.0)),
        )
        .property(
            &m.classification.answer,
            integer(&format!("Classification: 1 if the probability is at least 0.5, else 0 ({})", m.classification.doc)).enum_values(Some([0, 1])),
        )
        .property(&m.regression.answer, number(&format!("Regression: {}", m.regression.doc)).minimum(lo).maximum(hi))
        .property(&m.clustering.answer, integer(&format!("Clustering: {}", m.clustering.doc)))
        .property(SEGMENT, ObjectBuilder::new().schema_type(SchemaType::new(Type::String)).description(Some("Clustering: the segment in words")))
        .property(
            FEATURES,
            ObjectBuilder::new()
                .schema_type(SchemaType::new(Type::Object))
                .description(Some("The feature values the models saw, by name"))
                .additional_properties(Some(ObjectBuilder::new().schema_type(SchemaType::new(Type::Number)))),
        )
        .required(FEATURES)
        .into()
}
