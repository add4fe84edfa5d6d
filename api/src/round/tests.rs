//! Rounds from a model store whose files are damaged or hostile: `model.json`, the lookup
//! tables and `LATEST`, each with bytes overwritten, cut short or given extreme values (and the
//! checksums made to match, so the damage reaches the parsers). Every one is served or refused
//! with an error naming the file; none panics, and a refused round leaves the previous one
//! serving.

use std::path::Path as FsPath;
use std::sync::Arc;

use lensflow_core::model::{LATEST, LatestPointer, MODEL_FILE, ModelArtifact, lookup_file, sha256_hex};
use lensflow_core::{Lake, StorageOptions};
use proptest::prelude::*;
use proptest::test_runner::{TestError, TestRunner};
use serde_json::{Value as Json, json};

use super::{LoadedRound, Task};
use crate::ApiError;
use crate::metrics::Metrics;
use crate::testing::publish;
use crate::watcher::Models;

const ROUND_DIR: &str = "movielens/round-000001";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A model store holding hand-made MovieLens round 1.
fn store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), "movielens", 1);
    dir
}

/// Writes `bytes` as the round's file `name`, then makes the checksums that guard it agree
/// (model.json's for a lookup table, LATEST's for model.json), as a buggy trainer would.
fn replace(dir: &FsPath, name: &str, bytes: &[u8]) {
    let round = dir.join(ROUND_DIR);
    std::fs::write(round.join(name), bytes).unwrap();
    if name != MODEL_FILE {
        let mut model: Json = serde_json::from_slice(&std::fs::read(round.join(MODEL_FILE)).unwrap()).unwrap();
        model["checksums"][name] = json!(sha256_hex(bytes));
        std::fs::write(round.join(MODEL_FILE), serde_json::to_vec(&model).unwrap()).unwrap();
    }
    let model = std::fs::read(round.join(MODEL_FILE)).unwrap();
    let pointer = LatestPointer { round: 1, path: "round-000001".into(), model_sha256: sha256_hex(&model) };
    std::fs::write(dir.join("movielens").join(LATEST), serde_json::to_vec(&pointer).unwrap()).unwrap();
}

/// Loads the round LATEST names, as the watcher does.
fn load(runtime: &tokio::runtime::Runtime, dir: &FsPath) -> Result<LoadedRound, ApiError> {
    let store = Lake::open(dir.to_str().unwrap(), &StorageOptions::default()).unwrap().child("movielens");
    let pointer: LatestPointer = serde_json::from_slice(&std::fs::read(dir.join("movielens").join(LATEST)).unwrap()).unwrap();
    runtime.block_on(LoadedRound::load(&store, "movielens", &pointer))
}

/// A refusal must name the round's file at fault: one of `files`, or (`None`) any file of
/// the round (a damaged `model.json` may name a lookup file that is not there).
fn refused_naming(e: &ApiError, files: Option<&[&str]>) -> bool {
    let named = |path: &str| match files {
        Some(files) => files.iter().any(|f| path.ends_with(&format!("{ROUND_DIR}/{f}"))),
        None => path.contains(&format!("{ROUND_DIR}/")),
    };
    matches!(e, ApiError::BadRound { path, .. } if named(path))
}

/// A runner for `cases` cases that keeps no failure file (these tests run outside `proptest!`).
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(cases) })
}

/// Fails the test with the reason and the start of the failing input (a whole damaged
/// `model.json` would be thousands of lines).
fn passed<T: std::fmt::Debug>(result: Result<(), TestError<T>>) {
    match result {
        Ok(()) => {}
        Err(TestError::Abort(reason)) => panic!("aborted: {reason}"),
        Err(TestError::Fail(reason, input)) => {
            let input = format!("{input:?}");
            panic!("{reason}; failing input: {}", &input[..input.len().min(2000)]);
        }
    }
}

/// Answers a few requests with a loaded round: whatever the round holds, an answer or an
/// error, never a panic.
fn ask(round: &LoadedRound) {
    let requests = [json!({"userId": 1, "movieId": 31}), json!({"userId": 99, "movieId": 7, "timestamp": 0}), json!({"features": {"u_mean": 3.0}})];
    for task in [Task::All, Task::Classification, Task::Regression, Task::Clustering] {
        if let Ok(answers) = round.predict(&requests, task, true) {
            serde_json::to_string(&answers).unwrap();
        }
    }
}

