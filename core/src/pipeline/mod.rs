//! Pipelines as data: a folder with `pipeline.toml` and SQL files, loaded and checked once here.
//!
//! - [`definition`]: the definition file as typed structs.
//! - [`event`]: one event from a CSV record or a Kafka payload, checked against the columns,
//!   and a batch of them as Arrow columns (the lake's schema).
//! - [`expr`]: the feature SQL's final SELECT, compiled once into expressions that serving,
//!   the per-round drift check and the segment profiles evaluate on Arrow rows.
//! - [`check`]: the checks `lensflow pipelines check` runs (and every command runs before it
//!   opens a connection): names, types, and the SQL planned against the declared columns.
//!
//! ```text
//! pipeline.toml + *.sql ─▶ Pipeline::load ─▶ check (static, then SQL planned on empty tables)
//!        │                                       │
//!        ├─▶ event: CSV / JSON ─▶ Arrow batch     └─▶ expr: features for serving and checks
//!        └─▶ stored whole in every round's artifact, so serving needs only the model store
//! ```
//!
//! Nothing downstream matches on a pipeline's name: ingest, training and serving read only
//! what a [`Pipeline`] says.

pub mod check;
pub mod definition;
pub mod event;
pub mod expr;
pub mod incremental;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use definition::{ColumnType, Definition};

use crate::model::sha256_hex;

/// The file every pipeline folder holds.
pub const DEFINITION_FILE: &str = "pipeline.toml";
/// The pipeline commands use when none is named.
pub const DEFAULT_PIPELINE: &str = "movielens";
/// `clustering.entity` when each event is its own entity.
pub const EVENT_ENTITY: &str = "event";
/// The lake columns every pipeline's batch files carry after the event's own.
pub const KAFKA_PARTITION: &str = "kafka_partition";
/// The Kafka offset column (also the arrival order of a pipeline without a time column).
pub const KAFKA_OFFSET: &str = "kafka_offset";

/// The pipelines shipped inside the binary: (folder name, files).
const BUILTIN: &[(&str, &[(&str, &str)])] = &[
    (
        "movielens",
        &[
            ("pipeline.toml", include_str!("../../../pipelines/movielens/pipeline.toml")),
            ("features.sql", include_str!("../../../pipelines/movielens/features.sql")),
            ("lookup_user.sql", include_str!("../../../pipelines/movielens/lookup_user.sql")),
            ("lookup_movie.sql", include_str!("../../../pipelines/movielens/lookup_movie.sql")),
        ],
    ),
    (
        "smart-home",
        &[
            ("pipeline.toml", include_str!("../../../pipelines/smart-home/pipeline.toml")),
            ("features.sql", include_str!("../../../pipelines/smart-home/features.sql")),
        ],
    ),
];

/// Why a pipeline cannot be used: the file, the key within it, and the fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {key}: {fault}")]
pub struct PipelineError {
    /// The file at fault (`pipelines/x/pipeline.toml`, `…/features.sql`).
    pub file: String,
    /// The key or the part of the file (`models.regression.target`, `feature u_mean`).
    pub key: String,
    /// What is wrong.
    pub fault: String,
}

/// A loaded and checked pipeline: the definition plus the text of every SQL file it names.
/// Rounds store it whole, so a server can answer for a pipeline it has never seen a folder of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// The definition.
    pub definition: Definition,
    /// SQL file name (as the definition names it) → its text.
    pub sql: BTreeMap<String, String>,
    /// Where it was loaded from (a folder, or `built-in`); for error messages.
    #[serde(skip)]
    pub source: String,
}

