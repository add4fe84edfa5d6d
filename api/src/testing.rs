//! Hand-made rounds of the real pipelines for the API's own tests: the shipped definitions
//! (`Pipeline::builtin`), with tiny lookup tables and coefficients chosen so that answers can be
//! worked out by hand. (The end-to-end tests use rounds from the real trainer.)

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use lensflow_core::Pipeline;
use lensflow_core::model::{
    ARTIFACT_FORMAT_VERSION, LATEST, LatestPointer, Lineage, LinearModel, LookupTable, MODEL_FILE, ModelArtifact, RoundMetrics, Scaling, Segment, Segmentation,
    lookup_file, round_dir, sha256_hex,
};

/// A shipped pipeline.
pub fn pipeline(name: &str) -> Pipeline {
    Pipeline::builtin(name).expect("a shipped pipeline").expect("it loads")
}

/// Users 1 (rates high) and 2 (rates low), ten ratings each:
/// `user_id, u_n, u_sum, u_sumsq, u_liked_n, u_resid_a, u_resid_b, u_ts` (a residual sum is
/// `a - prior_mean * b`; `b` is 0 here, so the sums are the prior's).
pub const USERS: [[f64; 8]; 2] = [[1.0, 10.0, 45.0, 203.0, 9.0, 5.0, 0.0, 1_000_000.0], [2.0, 10.0, 15.0, 25.0, 0.0, -10.0, 0.0, 2_000_000.0]];
/// Movie 31 (well liked), twenty ratings: `movie_id, m_n, m_sum, m_sumsq, m_liked_n, m_resid_a, m_resid_b, m_ts`.
pub const MOVIES: [[f64; 8]; 1] = [[31.0, 20.0, 90.0, 410.0, 18.0, 4.0, 0.0, 500_000.0]];
/// What a MovieLens request's `timestamp` defaults to: the newest rating the round saw.
pub const NEWEST_TS: f64 = 2_000_000.0;

fn identity(n: usize) -> Scaling {
    Scaling { mean: vec![0.0; n], scale: vec![1.0; n] }
}

fn position(p: &Pipeline, feature: &str) -> usize {
    p.features().iter().position(|f| f == feature).unwrap_or_else(|| panic!("no feature {feature}"))
}

/// A linear model over `uses` with every coefficient 0 except those in `set`.
fn linear(p: &Pipeline, uses: &[usize], intercept: f64, set: &[(&str, f64)]) -> LinearModel {
    let coefficients = uses.iter().map(|&i| set.iter().find(|(f, _)| *f == p.features()[i]).map(|(_, c)| *c).unwrap_or(0.0)).collect();
    LinearModel { uses: uses.to_vec(), intercept, coefficients }
}

fn segment(id: usize, centroid: Vec<f64>, profile: &[String], description: &str) -> Segment {
    Segment { id, profile: profile.iter().cloned().zip(centroid.iter().copied()).collect(), centroid, size: 10 + id as u64, description: description.into() }
}

fn artifact(p: Pipeline, round: u64, variables: BTreeMap<String, f64>, defaults: BTreeMap<String, f64>) -> ModelArtifact {
    let n = p.features().len();
    let k = p.definition.models.clustering.profile.len();
    ModelArtifact {
        format_version: ARTIFACT_FORMAT_VERSION,
        fingerprint: p.fingerprint(),
        round,
        created_at_ms: 1_700_000_000_000 + round as i64,
        features: p.features().to_vec(),
        variables,
        defaults,
        scaling: identity(n),
        regression: LinearModel { uses: vec![], intercept: 0.0, coefficients: vec![] },
        classification: LinearModel { uses: vec![], intercept: 0.0, coefficients: vec![] },
        segmentation: Segmentation { profile: p.definition.models.clustering.profile.clone(), scaling: identity(k), segments: vec![] },
        metrics: RoundMetrics {
            train_rows: 30 * round,
            test_rows: 10,
            rmse: 1.0 - round as f64 / 10.0,
            rmse_baseline: 1.1,
            auc: 0.7,
            auc_baseline: 0.5,
            accuracy: 0.7,
            accuracy_baseline: 0.6,
            ..Default::default()
        },
        lineage: Lineage { batches: (1..=round).collect(), ..Default::default() },
        lookups: vec![],
        checksums: BTreeMap::new(),
        pipeline: p,
    }
}

/// A MovieLens round whose regression predicts the movie's shrunk mean `m_mean` plus
/// `round / 100` (so rounds are told apart by their answers), whose classifier is
/// `sigmoid(2·(u_mean − 3.5))`, and whose two segments split users by `u_mean` (2 and 4.5).
/// Priors: mean 3.5, variance 1, liked 0.5; shrink 5.
pub fn movielens(round: u64) -> ModelArtifact {
    let p = pipeline("movielens");
    let all: Vec<usize> = (0..p.features().len()).collect();
    let vars = BTreeMap::from([("shrink", 5.0), ("prior_mean", 3.5), ("prior_var", 1.0), ("prior_liked", 0.5)].map(|(k, v)| (k.to_string(), v)));
    let mut a = artifact(p.clone(), round, vars, BTreeMap::from([("ts".to_string(), NEWEST_TS)]));
    a.regression = linear(&p, &all, round as f64 / 100.0, &[("m_mean", 1.0)]);
    a.classification = linear(&p, &all, -7.0, &[("u_mean", 2.0)]);
    let profile = a.segmentation.profile.clone();
    a.segmentation.segments =
        vec![segment(0, vec![1.0, 2.0, 1.0, 0.5], &profile, "raters who rate low"), segment(1, vec![1.0, 4.5, 1.0, 0.5], &profile, "raters who rate high")];
    a
}

