//! Spark parity: every SQL file lensflow ships, for every shipped pipeline, run by Spark itself
//! (pyspark in local mode, the version `.ci/run` installs) and by lensflow's engine over the same
//! Parquet files of a lake. The variables are set the Spark way (`SET name=value`, then the
//! files' `${name}`), so Spark runs the files exactly as they are shipped. Both must give the same
//! rows, the same column names and types, and values equal within 1e-9 (relative; absolute
//! below 1).
//!
//! Inputs: `ratings_small`; generated ratings with many ties in timestamps (within a user and
//! within a movie) and users and movies with a single rating; the smart-home device file.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use arrow_array::{Array, RecordBatch, StringArray};
use arrow_schema::DataType;
use common::*;
use lensflow_core::Pipeline;
use lensflow_core::pipeline::substitute;
use lensflow_jobs::train::engine::Engine;

/// One input of one pipeline: its lake's event files and the variables to run its SQL with.
struct Run {
    name: String,
    pipeline: Pipeline,
    files: Vec<PathBuf>,
    variables: BTreeMap<String, f64>,
}

/// Ratings where ties are the rule: timestamps from 40 distinct values, every 7th user and
/// every 11th movie with a single rating, and each (user, movie) pair once.
fn tied_ratings(dir: &Path) -> PathBuf {
    let path = dir.join("tied.csv");
    let mut text = String::from("userId,movieId,rating,timestamp\n");
    let mut state: u64 = 7;
    let mut next = |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let mut single_movie = 10_000;
    for user in 1..=300u64 {
        let count = if user % 7 == 0 { 1 } else { 2 + next(25) };
        let mut movies = std::collections::BTreeSet::new();
        while (movies.len() as u64) < count {
            movies.insert(1 + next(150));
        }
        if user % 11 == 0 {
            // A movie nobody else rates.
            single_movie += 1;
            movies.insert(single_movie);
        }
        for movie in movies {
            let rating = (1 + next(10)) as f64 / 2.0;
            let ts = 1_500_000_000 + 3_600 * next(40);
            text.push_str(&format!("{user},{movie},{rating},{ts}\n"));
        }
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Lands `csv` as one batch of `pipeline` under `dir` and returns the run over its event files,
/// with the pipeline's variables computed over all of its events.
fn run_of(rt: &tokio::runtime::Runtime, dir: &Path, name: &str, pipeline_name: &str, csv: &Path) -> Run {
    let root = dir.join(name);
    build_lake_of(csv, &format!("file://{}", root.display()), pipeline_name, 1);
    let events = root.join(pipeline_name).join("events");
    let files = parquet_files(&events);
    assert!(!files.is_empty(), "no event files in {}", events.display());
    let pipeline = pipeline(pipeline_name);
    let d = &pipeline.definition;
    let mut variables = d.features.constants.clone();
    if !d.features.variables.is_empty() {
        let engine = Engine::local(2).unwrap();
        let exprs: Vec<&String> = d.features.variables.values().collect();
        let sql = format!("SELECT {} FROM {}", exprs.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(", "), d.events.table);
        let row = rt.block_on(async {
            engine.register_parquet(&d.events.table, &urls(&files), Some(pipeline.lake_schema())).await.unwrap();
            engine.query_row("variables", &sql).await.unwrap()
        });
        for (name, value) in d.features.variables.keys().zip(row) {
            variables.insert(name.clone(), value);
        }
    }
    Run { name: name.to_string(), pipeline, files, variables }
}

fn urls(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|f| format!("file://{}", f.display())).collect()
}

/// The shipped file `file` of `p`, checked to be the text the binary carries.
fn shipped(p: &Pipeline, file: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines").join(p.name()).join(file);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), p.sql_text(file), "{} is what the binary ships", path.display());
    path
}

/// The steps of a pipeline: its feature SQL as `features` (what the lookups read), then each
/// lookup's SQL, with their files.
fn steps(p: &Pipeline) -> Vec<(String, String)> {
    let d = &p.definition;
    let mut steps = vec![("features".to_string(), d.features.sql.clone())];
    steps.extend(d.lookups.iter().map(|l| (format!("lookup_{}", l.name), l.sql.clone())));
    steps
}

/// Runs every run's steps on lensflow's engine: (step, result, seconds) per run.
fn on_lensflow(rt: &tokio::runtime::Runtime, runs: &[Run]) -> Vec<Vec<(String, Vec<RecordBatch>, f64)>> {
    rt.block_on(async {
        let mut out = Vec::new();
        for run in runs {
            let p = &run.pipeline;
            let engine = Engine::local(2).unwrap();
            engine.register_parquet(&p.definition.events.table, &urls(&run.files), Some(p.lake_schema())).await.unwrap();
            let mut results = Vec::new();
            for (step, file) in steps(p) {
                let sql = substitute(p.sql_text(&file), &run.variables);
                let start = Instant::now();
                engine.materialise(&step, &sql, "", &[step.as_str()]).await.unwrap();
                let batches = engine.query(&step, &format!("SELECT * FROM {step}")).await.unwrap();
                results.push((step, batches, start.elapsed().as_secs_f64()));
            }
            out.push(results);
        }
        out
    })
}

/// A pipeline run as the Spark runner's plan describes it: its events table, its variables
/// (set with `SET`) and its shipped SQL files.
fn spark_run(r: &Run) -> serde_json::Value {
    serde_json::json!({
        "name": r.name,
        "tables": serde_json::Map::from_iter([(r.pipeline.definition.events.table.clone(), serde_json::json!(r.files))]),
        "set": r.variables.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(format!("{v:?}")))).collect::<serde_json::Map<_, _>>(),
        "steps": steps(&r.pipeline).iter().map(|(step, file)| serde_json::json!([step, shipped(&r.pipeline, file)])).collect::<Vec<_>>(),
    })
}