impl Pipeline {
    /// The names of the pipelines shipped inside the binary.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(name, _)| *name).collect()
    }

    /// A pipeline shipped inside the binary.
    pub fn builtin(name: &str) -> Option<Result<Pipeline, PipelineError>> {
        let (_, files) = BUILTIN.iter().find(|(n, _)| *n == name)?;
        let source = format!("built-in pipelines/{name}");
        Some(Pipeline::from_files(&source, |file| {
            files.iter().find(|(f, _)| *f == file).map(|(_, text)| text.to_string()).ok_or_else(|| "no such file".to_string())
        }))
    }

    /// `--pipeline NAME|PATH`: a folder (or its `pipeline.toml`) when the argument names one
    /// that exists or contains a `/`, else a built-in pipeline by name.
    pub fn resolve(arg: &str) -> Result<Pipeline, PipelineError> {
        let path = Path::new(arg);
        if path.exists() || arg.contains('/') {
            return Pipeline::load(path);
        }
        Pipeline::builtin(arg).unwrap_or_else(|| {
            Err(PipelineError {
                file: arg.to_string(),
                key: "--pipeline".into(),
                fault: format!("no such folder and no built-in pipeline of that name (built in: {})", Pipeline::builtin_names().join(", ")),
            })
        })
    }

    /// Loads the pipeline in folder `path` (or from the `pipeline.toml` it names) and runs the
    /// static checks.
    pub fn load(path: &Path) -> Result<Pipeline, PipelineError> {
        let dir: PathBuf = if path.is_file() { path.parent().map(Path::to_path_buf).unwrap_or_default() } else { path.to_path_buf() };
        let source = dir.display().to_string();
        Pipeline::from_files(&source, |file| std::fs::read_to_string(dir.join(file)).map_err(|e| e.to_string()))
    }

    fn from_files(source: &str, read: impl Fn(&str) -> Result<String, String>) -> Result<Pipeline, PipelineError> {
        let def_file = format!("{source}/{DEFINITION_FILE}");
        let text = read(DEFINITION_FILE).map_err(|fault| PipelineError { file: def_file.clone(), key: "(file)".into(), fault })?;
        let definition: Definition = toml::from_str(&text).map_err(|e| PipelineError {
            file: def_file.clone(),
            key: e.span().map(|s| format!("line {}", line_of(&text, s.start))).unwrap_or_else(|| "(file)".into()),
            fault: e.message().to_string(),
        })?;
        let mut sql = BTreeMap::new();
        let files = std::iter::once(("features.sql".to_string(), definition.features.sql.clone()))
            .chain(definition.lookups.iter().enumerate().map(|(i, l)| (format!("lookups[{i}].sql"), l.sql.clone())));
        for (key, file) in files {
            let text = read(&file).map_err(|fault| PipelineError { file: format!("{source}/{file}"), key, fault })?;
            sql.insert(file, text);
        }
        let pipeline = Pipeline { definition, sql, source: source.to_string() };
        pipeline.check_static()?;
        Ok(pipeline)
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.definition.name
    }

    /// The Kafka topic.
    pub fn topic(&self) -> &str {
        self.definition.events.topic.as_deref().unwrap_or(&self.definition.name)
    }

    /// The text of an SQL file the definition names.
    pub fn sql_text(&self, file: &str) -> &str {
        self.sql.get(file).map(String::as_str).unwrap_or("")
    }

    /// The feature SQL's text.
    pub fn features_sql(&self) -> &str {
        self.sql_text(&self.definition.features.sql)
    }

    /// Whether the feature SQL can be computed a batch at a time, carrying state from round
    /// to round, and what that takes; or why not.
    pub fn incremental_shape(&self) -> Result<incremental::Shape, String> {
        let d = &self.definition;
        let columns: Vec<String> = self.lake_schema().fields().iter().map(|f| f.name().clone()).collect();
        let round: Vec<String> = d.features.variables.keys().cloned().collect();
        incremental::shape(self.features_sql(), &d.events.table, &columns, d.events.time.as_deref(), &round)
    }

    /// The model features, in coefficient order.
    pub fn features(&self) -> &[String] {
        &self.definition.features.names
    }

    /// A fingerprint of the whole definition and its SQL: changes whenever either does.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// An event column by name.
    pub fn column(&self, name: &str) -> Option<&definition::Column> {
        self.definition.events.columns.iter().find(|c| c.name == name)
    }

    /// The column that orders events in time: the time column, or the Kafka offset.
    pub fn order_column(&self) -> &str {
        self.definition.events.time.as_deref().unwrap_or(KAFKA_OFFSET)
    }

    /// The file a problem in the definition is reported against.
    pub fn definition_file(&self) -> String {
        format!("{}/{DEFINITION_FILE}", self.source)
    }

    /// The file an SQL file is reported as.
    pub fn sql_file(&self, file: &str) -> String {
        format!("{}/{file}", self.source)
    }

    fn fault(&self, key: impl Into<String>, fault: impl Into<String>) -> PipelineError {
        PipelineError { file: self.definition_file(), key: key.into(), fault: fault.into() }
    }
}

/// Replaces every `${name}` in `sql` by its value (Spark's variable substitution syntax).
pub fn substitute(sql: &str, vars: &BTreeMap<String, f64>) -> String {
    vars.iter().fold(sql.to_string(), |sql, (k, v)| sql.replace(&format!("${{{k}}}"), &format!("{v:?}")))
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_pipelines_load() {
        for name in Pipeline::builtin_names() {
            let p = Pipeline::builtin(name).unwrap().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(p.name(), name);
            assert!(!p.features().is_empty());
        }
        assert_eq!(Pipeline::resolve("movielens").unwrap().topic(), "ratings");
        let err = Pipeline::resolve("nope").unwrap_err();
        assert!(err.fault.contains("movielens, smart-home"), "{err}");
    }

    #[test]
    fn a_typo_in_the_definition_names_the_line() {
        let text = include_str!("../../../pipelines/movielens/pipeline.toml").replace("[holdout]\n", "[holdout]\nnewst = 0.3\n");
        let err = Pipeline::from_files("x", |f| if f == DEFINITION_FILE { Ok(text.clone()) } else { Ok(String::new()) }).unwrap_err();
        assert_eq!(err.file, "x/pipeline.toml");
        assert!(err.key.starts_with("line "), "{err}");
        assert!(err.fault.contains("newst"), "{err}");
    }

    #[test]
    fn variables_are_substituted_spark_style() {
        let vars = BTreeMap::from([("a".to_string(), 1.0), ("b".to_string(), 2.5)]);
        assert_eq!(substitute("SELECT ${a} + ${b}", &vars), "SELECT 1.0 + 2.5");
    }
}
