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
        DataType::Date32 => "date".into(),
        DataType::Timestamp(_, Some(_)) => "timestamp".into(),
        DataType::Timestamp(_, None) => "timestamp_ntz".into(),
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
                    // Spark writes timestamps without a zone (INT96); compare the instants.
                    let c = match c.data_type() {
                        DataType::Timestamp(_, _) => {
                            datafusion::arrow::compute::cast(c, &DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, None)).unwrap()
                        }
                        _ => c.clone(),
                    };
                    let s = datafusion::arrow::compute::cast(&c, &DataType::Utf8).unwrap();
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
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().map(|f| f.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "parquet")).collect();
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

/// The column names and Spark type names of lensflow's answer.
fn columns_of(batches: &[RecordBatch]) -> Vec<(String, String)> {
    let schema = batches.first().map(|b| b.schema()).expect("lensflow gave no batch");
    schema.fields().iter().map(|f| (f.name().clone(), spark_type(f.data_type()))).collect()
}

/// Spark's answer to one step of a run (see tests/spark/run_sql.py).
struct SparkStep {
    /// Column names and Spark's type names.
    columns: Vec<(String, String)>,
    /// The rows it wrote.
    batches: Vec<RecordBatch>,
    /// How long the step took.
    seconds: f64,
}

/// Spark's answer to step `step` of run `run` under `out`, or the error Spark gave.
fn spark_step(out: &Path, run: &str, step: &str) -> Result<SparkStep, String> {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join(run).join(format!("{step}.json"))).unwrap()).unwrap();
    if let Some(e) = meta["error"].as_str() {
        return Err(e.to_string());
    }
    let columns = meta["columns"].as_array().unwrap().iter().map(|c| (c[0].as_str().unwrap().to_string(), c[1].as_str().unwrap().to_string())).collect();
    Ok(SparkStep { columns, batches: read_parquet_dir(&out.join(run).join(step)), seconds: meta["seconds"].as_f64().unwrap_or(0.0) })
}

/// Where lensflow's `batches` differ from Spark's answer, as faults naming `at`: the columns
/// (names and types) first, then the rows (values within 1e-9; the first five shown). None:
/// they agree.
fn differences(at: &str, batches: &[RecordBatch], spark: &SparkStep) -> Vec<String> {
    let (mine, theirs) = (columns_of(batches), &spark.columns);
    if &mine != theirs {
        let differ: Vec<String> = mine.iter().zip(theirs).filter(|(a, b)| a != b).map(|(a, b)| format!("{} {} vs Spark's {} {}", a.0, a.1, b.0, b.1)).collect();
        return vec![format!("{at}: columns differ ({} vs {} columns): {}", mine.len(), theirs.len(), differ.join("; "))];
    }
    let (a, b) = (rows(batches), rows(&spark.batches));
    if a.len() != b.len() {
        return vec![format!("{at}: {} rows vs Spark's {}", a.len(), b.len())];
    }
    let differing = a.iter().zip(&b).filter_map(|(x, y)| first_difference(x, y).map(|c| (c, x, y)));
    differing.take(5).map(|(c, x, y)| format!("{at}: column {} of row {:?}: {:?} vs Spark's {:?}", mine[c].0, x[0], x[c], y[c])).collect()
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0) || (a.is_nan() && b.is_nan())
}

