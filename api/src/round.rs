//! A trained round, loaded for serving: the artifact checked against `LATEST`, the lookup tables
//! checked against the artifact, and the one function that answers a request with it.
//!
//! Feature rows come from [`lensflow_core::model::feature_row`], the function the trainer
//! checks its SQL against, so a served prediction is the training formula applied to the
//! statistics "now".

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{Array, Float64Array, Int64Array, RecordBatch};
use bytes::Bytes;
use lensflow_core::model::{
    self, ARTIFACT_FORMAT_VERSION, FEATURES, LatestPointer, MODEL_FILE, MOVIES_FILE, ModelArtifact,
    SEGMENT_FEATURES, SideStats, USERS_FILE, feature_range, sha256_hex,
};
use lensflow_core::predict::{FieldError, PredictRequest, Prediction, RoundSummary, ServingRound};
use lensflow_jobs::JobError;
use lensflow_jobs::lake::Lake;
use object_store::path::Path;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rustc_hash::FxHashMap;

use crate::ApiError;

/// Which model(s) a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Liked or not.
    Classification,
    /// The rating.
    Regression,
    /// The user's segment.
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

    fn needs_movie(self) -> bool {
        self != Task::Clustering
    }
}

/// Suggestions listed by `GET /models`: this many of the most active users and movies.
const SAMPLE_IDS: usize = 20;
/// Latest plausible rating time (2100-01-01), to catch milliseconds sent as seconds.
const MAX_TS: f64 = 4_102_444_800.0;

/// A round ready to answer requests.
#[derive(Debug)]
pub struct LoadedRound {
    /// What `LATEST` said when it was loaded.
    pub pointer: LatestPointer,
    /// The artifact.
    pub artifact: ModelArtifact,
    users: FxHashMap<i64, SideStats>,
    movies: FxHashMap<i64, SideStats>,
    /// The newest rating time the round saw: what `ts` defaults to.
    pub default_ts: f64,
    /// When this server loaded it (unix milliseconds).
    pub loaded_at_ms: i64,
    sample_users: Vec<i64>,
    sample_movies: Vec<i64>,
    /// Every round in the store up to this one, oldest first.
    pub history: Arc<Vec<RoundSummary>>,
}

impl LoadedRound {
    /// Loads and checks the round `pointer` names: `model.json` against the pointer's checksum,
    /// format version and feature fingerprint; each lookup table against the artifact's checksum
    /// and the expected schema. Any mismatch refuses the round.
    pub async fn load(store: &Lake, pointer: &LatestPointer) -> Result<LoadedRound, ApiError> {
        let bad = |path: &str, reason: String| ApiError::BadRound {
            round: pointer.round,
            path: store.url_of(path),
            reason,
        };
        let model_path = format!("{}/{MODEL_FILE}", pointer.path);
        let bytes = fetch(store, &model_path, pointer.round).await?;
        let sum = sha256_hex(&bytes);
        if sum != pointer.model_sha256 {
            return Err(bad(
                &model_path,
                format!("SHA-256 is {sum}, LATEST says {}", pointer.model_sha256),
            ));
        }
        let artifact: ModelArtifact =
            serde_json::from_slice(&bytes).map_err(|e| bad(&model_path, e.to_string()))?;
        check_artifact(&artifact, pointer).map_err(|reason| bad(&model_path, reason))?;
        let mut tables = Vec::with_capacity(2);
        for file in [USERS_FILE, MOVIES_FILE] {
            let path = format!("{}/{file}", pointer.path);
            let bytes = fetch(store, &path, pointer.round).await?;
            let expected = artifact
                .checksums
                .get(file)
                .ok_or_else(|| bad(&model_path, format!("no checksum for {file}")))?;
            let sum = sha256_hex(&bytes);
            if &sum != expected {
                return Err(bad(
                    &path,
                    format!("SHA-256 is {sum}, model.json says {expected}"),
                ));
            }
            tables.push(read_side_table(bytes).map_err(|reason| bad(&path, reason))?);
        }
        let movies = tables.pop().unwrap_or_default();
        let users = tables.pop().unwrap_or_default();
        let default_ts = users.values().map(|s| s.ts).fold(0.0, f64::max);
        Ok(LoadedRound {
            pointer: pointer.clone(),
            sample_users: most_active(&users),
            sample_movies: most_active(&movies),
            artifact,
            users,
            movies,
            default_ts,
            loaded_at_ms: lensflow_core::now_ms(),
            history: Arc::new(Vec::new()),
        })
    }

    /// The round number.
    pub fn round(&self) -> u64 {
        self.artifact.round
    }

    /// This round's line in the list of rounds.
    pub fn summary(&self) -> RoundSummary {
        summary(&self.artifact, &self.pointer.path)
    }

