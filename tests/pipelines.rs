//! End to end: a pipeline that exists only as a folder in `tests/` (no Rust anywhere knows it)
//! runs through the same binary as the shipped ones — checked, produced into a real broker,
//! consumed into a lake, trained, and served over HTTP — and a broken definition is refused
//! before anything runs, naming the file, the key and the fault.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn bike_rentals() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines/bike-rentals")
}

/// Hourly rentals at 40 stations: each station has its own level, and weekends, warmth and
/// rain move it. Deterministic (a fixed linear congruential generator), so the test's figures
/// are the same on every run.
fn write_rentals(path: &Path, hours: u64) {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let levels: Vec<f64> = (0..40).map(|_| 4.0 + 26.0 * next()).collect();
    let mut csv = String::from("station,ts,temp,weekend,weather,rentals\n");
    for h in 0..hours {
        let ts = 1_700_000_000 + h * 3600;
        let weekend = u64::from((h / 24) % 7 >= 5);
        let temp = 8.0 + 12.0 * next();
        for (s, level) in levels.iter().enumerate() {
            let (weather, wet) = match next() {
                x if x < 0.2 => ("rain", 1.0),
                x if x < 0.6 => ("cloud", 0.0),
                _ => ("sun", 0.0),
            };
            let mean = level + 6.0 * weekend as f64 + 0.5 * (temp - 14.0) - 7.0 * wet;
            let rentals = (mean + 6.0 * (next() - 0.5)).round().max(0.0);
            csv += &format!("{},{ts},{temp:.1},{weekend},{weather},{rentals}\n", s + 1);
        }
    }
    std::fs::write(path, csv).unwrap();
}