/// Bytes overwritten at random places, and maybe cut short.
fn damage(bytes: &[u8]) -> impl Strategy<Value = Vec<u8>> + use<> {
    let bytes = bytes.to_vec();
    (prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..5), any::<prop::sample::Index>(), any::<bool>()).prop_map(
        move |(edits, cut, truncate)| {
            let mut bytes = bytes.clone();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            bytes
        },
    )
}

fn leaves(v: &Json) -> usize {
    match v {
        Json::Array(items) => items.iter().map(leaves).sum(),
        Json::Object(map) => map.values().map(leaves).sum(),
        _ => 1,
    }
}

/// Replaces the `n`th leaf (in document order) of `v` by `with`.
fn replace_leaf(v: &mut Json, n: &mut usize, with: &Json) -> bool {
    match v {
        Json::Array(items) => items.iter_mut().any(|i| replace_leaf(i, n, with)),
        Json::Object(map) => map.values_mut().any(|i| replace_leaf(i, n, with)),
        leaf if *n == 0 => {
            *leaf = with.clone();
            true
        }
        _ => {
            *n -= 1;
            false
        }
    }
}

fn extreme() -> impl Strategy<Value = Json> {
    prop_oneof![
        prop::sample::select(vec![
            json!(u64::MAX),
            json!(i64::MAX),
            json!(i64::MIN),
            json!(-1),
            json!(0),
            json!(1e308),
            json!(-1e308),
            json!(0.5),
            json!(null),
            json!(""),
            json!("NaN"),
            json!([]),
            json!({}),
            json!("SELECT"),
            json!("user_id"),
        ]),
        any::<i64>().prop_map(Json::from),
        ".{0,8}".prop_map(Json::from),
    ]
}

#[test]
fn damaged_model_files_are_refused_naming_the_file() {
    let runtime = runtime();
    let dir = store();
    let model = std::fs::read(dir.path().join(ROUND_DIR).join(MODEL_FILE)).unwrap();
    passed(runner(128).run(&damage(&model), |bytes| {
        replace(dir.path(), MODEL_FILE, &bytes);
        match load(&runtime, dir.path()) {
            Ok(round) => ask(&round),
            Err(e) => prop_assert!(refused_naming(&e, None), "{}", e),
        }
        Ok(())
    }));
}

#[test]
fn extreme_values_in_a_self_consistent_artifact_are_served_or_refused_by_name() {
    let runtime = runtime();
    let dir = store();
    let model: Json = serde_json::from_slice(&std::fs::read(dir.path().join(ROUND_DIR).join(MODEL_FILE)).unwrap()).unwrap();
    let n = leaves(&model);
    passed(runner(128).run(&(prop::collection::vec((any::<prop::sample::Index>(), extreme()), 1..3)), |edits| {
        let mut json = model.clone();
        for (at, with) in &edits {
            replace_leaf(&mut json, &mut at.index(n), with);
        }
        // The fingerprint made to agree with a changed pipeline, so the change reaches
        // everything past that check.
        let bytes = match serde_json::from_value::<ModelArtifact>(json.clone()) {
            Ok(mut a) => {
                a.fingerprint = a.pipeline.fingerprint();
                serde_json::to_vec(&a).unwrap()
            }
            Err(_) => serde_json::to_vec(&json).unwrap(),
        };
        replace(dir.path(), MODEL_FILE, &bytes);
        match load(&runtime, dir.path()) {
            Ok(round) => ask(&round),
            Err(e) => prop_assert!(refused_naming(&e, None), "{}", e),
        }
        Ok(())
    }));
}