    /// The round in detail, for `GET /models`.
    pub fn describe(&self) -> ServingRound {
        let a = &self.artifact;
        ServingRound {
            summary: self.summary(),
            model_sha256: self.pointer.model_sha256.clone(),
            loaded_at_ms: self.loaded_at_ms,
            lineage: a.lineage.clone(),
            features: a.features.clone(),
            priors: a.priors,
            segments: a.segmentation.segments.clone(),
            users: self.users.len() as u64,
            movies: self.movies.len() as u64,
            sample_users: self.sample_users.clone(),
            sample_movies: self.sample_movies.clone(),
            default_ts: self.default_ts,
        }
    }

    /// Answers one request. `at` prefixes field names in errors (`[3].` inside a batch).
    pub fn predict(
        &self,
        req: &PredictRequest,
        task: Task,
        at: &str,
    ) -> Result<Prediction, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |field: &str, message: String| {
            errors.push(FieldError {
                field: format!("{at}{field}"),
                message,
            })
        };
        for (field, id) in [("userId", req.user_id), ("movieId", req.movie_id)] {
            if let Some(id) = id.filter(|id| *id < 1) {
                err(field, format!("must be a positive id, got {id}"));
            }
        }
        let now = match req.ts {
            None => self.default_ts,
            Some(ts) if (0.0..=MAX_TS).contains(&ts) => ts,
            Some(ts) => {
                err(
                    "ts",
                    format!("must be unix seconds between 0 and {MAX_TS} (year 2100), got {ts}"),
                );
                self.default_ts
            }
        };
        let overrides = req.features.clone().unwrap_or_default();
        for (name, value) in &overrides {
            match feature_range(name) {
                None => err(
                    &format!("features.{name}"),
                    format!("unknown feature; the features are {}", FEATURES.join(", ")),
                ),
                Some((lo, hi)) if !(lo..=hi).contains(value) => err(
                    &format!("features.{name}"),
                    format!("must be between {lo} and {hi}, got {value}"),
                ),
                Some(_) => {}
            }
        }
        // Without an id, the side's features must all be given: there is nothing to build them from.
        let user_needs: &[&str] = if task == Task::Clustering {
            &SEGMENT_FEATURES
        } else {
            &FEATURES[..6]
        };
        let sides = [
            ("userId", req.user_id, user_needs),
            (
                "movieId",
                req.movie_id,
                if task.needs_movie() {
                    &FEATURES[6..]
                } else {
                    &[]
                },
            ),
        ];
        for (field, id, needs) in sides {
            let missing: Vec<&str> = needs
                .iter()
                .copied()
                .filter(|f| !overrides.contains_key(*f))
                .collect();
            if id.is_none() && !missing.is_empty() {
                err(
                    field,
                    format!(
                        "missing: give {field}, or these features: {}",
                        missing.join(", ")
                    ),
                );
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let user = req.user_id.and_then(|id| self.users.get(&id));
        let movie = req.movie_id.and_then(|id| self.movies.get(&id));
        let a = &self.artifact;
        let mut row = model::feature_row(
            &user.copied().unwrap_or_default(),
            &movie.copied().unwrap_or_default(),
            &a.priors,
            now,
        );
        for (i, name) in FEATURES.iter().enumerate() {
            if let Some(v) = overrides.get(*name) {
                row[i] = *v;
            }
        }
        let mut answer = Prediction {
            user_id: req.user_id,
            movie_id: req.movie_id,
            round: a.round,
            known_user: user.is_some(),
            known_movie: movie.is_some(),
            features: FEATURES
                .iter()
                .zip(row)
                .map(|(n, v)| (n.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        };
        let z = a.scaling.apply(&row);
        if matches!(task, Task::Classification | Task::All) {
            let p = 1.0 / (1.0 + (-a.classification.score(&z)).exp());
            answer.probability_like = Some(p);
            answer.prediction_like = Some(u8::from(p >= 0.5));
        }
        if matches!(task, Task::Regression | Task::All) {
            let rating = a.regression.score(&z).clamp(0.5, 5.0);
            answer.predicted_rating = Some((rating * 100.0).round() / 100.0);
        }
        if matches!(task, Task::Clustering | Task::All) {
            // The segment features are the first four of the user's side of the row.
            if let Some(segment) = a.segmentation.assign(&row[..SEGMENT_FEATURES.len()]) {
                answer.cluster_id = Some(segment.id);
                answer.segment = Some(segment.description.clone());
            }
        }
        if task == Task::Clustering {
            answer.known_movie = false;
            answer
                .features
                .retain(|k, _| SEGMENT_FEATURES.contains(&k.as_str()));
        }
        Ok(answer)
    }
}

/// Reads one file of a round; a missing file makes the round bad (a partial round), while
/// other store errors stay store errors (worth retrying).
async fn fetch(store: &Lake, path: &str, round: u64) -> Result<Bytes, ApiError> {
    match store.get(&Path::from(path)).await {
        Err(JobError::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => Err(ApiError::BadRound {
            round,
            path: store.url_of(path),
            reason: "missing: the round is incomplete".into(),
        }),
        other => Ok(other?),
    }
}

/// A round's line in the list of rounds.
pub fn summary(artifact: &ModelArtifact, path: &str) -> RoundSummary {
    RoundSummary {
        round: artifact.round,
        path: path.to_string(),
        created_at_ms: artifact.created_at_ms,
        metrics: artifact.metrics.clone(),
    }
}

/// Whether this server can use the artifact at all.
fn check_artifact(a: &ModelArtifact, pointer: &LatestPointer) -> Result<(), String> {
    if a.format_version != ARTIFACT_FORMAT_VERSION {
        return Err(format!(
            "artifact format version {} (this server reads {ARTIFACT_FORMAT_VERSION})",
            a.format_version
        ));
    }
    if a.feature_fingerprint != model::feature_fingerprint() {
        return Err("feature fingerprint differs from this server's features: trainer and server are different versions".into());
    }
    if a.round != pointer.round {
        return Err(format!(
            "model.json is round {}, LATEST says {}",
            a.round, pointer.round
        ));
    }
    if a.features != FEATURES {
        return Err(format!("features {:?}, expected {FEATURES:?}", a.features));
    }
    let n = FEATURES.len();
    let lengths = [
        ("scaling.mean", a.scaling.mean.len(), n),
        ("scaling.scale", a.scaling.scale.len(), n),
        (
            "regression.coefficients",
            a.regression.coefficients.len(),
            n,
        ),
        (
            "classification.coefficients",
            a.classification.coefficients.len(),
            n,
        ),
        (
            "segmentation.scaling.mean",
            a.segmentation.scaling.mean.len(),
            SEGMENT_FEATURES.len(),
        ),
        (
            "segmentation.scaling.scale",
            a.segmentation.scaling.scale.len(),
            SEGMENT_FEATURES.len(),
        ),
    ];
    for (what, got, want) in lengths {
        if got != want {
            return Err(format!("{what} has {got} values, expected {want}"));
        }
    }
    if let Some(s) = a
        .segmentation
        .segments
        .iter()
        .find(|s| s.centroid.len() != SEGMENT_FEATURES.len())
    {
        return Err(format!(
            "segment {} centroid has {} values, expected {}",
            s.id,
            s.centroid.len(),
            SEGMENT_FEATURES.len()
        ));
    }
    let numbers = a
        .scaling
        .mean
        .iter()
        .chain(&a.scaling.scale)
        .chain(&a.regression.coefficients)
        .chain(&a.classification.coefficients);
    if !numbers
        .chain([&a.regression.intercept, &a.classification.intercept])
        .all(|v| v.is_finite())
    {
        return Err("a coefficient or scaling value is not finite".into());
    }
    Ok(())
}

/// Reads a lookup table (`id, n, sum, sumsq, liked, resid, ts`) into a map by id.
fn read_side_table(bytes: Bytes) -> Result<FxHashMap<i64, SideStats>, String> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| format!("not a readable Parquet file: {e}"))?;
    let mut table = FxHashMap::default();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let ids = column::<Int64Array>(&batch, "id")?;
        let [n, sum, sumsq, liked, resid, ts] = ["n", "sum", "sumsq", "liked", "resid", "ts"]
            .map(|c| column::<Float64Array>(&batch, c));
        let (n, sum, sumsq, liked, resid, ts) = (n?, sum?, sumsq?, liked?, resid?, ts?);
        for r in 0..batch.num_rows() {
            let stats = SideStats {
                n: n.value(r),
                sum: sum.value(r),
                sumsq: sumsq.value(r),
                liked: liked.value(r),
                resid: resid.value(r),
                ts: ts.value(r),
            };
            table.insert(ids.value(r), stats);
        }
    }
    Ok(table)
}

fn column<'a, T: Array + 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, String> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| format!("no column `{name}`"))?;
    if col.null_count() > 0 {
        return Err(format!("column `{name}` has nulls"));
    }
    col.as_any().downcast_ref::<T>().ok_or_else(|| {
        format!(
            "column `{name}` is {}, not the expected type",
            col.data_type()
        )
    })
}

fn most_active(table: &FxHashMap<i64, SideStats>) -> Vec<i64> {
    let mut ids: Vec<(f64, i64)> = table.iter().map(|(id, s)| (s.n, *id)).collect();
    ids.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ids.into_iter().take(SAMPLE_IDS).map(|(_, id)| id).collect()
}
