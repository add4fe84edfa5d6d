//! Hand-made rounds for the API's own tests: small, with coefficients chosen so that answers
//! can be worked out by hand. (The end-to-end tests use rounds from the real trainer.)

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use lensflow_core::model::{
    self, ARTIFACT_FORMAT_VERSION, FEATURES, LATEST, LatestPointer, Lineage, LinearModel,
    MODEL_FILE, MOVIES_FILE, ModelArtifact, Priors, RoundMetrics, Scaling, Segment, Segmentation,
    SideStats, USERS_FILE, round_dir, sha256_hex,
};

/// Priors of every fixture round.
pub const PRIORS: Priors = Priors {
    mean: 3.5,
    var: 1.0,
    liked: 0.5,
};

/// Users 1 (rates high) and 2 (rates low), ten ratings each.
pub fn users() -> Vec<(i64, SideStats)> {
    vec![
        (
            1,
            SideStats {
                n: 10.0,
                sum: 45.0,
                sumsq: 203.0,
                liked: 9.0,
                resid: 5.0,
                ts: 1_000_000.0,
            },
        ),
        (
            2,
            SideStats {
                n: 10.0,
                sum: 15.0,
                sumsq: 25.0,
                liked: 0.0,
                resid: -10.0,
                ts: 2_000_000.0,
            },
        ),
    ]
}

/// Movie 31 (well liked), twenty ratings.
pub fn movies() -> Vec<(i64, SideStats)> {
    vec![(
        31,
        SideStats {
            n: 20.0,
            sum: 90.0,
            sumsq: 410.0,
            liked: 18.0,
            resid: 4.0,
            ts: 500_000.0,
        },
    )]
}

/// A round whose regression predicts the movie's shrunk mean plus `round / 100` (so rounds are
/// told apart by their answers), whose classifier is `sigmoid(2·(u_mean − 3.5))`, and whose two
/// segments split users by mean rating.
pub fn artifact(round: u64) -> ModelArtifact {
    let n = FEATURES.len();
    let identity = Scaling {
        mean: vec![0.0; n],
        scale: vec![1.0; n],
    };
    let mut regression = LinearModel {
        intercept: round as f64 / 100.0,
        coefficients: vec![0.0; n],
    };
    regression.coefficients[7] = 1.0;
    let mut classification = LinearModel {
        intercept: -7.0,
        coefficients: vec![0.0; n],
    };
    classification.coefficients[1] = 2.0;
    let segment = |id: usize, mean: f64, description: &str| Segment {
        id,
        centroid: vec![1.0, mean, 1.0, 0.5],
        profile: BTreeMap::from([("u_mean".to_string(), mean)]),
        size: 1,
        description: description.into(),
    };
    ModelArtifact {
        format_version: ARTIFACT_FORMAT_VERSION,
        feature_fingerprint: model::feature_fingerprint(),
        round,
        created_at_ms: 1_700_000_000_000 + round as i64,
        features: FEATURES.iter().map(|s| s.to_string()).collect(),
        priors: PRIORS,
        scaling: identity,
        regression,
        classification,
        segmentation: Segmentation {
            scaling: Scaling {
                mean: vec![0.0; 4],
                scale: vec![1.0; 4],
            },
            segments: vec![
                segment(0, 2.0, "raters who rate low"),
                segment(1, 4.5, "raters who rate high"),
            ],
        },
        metrics: RoundMetrics {
            train_rows: 30 * round,
            rmse: 1.0 - round as f64 / 10.0,
            rmse_baseline: 1.1,
            auc: 0.7,
            ..Default::default()
        },
        lineage: Lineage {
            batches: (1..=round).collect(),
            ..Default::default()
        },
        checksums: BTreeMap::new(),
    }
}

fn side_table(rows: &[(i64, SideStats)]) -> Vec<u8> {
    let names = ["id", "n", "sum", "sumsq", "liked", "resid", "ts"];
    let schema = Arc::new(Schema::new(
        names
            .map(|c| {
                Field::new(
                    c,
                    if c == "id" {
                        DataType::Int64
                    } else {
                        DataType::Float64
                    },
                    false,
                )
            })
            .to_vec(),
    ));
    let f = |get: fn(&SideStats) -> f64| {
        Arc::new(Float64Array::from(
            rows.iter().map(|(_, s)| get(s)).collect::<Vec<_>>(),
        )) as ArrayRef
    };
    let columns = vec![
        Arc::new(Int64Array::from(
            rows.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        )) as ArrayRef,
        f(|s| s.n),
        f(|s| s.sum),
        f(|s| s.sumsq),
        f(|s| s.liked),
        f(|s| s.resid),
        f(|s| s.ts),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

/// Writes round `round` into the store folder `models` and points `LATEST` at it, as the
/// trainer does (files first, `LATEST` last). Returns the pointer.
pub fn publish(models: &Path, round: u64) -> LatestPointer {
    let dir = models.join(round_dir(round));
    std::fs::create_dir_all(&dir).unwrap();
    let mut a = artifact(round);
    for (file, rows) in [(USERS_FILE, users()), (MOVIES_FILE, movies())] {
        let bytes = side_table(&rows);
        a.checksums.insert(file.to_string(), sha256_hex(&bytes));
        std::fs::write(dir.join(file), bytes).unwrap();
    }
    let json = serde_json::to_vec_pretty(&a).unwrap();
    std::fs::write(dir.join(MODEL_FILE), &json).unwrap();
    let pointer = LatestPointer {
        round,
        path: round_dir(round),
        model_sha256: sha256_hex(&json),
    };
    std::fs::write(models.join(LATEST), serde_json::to_vec(&pointer).unwrap()).unwrap();
    pointer
}