#[test]
fn every_shipped_sql_file_gives_spark_s_rows_types_and_values() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut runs = vec![
        run_of(&rt, dir.path(), "movielens-ratings-small", "movielens", &ratings_small()),
        run_of(&rt, dir.path(), "movielens-ties-and-singles", "movielens", &tied_ratings(dir.path())),
        run_of(&rt, dir.path(), "smart-home-devices", "smart-home", &smart_home_csv()),
    ];
    // At scale on request, for the two engines' timings (`LENSFLOW_PARITY_RATINGS=1000000
    // cargo test --release --test spark every_shipped -- --nocapture`).
    if let Some(n) = std::env::var("LENSFLOW_PARITY_RATINGS").ok().and_then(|n| n.parse::<u64>().ok()) {
        let csv = generate(dir.path(), n, 42);
        runs.push(run_of(&rt, dir.path(), &format!("movielens-generated-{n}"), "movielens", &csv));
    }
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
            let spark = spark_step(&spark_out, &run.name, step).unwrap_or_else(|e| panic!("{at}: Spark failed: {e}"));
            eprintln!("{at}: lensflow {seconds:.3} s, Spark {:.3} s", spark.seconds);
            let found = differences(&at, batches, &spark);
            if found.is_empty() {
                eprintln!("{at}: {} rows, {} columns agree", rows(batches).len(), spark.columns.len());
            }
            faults.extend(found);
        }
    }
    assert!(faults.is_empty(), "lensflow and Spark {version} differ:\n{}", faults.join("\n"));

    // `lensflow sql` over the lake's committed batches gives Spark's answer to the same file.
    let lake = format!("file://{}", dir.path().join(&runs[0].name).display());
    let sql = |args: &[&str]| lensflow(["sql", "--pipeline", "movielens", "--lake", &lake, "--models", "none"]).args(args).output().unwrap();
    let out_dir = dir.path().join("adhoc-out");
    let written = sql(&["-f", adhoc.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]);
    assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
    let ours = read_parquet_dir(&out_dir);
    assert_eq!(rows(&ours).len(), 671, "one row per user");
    let spark = spark_step(&spark_out, "adhoc", "adhoc").unwrap();
    assert_eq!(columns_of(&ours), columns_of(&spark.batches), "plain Parquet out, with Spark's column names and types");
    let found = differences("lensflow sql -f adhoc.sql", &ours, &spark);
    assert!(found.is_empty(), "{}", found.join("\n"));
    // A shipped feature SQL file runs as a SQL job as Spark runs it: variables set with `SET`
    // in the job (and `--define`), Spark's rows out.
    let movielens = &runs[0];
    let (first, rest) = movielens.variables.iter().partition::<Vec<_>, _>(|(k, _)| k.as_str() == "prior_mean");
    let job = dir.path().join("features-job.sql");
    let sets: String = rest.iter().map(|(k, v)| format!("SET {k}={v:?};\n")).collect();
    std::fs::write(&job, format!("{sets}{}", movielens.pipeline.features_sql())).unwrap();
    let define = format!("{}={:?}", first[0].0, first[0].1);
    let job_out = dir.path().join("features-job-out");
    let ran = sql(&["-f", job.to_str().unwrap(), "--define", &define, "--out", job_out.to_str().unwrap()]);
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let ours = read_parquet_dir(&job_out);
    assert_eq!(rows(&ours).len(), 100_004);
    let found = differences("the feature SQL as a job", &ours, &spark_step(&spark_out, &movielens.name, "features").unwrap());
    assert!(found.is_empty(), "{}", found.join("\n"));
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