#[test]
fn damaged_lookup_tables_are_refused_naming_the_file() {
    let runtime = runtime();
    let dir = store();
    let file = lookup_file("user");
    let table = std::fs::read(dir.path().join(ROUND_DIR).join(&file)).unwrap();
    passed(runner(128).run(&damage(&table), |bytes| {
        replace(dir.path(), &file, &bytes);
        match load(&runtime, dir.path()) {
            Ok(round) => ask(&round),
            Err(e) => prop_assert!(refused_naming(&e, Some(&[&file])), "{}", e),
        }
        Ok(())
    }));
    // Well-formed Parquet whose content is unservable (a null feature value) is the table's
    // fault too, and named so (a damaged byte once produced exactly this, blamed on model.json).
    let (schema, batches) = lensflow_core::store::read_parquet(table.clone().into()).unwrap();
    let batch = datafusion::arrow::compute::concat_batches(&schema, &batches).unwrap();
    let mut columns = batch.columns().to_vec();
    columns[1] = arrow_array::new_null_array(columns[1].data_type(), batch.num_rows());
    let fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect();
    let nullable = arrow_array::RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), columns).unwrap();
    let mut bytes = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, nullable.schema(), None).unwrap();
    writer.write(&nullable).unwrap();
    writer.close().unwrap();
    replace(dir.path(), &file, &bytes);
    let err = load(&runtime, dir.path()).err().unwrap();
    assert!(refused_naming(&err, Some(&[&file])) && err.to_string().contains("has nulls"), "{err}");
    // A footer that declares 4 GiB of metadata in a file of a few hundred bytes is refused
    // before anything that size is allocated.
    let mut huge = table.clone();
    let at = huge.len() - 8;
    huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    replace(dir.path(), &file, &huge);
    let err = load(&runtime, dir.path()).err().unwrap();
    assert!(refused_naming(&err, Some(&[&file])) && err.to_string().contains("not a readable Parquet file"), "{err}");
}

#[test]
fn a_damaged_latest_is_refused_naming_it_and_the_round_served_stays() {
    let runtime = runtime();
    let dir = store();
    let root = Lake::open(dir.path().to_str().unwrap(), &StorageOptions::default()).unwrap();
    let models = Models::new(root, "movielens", Arc::new(Metrics::default()));
    assert_eq!(runtime.block_on(models.refresh()).unwrap().swapped, [("movielens".to_string(), 1)]);
    let latest = dir.path().join("movielens").join(LATEST);
    let good = std::fs::read(&latest).unwrap();
    let hostile = prop_oneof![
        damage(&good),
        prop::collection::vec(any::<u8>(), 0..64),
        (any::<u64>(), ".{0,12}", ".{0,70}")
            .prop_map(|(round, path, sha)| serde_json::to_vec(&json!({"round": round, "path": path, "model_sha256": sha})).unwrap()),
        prop::sample::select(vec!["../../etc", "/", "", "round-000001/../..", "round-999999"])
            .prop_map(|path| serde_json::to_vec(&json!({"round": 1, "path": path, "model_sha256": "0"})).unwrap()),
    ];
    passed(runner(128).run(&hostile, |bytes| {
        std::fs::write(&latest, &bytes).unwrap();
        let refreshed = runtime.block_on(models.refresh()).unwrap();
        prop_assert!(refreshed.swapped.is_empty() || bytes == good);
        for (pipeline, e) in &refreshed.failed {
            prop_assert_eq!(pipeline, "movielens");
            let named = matches!(e, ApiError::BadRound { path, .. } if path.contains("/movielens/"));
            prop_assert!(named, "{}", e);
        }
        // Whatever LATEST says now, the round loaded before still answers.
        let round = models.serving("movielens").unwrap();
        prop_assert_eq!(round.round(), 1);
        let request = json!({"userId": 1, "movieId": 31});
        prop_assert!(round.predict(&[request], Task::All, false).is_ok());
        Ok(())
    }));
}

/// Every single-byte change anywhere in a lookup file (the Parquet footer, the Arrow schema
/// embedded in it, the pages) is read as a table or refused as an error, never a panic.
#[test]
fn any_byte_of_a_lookup_table_damaged_is_an_error_not_a_panic() {
    let table = crate::testing::tables("movielens").swap_remove(0).1;
    for i in 0..table.len() {
        for byte in [0x00, 0xff, table[i] ^ 0x01, table[i] ^ 0x20] {
            let mut damaged = table.clone();
            damaged[i] = byte;
            let read = std::panic::catch_unwind(|| super::read_table(damaged.into()));
            assert!(read.is_ok(), "byte {i} set to {byte:#04x}: the reader panicked");
        }
    }
}