/// A smart-home round: classification `sigmoid(−1.5 + 2·low_energy + young)`; regression (of
/// incidents) `0.5 + round/100 + 0.1·usage_hours + is_camera`, clipped to 0..4; two segments on
/// the raw profile (usage hours, kWh, age, malfunctions): light use `[4, 3, 30, 0]`, heavy use
/// `[20, 8, 30, 0]`.
pub fn smart_home(round: u64) -> ModelArtifact {
    let p = pipeline("smart-home");
    let all: Vec<usize> = (0..p.features().len()).collect();
    let reg: Vec<usize> = p.definition.models.regression.features.clone().unwrap_or_default().iter().map(|f| position(&p, f)).collect();
    let mut a = artifact(p.clone(), round, BTreeMap::new(), BTreeMap::new());
    a.classification = linear(&p, &all, -1.5, &[("low_energy", 2.0), ("young", 1.0)]);
    a.regression = linear(&p, &reg, 0.5 + round as f64 / 100.0, &[("usage_hours", 0.1), ("is_camera", 1.0)]);
    let profile = a.segmentation.profile.clone();
    a.segmentation.segments =
        vec![segment(0, vec![4.0, 3.0, 30.0, 0.0], &profile, "lightly used"), segment(1, vec![20.0, 8.0, 30.0, 0.0], &profile, "heavily used")];
    a
}

/// A lookup table as the trainer writes it: the key (int64), then float64 state columns.
pub fn lookup_table(columns: &[&str], rows: &[[f64; 8]]) -> Vec<u8> {
    let fields: Vec<Field> = columns.iter().enumerate().map(|(i, c)| Field::new(*c, if i == 0 { DataType::Int64 } else { DataType::Float64 }, true)).collect();
    let schema = Arc::new(Schema::new(fields));
    let arrays: Vec<ArrayRef> = (0..columns.len())
        .map(|i| -> ArrayRef {
            if i == 0 {
                Arc::new(Int64Array::from(rows.iter().map(|r| r[0] as i64).collect::<Vec<_>>()))
            } else {
                Arc::new(Float64Array::from(rows.iter().map(|r| r[i]).collect::<Vec<_>>()))
            }
        })
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

/// The lookup tables of a round of `pipeline`: (name, Parquet bytes, rows).
pub fn tables(pipeline: &str) -> Vec<(&'static str, Vec<u8>, u64)> {
    match pipeline {
        "movielens" => vec![
            ("user", lookup_table(&["user_id", "u_n", "u_sum", "u_sumsq", "u_liked_n", "u_resid_a", "u_resid_b", "u_ts"], &USERS), USERS.len() as u64),
            ("movie", lookup_table(&["movie_id", "m_n", "m_sum", "m_sumsq", "m_liked_n", "m_resid_a", "m_resid_b", "m_ts"], &MOVIES), MOVIES.len() as u64),
        ],
        _ => vec![],
    }
}

/// Writes `artifact` with `tables` as a round into the model store `models` (in the folder of
/// the artifact's pipeline) and points that pipeline's `LATEST` at it, as the trainer does
/// (files first, `LATEST` last). Returns the pointer.
pub fn publish_artifact(models: &Path, mut a: ModelArtifact, tables: Vec<(&str, Vec<u8>, u64)>) -> LatestPointer {
    let store = models.join(a.pipeline.name());
    let dir = store.join(round_dir(a.round));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes, rows) in tables {
        let file = lookup_file(name);
        a.checksums.insert(file.clone(), sha256_hex(&bytes));
        a.lookups.push(LookupTable { name: name.to_string(), file: file.clone(), rows });
        std::fs::write(dir.join(file), bytes).unwrap();
    }
    let json = serde_json::to_vec_pretty(&a).unwrap();
    std::fs::write(dir.join(MODEL_FILE), &json).unwrap();
    let pointer = LatestPointer { round: a.round, path: round_dir(a.round), model_sha256: sha256_hex(&json) };
    std::fs::write(store.join(LATEST), serde_json::to_vec(&pointer).unwrap()).unwrap();
    pointer
}

/// Publishes the hand-made round `round` of `pipeline` (`movielens` or `smart-home`).
pub fn publish(models: &Path, pipeline: &str, round: u64) -> LatestPointer {
    let a = if pipeline == "movielens" { movielens(round) } else { smart_home(round) };
    publish_artifact(models, a, tables(pipeline))
}
