//! The checks a definition must pass before anything runs. Static checks (names, references,
//! types) run on load; [`Pipeline::check_sql`] then plans every SQL file on empty tables of the
//! declared columns with DataFusion, so SQL that does not parse, names an unknown column or
//! gives the wrong columns is caught with the file and the feature at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::definition::FieldDefault;
use super::expr::{self, FeatureExprs};
use super::{EVENT_ENTITY, KAFKA_OFFSET, KAFKA_PARTITION, Pipeline, PipelineError};

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_') && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// What the SQL checks learned: the output schemas serving and training rely on.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The feature SQL's output schema.
    pub features: SchemaRef,
    /// Each lookup's output schema, in definition order.
    pub lookups: Vec<SchemaRef>,
    /// The row serving builds for a request: request fields, then each lookup's state columns.
    pub serving: SchemaRef,
}

impl Pipeline {
    /// Names, references and types within the definition.
    pub(super) fn check_static(&self) -> Result<(), PipelineError> {
        let d = &self.definition;
        let fault = |key: &str, fault: String| Err(self.fault(key, fault));
        if d.name.is_empty() || !d.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return fault("name", format!("`{}` must be lower-case letters, digits and dashes (it names folders, a topic and routes)", d.name));
        }
        if !is_identifier(&d.events.table) {
            return fault("events.table", format!("`{}` is not a lower-case SQL identifier", d.events.table));
        }
        let mut seen = BTreeSet::new();
        let mut wires = BTreeSet::new();
        for (i, c) in d.events.columns.iter().enumerate() {
            let key = format!("events.columns[{i}] ({})", c.name);
            if !is_identifier(&c.name) {
                return fault(&key, format!("`{}` is not a lower-case SQL identifier (snake_case reads the same on Spark and DataFusion)", c.name));
            }
            if c.name == KAFKA_PARTITION || c.name == KAFKA_OFFSET {
                return fault(&key, format!("`{}` is reserved: the lake adds it to every event", c.name));
            }
            if !seen.insert(c.name.as_str()) || !wires.insert(c.wire()) {
                return fault(&key, "the name is used twice".into());
            }
            let numeric = c.kind != super::ColumnType::String;
            if !numeric && (c.min.is_some() || c.max.is_some() || c.step.is_some()) {
                return fault(&key, "min, max and step apply to numbers; this column is a string".into());
            }
            if numeric && c.values.is_some() {
                return fault(&key, "values apply to strings; this column is a number".into());
            }
            if let (Some(lo), Some(hi)) = (c.min, c.max)
                && lo > hi
            {
                return fault(&key, format!("min {lo} is above max {hi}"));
            }
            if c.step.is_some_and(|s| s <= 0.0) {
                return fault(&key, "step must be positive".into());
            }
        }
        if d.events.columns.is_empty() {
            return fault("events.columns", "no columns".into());
        }
        if self.column(&d.events.key).is_none() {
            return fault("events.key", format!("unknown column `{}`", d.events.key));
        }
        if let Some(time) = &d.events.time {
            match self.column(time) {
                None => return fault("events.time", format!("unknown column `{time}`")),
                Some(c) if c.kind != super::ColumnType::Int64 => {
                    return fault("events.time", format!("`{time}` must be an int64 column (e.g. unix seconds)"));
                }
                Some(_) => {}
            }
        }
        let features: BTreeSet<&str> = d.features.names.iter().map(String::as_str).collect();
        if features.is_empty() {
            return fault("features.names", "no features".into());
        }
        if features.len() != d.features.names.len() {
            return fault("features.names", "a feature is named twice".into());
        }
        for name in &d.features.names {
            if !is_identifier(name) {
                return fault("features.names", format!("`{name}` is not a lower-case SQL identifier"));
            }
        }
        for (name, [lo, hi]) in &d.features.ranges {
            if !features.contains(name.as_str()) {
                return fault(&format!("features.ranges.{name}"), "not a feature".into());
            }
            if lo > hi {
                return fault(&format!("features.ranges.{name}"), format!("low {lo} is above high {hi}"));
            }
        }
        for name in d.features.constants.keys().chain(d.features.variables.keys()) {
            if !is_identifier(name) {
                return fault(&format!("features.variables.{name}"), "not a lower-case identifier".into());
            }
        }
        if let Some(dup) = d.features.constants.keys().find(|k| d.features.variables.contains_key(*k)) {
            return fault(&format!("features.variables.{dup}"), "also defined as a constant".into());
        }
        let mut lookup_names = BTreeSet::new();
        for (i, l) in d.lookups.iter().enumerate() {
            let key = format!("lookups[{i}] ({})", l.name);
            if !is_identifier(&l.name) || l.name == EVENT_ENTITY {
                return fault(&key, format!("`{}` must be a lower-case identifier other than `{EVENT_ENTITY}`", l.name));
            }
            if !lookup_names.insert(l.name.as_str()) {
                return fault(&key, "the name is used twice".into());
            }
            if self.column(&l.key).is_none() {
                return fault(&format!("{key}.key"), format!("unknown column `{}`", l.key));
            }
            if !d.request.fields.contains(&l.key) {
                return fault(&format!("{key}.key"), format!("`{}` is not among request.fields, so no request could be looked up", l.key));
            }
        }
        if d.request.fields.is_empty() {
            return fault("request.fields", "a request must carry something".into());
        }
        for f in &d.request.fields {
            if self.column(f).is_none() {
                return fault("request.fields", format!("unknown column `{f}`"));
            }
        }
        for (f, default) in &d.request.defaults {
            let key = format!("request.defaults.{f}");
            let Some(c) = self.column(f).filter(|_| d.request.fields.contains(f)) else {
                return fault(&key, "not a request field".into());
            };
            match default {
                FieldDefault::Word(w) if w == "newest" && c.kind != super::ColumnType::String => {}
                FieldDefault::Number(_) if c.kind != super::ColumnType::String => {}
                _ => return fault(&key, "a default is `newest` or a number, for a number column".into()),
            }
        }
        if !(d.holdout.newest > 0.0 && d.holdout.newest < 1.0) {
            return fault("holdout.newest", format!("{} is not between 0 and 1", d.holdout.newest));
        }
        let m = &d.models;
        for (key, col) in [("models.classification.label", &m.classification.label), ("models.regression.target", &m.regression.target)] {
            if col.is_empty() {
                return fault(key, "missing".into());
            }
            if features.contains(col.as_str()) {
                return fault(key, format!("`{col}` is also a feature: the target would leak into the model"));
            }
        }
        for (key, list) in [("models.classification.features", &m.classification.features), ("models.regression.features", &m.regression.features)] {
            if let Some(list) = list {
                if list.is_empty() {
                    return fault(key, "no features".into());
                }
                if let Some(f) = list.iter().find(|f| !features.contains(f.as_str())) {
                    return fault(key, format!("`{f}` is not a feature"));
                }
            }
        }
        if m.classification.ridge < 0.0 || !m.classification.ridge.is_finite() {
            return fault("models.classification.ridge", "must be a finite number, 0 or more".into());
        }
        if let Some([lo, hi]) = m.regression.clip
            && lo > hi
        {
            return fault("models.regression.clip", format!("low {lo} is above high {hi}"));
        }
        let c = &m.clustering;
        if c.entity != EVENT_ENTITY && !lookup_names.contains(c.entity.as_str()) {
            return fault(
                "models.clustering.entity",
                format!("`{}` is neither `{EVENT_ENTITY}` nor a lookup ({})", c.entity, lookup_names.into_iter().collect::<Vec<_>>().join(", ")),
            );
        }
        if c.profile.is_empty() {
            return fault("models.clustering.profile", "no profile features".into());
        }
        for f in &c.profile {
            if !features.contains(f.as_str()) {
                return fault("models.clustering.profile", format!("`{f}` is not a feature"));
            }
        }
        if !(2..=20).contains(&c.k) {
            return fault("models.clustering.k", format!("{} is not between 2 and 20", c.k));
        }
        for w in &c.words {
            if !c.profile.contains(&w.feature) {
                return fault("models.clustering.words", format!("`{}` is not a profile feature", w.feature));
            }
        }
        let answers = [&m.classification.answer, &m.classification.probability, &m.regression.answer, &c.answer];
        let names: BTreeSet<&String> = answers.iter().copied().collect();
        if names.len() != answers.len() {
            return fault("models", "two answers have the same field name".into());
        }
        if let Some(a) = answers.iter().find(|a| d.request.fields.iter().any(|f| self.column(f).is_some_and(|c| c.wire() == a.as_str()))) {
            return fault("models", format!("answer field `{a}` is also a request field"));
        }
        Ok(())
    }

    /// Plans every SQL file on empty tables of the declared columns and compiles the
    /// expressions serving evaluates; returns the schemas learned.
    pub async fn check_sql(&self) -> Result<Checked, PipelineError> {
        let d = &self.definition;
        let vars: BTreeMap<String, f64> = d.features.constants.clone().into_iter().chain(d.features.variables.keys().map(|k| (k.clone(), 1.0))).collect();
        let events = self.lake_schema();
        let ctx = expr::session();
        let sql_fault = |file: &str, key: &str, e: String| PipelineError { file: self.sql_file(file), key: key.into(), fault: e };

        for (name, aggregate) in &d.features.variables {
            let sql = format!("SELECT {aggregate} FROM {}", d.events.table);
            let schema = expr::plan_schema(&ctx, &[(d.events.table.as_str(), events.clone())], &sql)
                .await
                .map_err(|e| self.fault(format!("features.variables.{name}"), e))?;
            if !schema.field(0).data_type().is_numeric() {
                return Err(self.fault(format!("features.variables.{name}"), format!("gives {}, not a number", schema.field(0).data_type())));
            }
        }

        let file = &d.features.sql;
        let sql = super::substitute(self.features_sql(), &vars);
        let features = expr::plan_schema(&ctx, &[(d.events.table.as_str(), events.clone())], &sql).await.map_err(|e| sql_fault(file, "(query)", e))?;
        let numeric = |name: &str, key: &str, file: &str| -> Result<(), PipelineError> {
            match features.field_with_name(name) {
                Ok(f) if f.data_type().is_numeric() => Ok(()),
                Ok(f) => Err(sql_fault(file, key, format!("`{name}` is {}, not a number", f.data_type()))),
                Err(_) => Err(sql_fault(file, key, format!("the query gives no column `{name}` (it gives {})", names(&features)))),
            }
        };
        for f in &d.features.names {
            numeric(f, &format!("feature {f}"), file)?;
        }
        let order: Vec<&str> = match &d.events.time {
            Some(t) => vec![t.as_str()],
            None => vec![KAFKA_PARTITION, KAFKA_OFFSET],
        };
        for col in order {
            if features.field_with_name(col).is_err() {
                return Err(sql_fault(file, "(query)", format!("the query must also give `{col}` (the event order), so the hold-out applies to its rows")));
            }
        }
        numeric(&d.models.classification.label, "models.classification.label", file)?;
        numeric(&d.models.regression.target, "models.regression.target", file)?;

        let mut lookups = Vec::new();
        for l in &d.lookups {
            let key = format!("lookup {}", l.name);
            let sql = super::substitute(self.sql_text(&l.sql), &vars);
            let schema = expr::plan_schema(&ctx, &[("features", features.clone())], &sql).await.map_err(|e| sql_fault(&l.sql, &key, e))?;
            if schema.fields().is_empty() || schema.field(0).name() != &l.key {
                return Err(sql_fault(&l.sql, &key, format!("the first column must be the key `{}`, found {}", l.key, names(&schema))));
            }
            lookups.push(schema);
        }

        let serving = self.serving_schema(&lookups);
        // Serving evaluates the final SELECT's expression of each feature on a request's row.
        let exprs = FeatureExprs::compile(self, serving.clone(), &vars).map_err(|(feature, e)| sql_fault(file, &format!("feature {feature}"), e))?;
        // Each round checks serving against the SQL on the SQL's own rows: they need every
        // column a serving row has.
        for f in serving.fields() {
            if features.field_with_name(f.name()).is_err() {
                return Err(sql_fault(
                    file,
                    "(query)",
                    format!("the query must also give `{}` so each round can check serving's features against it", f.name()),
                ));
            }
        }
        // A model may not read what it predicts, however the feature is written.
        let items = expr::final_select(self.features_sql()).unwrap_or_default();
        let targets = [
            ("models.classification", &d.models.classification.label, &d.models.classification.features),
            ("models.regression", &d.models.regression.target, &d.models.regression.features),
        ];
        for (key, target, uses) in targets {
            let text = items.get(target.as_str()).cloned().unwrap_or_else(|| target.clone());
            let read = expr::identifiers(&text);
            for (i, f) in d.features.names.iter().enumerate() {
                if uses.as_ref().is_some_and(|u| !u.contains(f)) {
                    continue;
                }
                if let Some(col) = exprs.columns_used(i).iter().find(|c| read.contains(*c) || *c == target) {
                    return Err(self.fault(
                        format!("{key}.features"),
                        format!("feature `{f}` reads `{col}`, which `{target}` is computed from: the target would leak into the model"),
                    ));
                }
            }
        }
        let c = &d.models.clustering;
        if let Some(i) = d.lookups.iter().position(|l| l.name == c.entity) {
            // A lookup entity is profiled on its own state alone.
            for f in &c.profile {
                exprs.uses_only(f, &lookups[i]).map_err(|e| self.fault("models.clustering.profile", format!("`{f}`: {e}")))?;
            }
        }
        if let Some(figures) = &c.figures {
            let schema = Arc::new(Schema::new(c.profile.iter().map(|f| Field::new(f, DataType::Float64, false)).collect::<Vec<_>>()));
            expr::compile_text(figures, schema, &vars).map_err(|e| self.fault("models.clustering.figures", e))?;
        }
        Ok(Checked { features, lookups, serving })
    }

    /// The Arrow schema of the lake's batch files: the event columns, then the Kafka position.
    pub fn lake_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self.definition.events.columns.iter().map(|c| Field::new(&c.name, arrow_type(c.kind), false)).collect();
        fields.push(Field::new(KAFKA_PARTITION, DataType::Int32, false));
        fields.push(Field::new(KAFKA_OFFSET, DataType::Int64, false));
        Arc::new(Schema::new(fields))
    }

    /// The row serving builds for a request: the request fields, then each lookup's state
    /// columns (all but its key).
    pub fn serving_schema(&self, lookups: &[SchemaRef]) -> SchemaRef {
        let mut fields: Vec<Field> =
            self.definition.request.fields.iter().filter_map(|f| self.column(f)).map(|c| Field::new(&c.name, arrow_type(c.kind), false)).collect();
        for schema in lookups {
            fields.extend(schema.fields().iter().skip(1).map(|f| Field::new(f.name(), f.data_type().clone(), false)));
        }
        Arc::new(Schema::new(fields))
    }
}