/// Runs the plan's runs (see tests/spark/run_sql.py) on pyspark; returns Spark's version.
fn on_spark(runs: Vec<serde_json::Value>, out: &Path) -> String {
    let plan = serde_json::json!({ "out": out, "runs": runs });
    let plan_path = out.with_extension("plan.json");
    std::fs::write(&plan_path, plan.to_string()).unwrap();
    let python = std::env::var("LENSFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spark/run_sql.py");
    let result = Command::new(&python).arg(&script).arg(&plan_path).output().unwrap_or_else(|e| panic!("{python}: {e}"));
    assert!(
        result.status.success(),
        "pyspark failed (needs `pip install pyspark==4.3.0` and a Java 17 runtime, as .ci/run installs):\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::read_to_string(out.join("spark-version")).unwrap()
}

/// Spark's name for an Arrow type, as its `simpleString` prints it.
fn spark_type(t: &DataType) -> String {
    match t {
        DataType::Float64 => "double".into(),
        DataType::Float32 => "float".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Int32 => "int".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => "string".into(),
        DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
        other => format!("{other}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Number(f64),
    Text(String),
}

/// Every row of `batches` as cells: numbers as f64, strings as text.
fn rows(batches: &[RecordBatch]) -> Vec<Vec<Cell>> {
    let mut out = Vec::new();
    for b in batches {
        let columns: Vec<Box<dyn Fn(usize) -> Cell>> = b
            .columns()
            .iter()
            .map(|c| -> Box<dyn Fn(usize) -> Cell> {
                if c.data_type().is_numeric() {
                    let f = as_f64(c);
                    Box::new(move |r| if f.is_null(r) { Cell::Null } else { Cell::Number(f.value(r)) })
                } else {
                    let s = datafusion::arrow::compute::cast(c, &DataType::Utf8).unwrap();
                    let s = s.as_any().downcast_ref::<StringArray>().unwrap().clone();
                    Box::new(move |r| if s.is_null(r) { Cell::Null } else { Cell::Text(s.value(r).to_string()) })
                }
            })
            .collect();
        for r in 0..b.num_rows() {
            out.push(columns.iter().map(|c| c(r)).collect());
        }
    }
    // Ordered by the exact columns first (ids, text), so float noise cannot reorder rows.
    let key = |row: &Vec<Cell>| -> Vec<String> {
        row.iter()
            .map(|c| match c {
                Cell::Null => "~".to_string(),
                Cell::Text(t) => t.clone(),
                Cell::Number(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{:020}", *v as i64 + 500_000_000_000_000),
                Cell::Number(_) => String::new(),
            })
            .collect()
    };
    out.sort_by_cached_key(key);
    out
}

/// A numeric column as f64s.
fn as_f64(c: &arrow_array::ArrayRef) -> arrow_array::Float64Array {
    let f = datafusion::arrow::compute::cast(c, &DataType::Float64).unwrap();
    f.as_any().downcast_ref::<arrow_array::Float64Array>().unwrap().clone()
}

/// The Parquet files in `dir`, in name order.
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|f| f.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "parquet")).collect();
    files.sort();
    files
}

/// Every row of the Parquet files in `dir` (a folder Spark or DataFusion wrote).
fn read_parquet_dir(dir: &Path) -> Vec<RecordBatch> {
    let mut batches = Vec::new();
    for f in parquet_files(dir) {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&f).unwrap()).unwrap().build().unwrap();
        batches.extend(reader.map(|b| b.unwrap()));
    }
    batches
}