/// `lensflow pipelines check` on a copy of the folder with `edit` applied to `file`.
fn check_edited(dir: &Path, file: &str, edit: impl Fn(String) -> String) -> (bool, String) {
    let copy = dir.join(format!("broken-{}", file.replace('.', "-")));
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(bike_rentals()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(copy.join(file)).unwrap();
    std::fs::write(copy.join(file), edit(text)).unwrap();
    let out = lensflow(["pipelines", "check"]).arg(&copy).output().unwrap();
    (out.status.code() == Some(2), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_pipeline_from_a_folder_runs_end_to_end_with_no_rust() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let folder = bike_rentals();
    let folder_arg = folder.to_str().unwrap();

    let out = run_ok(&mut lensflow(["pipelines", "check", folder_arg]));
    assert!(out.starts_with("ok: pipeline bike-rentals"), "{out}");
    assert!(out.contains("incremental form: yes (state per station_id, 1 window pass(es)"), "its shape is read from its SQL: {out}");

    let input = dir.path().join("rentals.csv");
    write_rentals(&input, 150);
    let lake = land_pipeline(&Broker::start(), dir.path(), &input, folder_arg, "bike-rentals", 3_000);
    let manifests = lake_manifests_of(&lake, "bike-rentals", &[]);
    assert_eq!(manifests.iter().map(|m| m.rows).sum::<u64>(), 6_000);
    assert!(manifests.len() >= 2, "{} batches", manifests.len());
    assert!(manifests.iter().all(|m| m.min_ts.is_some()), "the time column gives each batch its time span");

    let models = dir.path().join("models");
    let rounds = train_json(&lake, &models, &["--pipeline", folder_arg]);
    assert_eq!(rounds.len(), manifests.len());
    let last = rounds.last().unwrap();
    eprintln!("bike-rentals: {last}");
    let f = |k: &str| last[k].as_f64().unwrap();
    assert!(f("rmse") < 0.8 * f("rmse_baseline"), "the station, the weekend and the weather explain rentals: {last}");
    assert!(f("auc") > 0.8 && f("accuracy") > f("accuracy_baseline"), "{last}");

    let server = Server::start(&models, &["--default-pipeline", "bike-rentals"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = reqwest::blocking::Client::new();
    let predict = |body: &Value| {
        let r = client.post(server.url("/pipelines/bike-rentals/predict")).json(body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    loop {
        let ready = reqwest::blocking::get(server.url("/readyz")).map(|r| r.status().is_success()).unwrap_or(false);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "the server never loaded the bike-rentals round");
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed: Value = reqwest::blocking::get(server.url("/pipelines")).unwrap().json().unwrap();
    assert!(listed.to_string().contains("bike-rentals"), "{listed}");

    // A busy station on a warm weekend afternoon, and a quiet one in the rain on a weekday.
    let (status, busy) = predict(&json!({"station": 1, "temp": 19.5, "weekend": 1, "weather": "sun"}));
    assert_eq!(status, 200, "{busy}");
    for key in ["busy", "probability_busy", "predicted_rentals", "station_kind", "segment", "known_station", "round", "features"] {
        assert!(busy.get(key).is_some(), "the answer lacks {key}: {busy}");
    }
    assert_eq!(busy["known_station"], true);
    let (_, quiet) = predict(&json!({"station": 1, "temp": 9.0, "weekend": 0, "weather": "rain"}));
    assert!(
        busy["predicted_rentals"].as_f64().unwrap() > quiet["predicted_rentals"].as_f64().unwrap() + 5.0,
        "warmth, the weekend and dry weather raise the forecast: {busy} vs {quiet}"
    );
    let (_, unknown) = predict(&json!({"station": 999, "temp": 15.0, "weekend": 0, "weather": "cloud"}));
    assert_eq!(unknown["known_station"], false, "an unknown station gets the overall prior: {unknown}");

    // Bad input is named by its wire name, as the definition declares it.
    let (status, err) = predict(&json!({"station": 1, "temp": 15.0, "weekend": 0, "weather": "snow"}));
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["field"], "weather", "{err}");
    assert!(err["error"].as_str().unwrap().contains("one of sun, cloud, rain"), "{err}");
}

#[test]
fn a_broken_definition_is_refused_naming_the_file_the_key_and_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    // (file to break, how, what the error must name)
    type Case = (&'static str, fn(String) -> String, &'static [&'static str]);
    let cases: [Case; 5] = [
        ("pipeline.toml", |t| t.replace("key = \"station_id\"", "key = \"station_nr\""), &["pipeline.toml", "events.key", "unknown column `station_nr`"]),
        (
            "pipeline.toml",
            |t| t.replace("target = \"rentals_n\"", "target = \"rentals_count\""),
            &["features.sql", "models.regression.target", "rentals_count"],
        ),
        ("pipeline.toml", |t| t.replace("type = \"string\"", "type = \"text\""), &["pipeline.toml", "line", "text"]),
        ("features.sql", |t| t.replace("temperature AS temp_c", "temperatur AS temp_c"), &["features.sql", "temperatur"]),
        ("features.sql", |t| t.replace("LN(1.0 + s_n) AS station_log_n", "LN(1.0 + rentals) AS station_log_n"), &["rentals"]),
    ];
    for (file, edit, expected) in cases {
        let (refused, stderr) = check_edited(dir.path(), file, edit);
        assert!(refused, "exit code 2 for a fault in {file}: {stderr}");
        for part in expected {
            assert!(stderr.contains(part), "the error names {part:?}: {stderr}");
        }
    }
}

#[test]
fn logs_are_plain_text_in_a_pipe_and_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let lake = format!("file://{}", dir.path().join("lake").display());
    // An empty lake: `sql` warns that a pipeline has no committed batch yet.
    let run = |format: &str| {
        lensflow(["sql", "--lake", &lake, "--models", "none", "--format", "csv", "--log-format", format, "-e", "SELECT 1 AS one"]).output().unwrap()
    };
    let text = run("text");
    assert!(text.status.success());
    let log = String::from_utf8_lossy(&text.stderr);
    assert!(log.contains("WARN") && log.contains("no committed batch yet"), "{log}");
    assert!(!log.contains('\u{1b}'), "no colour codes in a pipe: {log:?}");
    let json = run("json");
    let log = String::from_utf8_lossy(&json.stderr);
    let lines: Vec<serde_json::Value> =
        log.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    assert!(lines.iter().any(|l| l["level"] == "WARN" && l["fields"]["message"].as_str().is_some_and(|m| m.contains("no committed batch yet"))), "{log}");
}