/// The table the function cases read: every type a pipeline's events can have, with nulls,
/// negatives, halves for rounding, and strings with spaces, case and non-ASCII letters.
fn cases_table(dir: &Path) -> PathBuf {
    use arrow_array::{Date32Array, Float64Array, Int32Array, Int64Array, TimestampMicrosecondArray};
    let n = 64usize;
    let groups = ["a", "b", "c"];
    let doubles = [2.5, -2.5, 1.005, 0.125, 3.25, 0.0, 123456.789, -0.5, 7.0];
    let texts = [" 12 ", "abc", "Lens Flow", "", "Ärger über", "42", "-7.5", "a,b,,c"];
    let id = Int64Array::from_iter_values(1..=n as i64);
    let g = StringArray::from_iter((0..n).map(|r| (r % 9 != 4).then(|| groups[r % 3])));
    let i = Int32Array::from_iter((0..n).map(|r| (r % 7 != 3).then_some((r as i32 * 13) % 71 - 20)));
    let j = Int64Array::from_iter_values((0..n).map(|r| 1 + (r as i64 * 37) % 1000));
    let x = Float64Array::from_iter((0..n).map(|r| (r % 5 != 2).then_some(doubles[r % doubles.len()])));
    let s = StringArray::from_iter((0..n).map(|r| (r % 11 != 5).then(|| texts[r % texts.len()])));
    let d = Date32Array::from_iter_values((0..n).map(|r| 19_723 + r as i32 * 37));
    let t = TimestampMicrosecondArray::from_iter_values((0..n).map(|r| (1_500_000_000 + r as i64 * 1_234_567) * 1_000_000)).with_timezone("UTC");
    let batch = RecordBatch::try_from_iter([
        ("id", std::sync::Arc::new(id) as arrow_array::ArrayRef),
        ("g", std::sync::Arc::new(g)),
        ("i", std::sync::Arc::new(i)),
        ("j", std::sync::Arc::new(j)),
        ("x", std::sync::Arc::new(x)),
        ("s", std::sync::Arc::new(s)),
        ("d", std::sync::Arc::new(d)),
        ("t", std::sync::Arc::new(t)),
    ])
    .unwrap();
    let path = dir.join("cases.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    path
}

/// Queries over the `cases` table that must give Spark's rows, types and values.
const SAME: &[(&str, &str)] = &[
    ("arithmetic_on_mixed_types", "SELECT id, i + j AS int_plus_bigint, i * x AS int_times_double, j - i AS bigint_minus_int,
        x / j AS double_over_bigint, CAST(i AS DOUBLE) / j AS cast_then_divide, j % 7 AS modulo, i % CAST(3 AS INT) AS signed_modulo,
        -i AS negated, abs(i) AS abs_int, abs(x) AS abs_double, x * 2.5e0 AS double_literal, power(x, 2) AS squared,
        sqrt(abs(x)) AS root, exp(x / 1e6) AS exponential, ln(j) AS natural_log, log10(j) AS log_ten, sign(x) AS sign
      FROM cases"),
    ("case_when", "SELECT id,
        CASE WHEN x > 1 THEN x WHEN i > 0 THEN i END AS double_or_int,
        CASE g WHEN 'a' THEN 'first' WHEN 'b' THEN 'second' END AS simple_case,
        CASE WHEN x IS NULL THEN j ELSE i END AS bigint_or_int,
        CASE WHEN s LIKE 'a%' THEN 'starts with a' WHEN s = '' THEN 'empty' ELSE s END AS text
      FROM cases"),
    ("coalesce_and_nulls", "SELECT id, COALESCE(i, j) AS int_then_bigint, COALESCE(x, i, j) AS double_int_bigint,
        COALESCE(s, g, 'none') AS text, nvl(g, 'no group') AS nvl_text, ifnull(i, j) AS if_null,
        nullif(i, CAST(0 AS INT)) AS null_if, i IS NULL AS is_null, greatest(i, j) AS greatest_skips_null, least(x, i) AS least_mixed,
        i <=> CAST(NULL AS INT) AS null_safe_equal
      FROM cases"),
    ("string_functions", "SELECT id, upper(s) AS upper, lower(s) AS lower, length(s) AS length, trim(s) AS trim,
        ltrim(s) AS ltrim, rtrim(s) AS rtrim, concat(s, '|', g) AS concat_null, concat_ws('-', s, g) AS concat_ws_skips_null,
        substring(s, 2, 3) AS substring, substring(s, 0, 2) AS substring_from_zero, substring(s, -3) AS substring_negative,
        replace(s, 'a', 'A') AS replace, reverse(s) AS reverse, instr(s, 'b') AS instr, s || g AS pipes,
        split_part(s, ',', 2) AS split_part, ascii(s) AS ascii, repeat(g, 2) AS repeat,
        lpad(s, 6, '*') AS lpad, rpad(s, 6, '*') AS rpad, left(s, 2) AS left2, right(s, 2) AS right2
      FROM cases"),
    ("date_and_time_functions", "SELECT id, extract(YEAR FROM d) AS year, extract(MONTH FROM d) AS month, extract(DAY FROM d) AS day,
        date_part('dayofweek', d) AS day_of_week, date_part('quarter', d) AS quarter, year(t) AS year_fn, month(d) AS month_fn,
        dayofmonth(d) AS dayofmonth_fn, day(d) AS day_fn, dayofweek(t) AS dayofweek_fn, quarter(d) AS quarter_fn,
        dayofyear(d) AS dayofyear_fn, weekofyear(d) AS weekofyear_fn, hour(t) AS hour, minute(t) AS minute, second(t) AS second,
        datediff(d, DATE '2024-01-01') AS days_since, date_add(d, CAST(30 AS INT)) AS plus_30_days,
        date_sub(d, CAST(1 AS INT)) AS minus_1_day, last_day(d) AS last_day, CAST(t AS DATE) AS ts_to_date,
        date_trunc('MONTH', t) AS month_start, extract(YEAR FROM t) AS extract_year,
        to_date('2026-11-27') AS parsed_date, add_months(d, CAST(1 AS INT)) AS next_month
      FROM cases"),
    ("casts", "SELECT id, CAST(i AS DOUBLE) AS int_to_double, CAST(x AS INT) AS double_to_int, CAST(j AS STRING) AS bigint_to_string,
        TRY_CAST(s AS INT) AS try_string_to_int, TRY_CAST(s AS DOUBLE) AS try_string_to_double, CAST(i AS BOOLEAN) AS int_to_boolean,
        CAST(d AS STRING) AS date_to_string, CAST('2026-11-27' AS DATE) AS string_to_date
      FROM cases"),
    ("rounding", "SELECT id, round(x) AS round_0, ceil(x) AS ceil, floor(x) AS floor,
        round(j, -1) AS round_tens
      FROM cases"),
    ("aggregates", "SELECT g, COUNT(*) AS rows, COUNT(i) AS ints, SUM(i) AS int_sum, SUM(j) AS bigint_sum, AVG(i) AS int_mean, AVG(x) AS mean,
        MIN(s) AS min_text, MAX(d) AS last_date, MIN(t) AS first_time, STDDEV(x) AS stddev, VAR_SAMP(x) AS var_samp, VARIANCE(x) AS variance, STDDEV_POP(x) AS stddev_pop,
        SUM(CASE WHEN x > 0 THEN 1 ELSE 0 END) AS positives, COUNT(DISTINCT i % 5) AS distinct_remainders, MAX(x) - MIN(x) AS spread
      FROM cases GROUP BY g"),
    ("null_ordering", "SELECT id, CAST(ROW_NUMBER() OVER (ORDER BY x, id) AS INT) AS nulls_first_up,
        CAST(ROW_NUMBER() OVER (ORDER BY x DESC, id) AS INT) AS nulls_last_down, CAST(ROW_NUMBER() OVER (ORDER BY s, id) AS INT) AS text_up
      FROM cases"),
    ("window_frames", "SELECT id, g,
        CAST(ROW_NUMBER() OVER (PARTITION BY g ORDER BY j, id) AS INT) AS row_number,
        CAST(RANK() OVER (PARTITION BY g ORDER BY i) AS INT) AS rank, CAST(DENSE_RANK() OVER (PARTITION BY g ORDER BY i) AS INT) AS dense_rank,
        SUM(j) OVER (PARTITION BY g ORDER BY i, id ROWS BETWEEN 2 PRECEDING AND CURRENT ROW) AS rows_sum,
        SUM(j) OVER (PARTITION BY g ORDER BY i) AS range_sum_with_ties,
        AVG(x) OVER (PARTITION BY g ORDER BY id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS mean_before,
        COUNT(x) OVER (PARTITION BY g ORDER BY id ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING) AS count_after,
        SUM(j) OVER (ORDER BY j RANGE BETWEEN 100 PRECEDING AND CURRENT ROW) AS range_by_value,
        LAG(x) OVER (ORDER BY id) AS previous_x, LEAD(j, 2) OVER (PARTITION BY g ORDER BY id) AS lead_2,
        FIRST_VALUE(x) OVER (PARTITION BY g ORDER BY id) AS first_x,
        LAST_VALUE(j) OVER (PARTITION BY g ORDER BY id ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS last_j,
        COUNT(*) OVER (PARTITION BY g) AS group_size, CAST(NTILE(3) OVER (ORDER BY id) AS INT) AS tercile,
        PERCENT_RANK() OVER (ORDER BY j) AS percent_rank, CUME_DIST() OVER (ORDER BY j) AS cume_dist,
        MAX(t) OVER (PARTITION BY g ORDER BY t ROWS BETWEEN 3 PRECEDING AND 1 PRECEDING) AS latest_before
      FROM cases"),
];

/// Runs `cases` on lensflow's engine over `table`: per case its result or its error.
fn cases_on_lensflow(rt: &tokio::runtime::Runtime, table: &Path, cases: &[(&str, &str)]) -> Vec<Result<Vec<RecordBatch>, String>> {
    rt.block_on(async {
        let engine = Engine::local(2).unwrap();
        engine.register_parquet("cases", &urls(&[table.to_path_buf()]), None).await.unwrap();
        let mut out = Vec::new();
        for (name, sql) in cases {
            out.push(engine.query(name, sql).await.map_err(|e| e.to_string()));
        }
        out
    })
}

#[test]
fn spark_functions_casts_and_window_frames_give_spark_s_answers() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let table = cases_table(dir.path());
    let all: Vec<(&str, &str)> = SAME.iter().copied().chain(PINNED.iter().map(|p| (p.name, p.sql))).collect();
    let ours = cases_on_lensflow(&rt, &table, &all);
    let steps: Vec<serde_json::Value> = all
        .iter()
        .map(|(name, sql)| {
            let path = dir.path().join(format!("{name}.sql"));
            std::fs::write(&path, sql).unwrap();
            serde_json::json!([name, path])
        })
        .collect();
    let spark_out = dir.path().join("spark");
    let version = on_spark(vec![serde_json::json!({"name": "functions", "tables": {"cases": [table]}, "set": {}, "steps": steps})], &spark_out);
    eprintln!("compared against Spark {version} (pyspark, local mode)");
    let spark = |name: &str| spark_step(&spark_out, "functions", name);

    let mut faults = Vec::new();
    for ((name, _), mine) in SAME.iter().zip(&ours) {
        match (mine, spark(name)) {
            (Ok(batches), Ok(theirs)) => {
                let found = differences(name, batches, &theirs);
                if found.is_empty() {
                    eprintln!("{name}: {} rows × {} columns agree", rows(batches).len(), theirs.columns.len());
                }
                faults.extend(found);
            }
            (mine, theirs) => faults.push(format!("{name}: lensflow {:?} / Spark {:?}", mine.as_ref().err(), theirs.err())),
        }
    }
    for (pin, mine) in PINNED.iter().zip(&ours[SAME.len()..]) {
        let ours = render(mine.clone().map(|b| (columns_of(&b).into_iter().map(|c| c.1).collect(), b)));
        let theirs = render(spark(pin.name).map(|s| (s.columns.into_iter().map(|c| c.1).collect(), s.batches)));
        eprintln!("{}: lensflow {ours:?}, Spark {theirs:?}", pin.name);
        if !ours.contains(pin.lensflow) || !theirs.contains(pin.spark) {
            faults.push(format!("{}: pinned lensflow {:?} / Spark {:?}, got {ours:?} / {theirs:?}", pin.name, pin.lensflow, pin.spark));
        }
    }
    assert!(faults.is_empty(), "lensflow and Spark {version} differ:\n{}", faults.join("\n"));
}

/// A known difference from Spark, pinned: what each engine gives for a one-row query, as
/// `value type` per column (or the error), so a change on either side fails the test.
struct Pin {
    name: &'static str,
    sql: &'static str,
    lensflow: &'static str,
    spark: &'static str,
}

/// The first row of a one-row answer as `value type, …`, or `error: …`.
fn render(answer: Result<(Vec<String>, Vec<RecordBatch>), String>) -> String {
    match answer {
        Err(e) => format!("error: {e}"),
        Ok((types, batches)) => {
            let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else { return "no rows".into() };
            let cells: Vec<String> = b
                .columns()
                .iter()
                .zip(types)
                .map(|(c, t)| {
                    let text = datafusion::arrow::compute::cast(&c.slice(0, 1), &DataType::Utf8).unwrap();
                    let text = text.as_any().downcast_ref::<StringArray>().unwrap();
                    format!("{} {t}", if text.is_null(0) { "NULL" } else { text.value(0) })
                })
                .collect();
            cells.join(", ")
        }
    }
}

const PINNED: &[Pin] = &[
    Pin { name: "integer_literal", sql: "SELECT 1 AS one, nullif(CAST(5 AS INT), 0) AS n", lensflow: "1 bigint, 5 bigint", spark: "1 int, 5 int" },
    Pin {
        name: "integer_division",
        sql: "SELECT 7 / 2 AS q, CAST(7 AS INT) / CAST(2 AS INT) AS typed",
        lensflow: "3 bigint, 3 int",
        spark: "3.5 double, 3.5 double",
    },
    Pin {
        name: "decimal_literal",
        sql: "SELECT 1.5 AS d, 1.0 / 3.0 AS third",
        lensflow: "1.5 double, 0.3333333333333333 double",
        spark: "1.5 decimal(2,1), 0.333333 decimal(8,6)",
    },
    Pin {
        name: "date_add_literal",
        sql: "SELECT date_add(DATE '2026-11-27', 5) AS later",
        lensflow: "argument types 'date_add(Date32, Int64)'",
        spark: "2026-12-02 date",
    },
    Pin { name: "ln_of_zero", sql: "SELECT ln(0.0) AS ln_zero", lensflow: "-inf double", spark: "NULL double" },
    Pin {
        name: "cast_invalid_string",
        sql: "SELECT CAST('abc' AS INT) AS n",
        lensflow: "Cannot cast string 'abc' to value of Int32 type",
        spark: "[CAST_INVALID_INPUT]",
    },
    Pin { name: "double_to_string", sql: "SELECT CAST(1e10 AS STRING) AS big", lensflow: "10000000000.0 string", spark: "1.0E10 string" },
    Pin {
        name: "timestamp_to_string",
        sql: "SELECT CAST(TIMESTAMP '2026-11-27 08:30:00' AS STRING) AS ts",
        lensflow: "2026-11-27T08:30:00 string",
        spark: "2026-11-27 08:30:00 string",
    },
    Pin {
        name: "round_half",
        sql: "SELECT round(CAST(2.5 AS DOUBLE)) AS up, round(CAST(-2.5 AS DOUBLE)) AS down, round(CAST(1.005 AS DOUBLE), 2) AS binary, round(2.5) AS literal",
        lensflow: "3.0 double, -3.0 double, 1.0 double, 3.0 double",
        spark: "3.0 double, -3.0 double, 1.01 double, 3 decimal(2,0)",
    },
    Pin {
        name: "double_to_decimal",
        sql: "SELECT CAST(CAST(1.005 AS DOUBLE) AS DECIMAL(10, 2)) AS d",
        lensflow: "1.00 decimal(10,2)",
        spark: "1.01 decimal(10,2)",
    },
    Pin { name: "divide_by_zero", sql: "SELECT CAST(1 AS DOUBLE) / 0 AS double_by_zero", lensflow: "inf double", spark: "[DIVIDE_BY_ZERO]" },
    Pin {
        name: "integer_overflow",
        sql: "SELECT CAST(2147483647 AS INT) + CAST(1 AS INT) AS overflow",
        lensflow: "-2147483648 int",
        spark: "[ARITHMETIC_OVERFLOW]",
    },
    Pin {
        name: "date_format_spark_pattern",
        sql: "SELECT date_format(TIMESTAMP '2026-11-27 08:30:00', 'yyyy-MM-dd HH:mm') AS f",
        lensflow: "yyyy-MM-dd HH:mm string",
        spark: "2026-11-27 08:30 string",
    },
    Pin {
        name: "date_format_chrono_pattern",
        sql: "SELECT date_format(TIMESTAMP '2026-11-27 08:30:00', '%Y-%m-%d %H:%M') AS f",
        lensflow: "2026-11-27 08:30 string",
        spark: "DATETIME_PATTERN_RECOGNITION",
    },
    Pin { name: "initcap", sql: "SELECT initcap('a,b c') AS s", lensflow: "A,B C string", spark: "A,b C string" },
    Pin {
        name: "ranking_types",
        sql: "SELECT ROW_NUMBER() OVER (ORDER BY 1) AS rn, RANK() OVER (ORDER BY 1) AS rk, NTILE(2) OVER (ORDER BY 1) AS nt",
        lensflow: "1 UInt64, 1 UInt64, 1 UInt64",
        spark: "1 int, 1 int, 1 int",
    },
    Pin {
        name: "missing_unix_timestamp",
        sql: "SELECT unix_timestamp(TIMESTAMP '2026-11-27 08:30:00') AS s",
        lensflow: "Invalid function 'unix_timestamp'",
        spark: "1795768200 bigint",
    },
    Pin { name: "missing_bround", sql: "SELECT bround(CAST(2.5 AS DOUBLE)) AS b", lensflow: "Invalid function 'bround'", spark: "2.0 double" },
];