/// The first column where two rows differ: numbers beyond [`same`], anything else unequal.
fn first_difference(x: &[Cell], y: &[Cell]) -> Option<usize> {
    x.iter().zip(y).position(|(p, q)| match (p, q) {
        (Cell::Number(p), Cell::Number(q)) => !same(*p, *q),
        _ => p != q,
    })
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0) || (a.is_nan() && b.is_nan())
}

#[test]
fn every_shipped_sql_file_gives_spark_s_rows_types_and_values() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let runs = vec![
        run_of(&rt, dir.path(), "movielens-ratings-small", "movielens", &ratings_small()),
        run_of(&rt, dir.path(), "movielens-ties-and-singles", "movielens", &tied_ratings(dir.path())),
        run_of(&rt, dir.path(), "smart-home-devices", "smart-home", &smart_home_csv()),
    ];
    // Every shipped pipeline is covered.
    let covered: std::collections::BTreeSet<&str> = runs.iter().map(|r| r.pipeline.name()).collect();
    let shipped_pipelines: std::collections::BTreeSet<&str> = Pipeline::builtin_names().into_iter().collect();
    assert_eq!(covered, shipped_pipelines);

    let ours = on_lensflow(&rt, &runs);
    let spark_out = dir.path().join("spark");
    // An ad-hoc query too, for `lensflow sql` below: the same file, the same lake files.
    let adhoc = dir.path().join("adhoc.sql");
    std::fs::write(&adhoc, ADHOC).unwrap();
    let mut plan: Vec<serde_json::Value> = runs.iter().map(spark_run).collect();
    plan.push(serde_json::json!({"name": "adhoc", "tables": {"ratings": runs[0].files}, "set": {}, "steps": [["adhoc", adhoc]]}));
    let version = on_spark(plan, &spark_out);
    eprintln!("compared against Spark {version} (pyspark, local mode)");
    assert!(version.starts_with("4."), "Spark {version}");

    let mut faults = Vec::new();
    for (run, results) in runs.iter().zip(&ours) {
        for (step, batches, seconds) in results {
            let at = format!("{} {step}", run.name);
            let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(spark_out.join(&run.name).join(format!("{step}.json"))).unwrap()).unwrap();
            eprintln!("{at}: lensflow {seconds:.3} s, Spark {:.3} s", meta["seconds"].as_f64().unwrap());
            let theirs: Vec<(String, String)> = meta["columns"].as_array().unwrap().iter().map(|c| (c[0].as_str().unwrap().to_string(), c[1].as_str().unwrap().to_string())).collect();
            let schema = batches.first().map(|b| b.schema()).expect("lensflow gave no batch");
            let mine: Vec<(String, String)> = schema.fields().iter().map(|f| (f.name().clone(), spark_type(f.data_type()))).collect();
            if mine != theirs {
                let differ: Vec<String> = mine.iter().zip(&theirs).filter(|(a, b)| a != b).map(|(a, b)| format!("{} {} vs Spark's {} {}", a.0, a.1, b.0, b.1)).collect();
                faults.push(format!("{at}: columns differ ({} vs {} columns): {}", mine.len(), theirs.len(), differ.join("; ")));
                continue;
            }
            let (a, b) = (rows(batches), rows(&read_parquet_dir(&spark_out.join(&run.name).join(step))));
            if a.len() != b.len() {
                faults.push(format!("{at}: {} rows vs Spark's {}", a.len(), b.len()));
                continue;
            }
            let differing = a.iter().zip(&b).enumerate().filter_map(|(r, (x, y))| first_difference(x, y).map(|c| (r, c, &x[c], &y[c])));
            for (r, c, p, q) in differing.take(5) {
                faults.push(format!("{at}: row {r} column {}: {p:?} vs Spark's {q:?}", mine[c].0));
            }
            eprintln!("{at}: {} rows, {} columns agree", a.len(), mine.len());
        }
    }
    assert!(faults.is_empty(), "lensflow and Spark {version} differ:\n{}", faults.join("\n"));

    // `lensflow sql` over the lake's committed batches gives Spark's answer to the same file.
    let lake = format!("file://{}", dir.path().join(&runs[0].name).display());
    let sql = |args: &[&str]| lensflow(["sql", "--pipeline", "movielens", "--lake", &lake, "--models", "none"]).args(args).output().unwrap();
    let out_dir = dir.path().join("adhoc-out");
    let written = sql(&["-f", adhoc.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]);
    assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
    let (ours, theirs) = (read_parquet_dir(&out_dir), read_parquet_dir(&spark_out.join("adhoc/adhoc")));
    let types = |b: &[RecordBatch]| b[0].schema().fields().iter().map(|f| (f.name().clone(), spark_type(f.data_type()))).collect::<Vec<_>>();
    assert_eq!(types(&ours), types(&theirs), "plain Parquet out, with Spark's column names and types");
    let (a, b) = (rows(&ours), rows(&theirs));
    assert_eq!(a.len(), 671, "one row per user");
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(first_difference(x, y).is_none(), "{x:?} vs Spark's {y:?}");
    }
    // The same rows stream to stdout as JSON lines, and the batches are a table too.
    let json = sql(&["-f", adhoc.to_str().unwrap(), "--format", "json"]);
    assert!(json.status.success());
    assert_eq!(String::from_utf8_lossy(&json.stdout).lines().count(), 671);
    let batches = sql(&["-e", "SELECT pipeline, COUNT(*) AS batches, SUM(rows) AS events FROM batches GROUP BY pipeline", "--format", "csv"]);
    assert_eq!(String::from_utf8_lossy(&batches.stdout), "pipeline,batches,events\nmovielens,1,100004\n");
    // A typo is an SQL error with its place.
    let typo = sql(&["-e", "SELECT COUNT(*) FROM ratings;\nSELEC user_id FROM ratings"]);
    assert!(!typo.status.success());
    let said = String::from_utf8_lossy(&typo.stderr);
    assert!(said.contains("SELEC") && said.contains("Line: 2, Column: 1"), "{said}");
}

/// The ad-hoc query both engines run: aggregates, a CASE and integer sums.
const ADHOC: &str = "SELECT user_id, COUNT(*) AS ratings, AVG(rating) AS mean_rating, MIN(ts) AS first_ts,
  SUM(CASE WHEN rating >= 4.0 THEN 1 ELSE 0 END) AS liked
FROM ratings
GROUP BY user_id
";