/// The Arrow type of a column type.
pub fn arrow_type(kind: super::ColumnType) -> DataType {
    match kind {
        super::ColumnType::Int64 => DataType::Int64,
        super::ColumnType::Float64 => DataType::Float64,
        super::ColumnType::String => DataType::Utf8,
    }
}

fn names(schema: &Schema) -> String {
    schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn movielens_with(edit: impl Fn(&mut Pipeline)) -> Pipeline {
        let mut p = Pipeline::builtin("movielens").unwrap().unwrap();
        edit(&mut p);
        p
    }

    #[tokio::test]
    async fn the_shipped_pipelines_pass_the_sql_checks() {
        for name in Pipeline::builtin_names() {
            let p = Pipeline::builtin(name).unwrap().unwrap();
            let checked = p.check_sql().await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(checked.lookups.len(), p.definition.lookups.len());
        }
    }

    #[tokio::test]
    async fn the_test_only_pipeline_passes_from_its_folder() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pipelines/bike-rentals");
        let p = Pipeline::load(&dir).unwrap_or_else(|e| panic!("{e}"));
        let checked = p.check_sql().await.unwrap_or_else(|e| panic!("{e}"));
        let serving: Vec<&str> = checked.serving.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(serving, ["station_id", "ts", "temperature", "is_weekend", "weather", "s_n", "s_sum"]);
    }

    #[tokio::test]
    async fn each_fault_names_the_file_the_key_and_the_fault() {
        let unknown = movielens_with(|p| p.definition.events.key = "uid".into());
        let err = unknown.check_static().unwrap_err();
        assert_eq!((err.key.as_str(), err.fault.as_str()), ("events.key", "unknown column `uid`"));

        let missing = movielens_with(|p| p.definition.models.regression.target = "stars".into());
        let err = missing.check_sql().await.unwrap_err();
        assert!(err.file.ends_with("features.sql") && err.key == "models.regression.target" && err.fault.contains("no column `stars`"), "{err}");

        let broken = movielens_with(|p| {
            p.sql.insert("features.sql".into(), "SELEC user_id FROM ratings".into());
        });
        let err = broken.check_sql().await.unwrap_err();
        assert!(err.file.ends_with("features.sql"), "{err}");

        let typed = movielens_with(|p| {
            let sql = p.features_sql().replace("LN(1.0 + u_n) AS u_log_n", "'many' AS u_log_n");
            p.sql.insert("features.sql".into(), sql);
        });
        let err = typed.check_sql().await.unwrap_err();
        assert!(err.key == "feature u_log_n" && err.fault.contains("not a number"), "{err}");

        let leak = movielens_with(|p| {
            let sql = p.features_sql().replace("LN(1.0 + u_n) AS u_log_n", "rating AS u_log_n");
            p.sql.insert("features.sql".into(), sql);
        });
        let err = leak.check_sql().await.unwrap_err();
        assert!(err.fault.contains("cannot be computed from a serving row") || err.fault.contains("leak"), "{err}");
    }
}
