//! End to end: `lensflow serve` over real HTTP on rounds the real trainer made from
//! ratings_small (landed through a real broker), including new rounds published while clients
//! keep asking.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use lensflow_core::model::{LatestPointer, sha256_hex};
use serde_json::{Value, json};

/// Three rounds trained from ratings_small in three batches, made once for every test here.
fn trained() -> &'static Path {
    static MODELS: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, models) = MODELS.get_or_init(|| {
        let _heavy = heavy();
        let dir = tempfile::tempdir().unwrap();
        let lake = land(&Broker::start(), dir.path(), &ratings_small(), "ratings", 33_335);
        let models = dir.path().join("models");
        assert_eq!(train_json(&lake, &models, &[]).len(), 3);
        (dir, models)
    });
    models
}

fn post(client: &reqwest::blocking::Client, url: &str, body: &Value) -> (u16, Value) {
    let res = client.post(url).json(body).send().unwrap();
    (res.status().as_u16(), res.json().unwrap())
}

fn metric(server: &Server, name: &str) -> f64 {
    let text = reqwest::blocking::get(server.url("/metrics")).unwrap().text().unwrap();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn rounds_from_the_real_trainer_answer_over_http() {
    let models = trained();
    let server = Server::start(models, &[]);
    server.wait_round(3, Duration::from_secs(30));
    let client = reqwest::blocking::Client::new();

    // The seed's request shapes and answer fields.
    let (status, v) = post(&client, &server.url("/predict_classification"), &json!([{"userId": 1, "movieId": 31}]));
    assert_eq!(status, 200, "{v}");
    assert!(matches!(v[0]["prediction_like"].as_u64(), Some(0 | 1)) && v[0]["userId"] == 1 && v[0]["movieId"] == 31, "{v}");
    let (_, v) = post(&client, &server.url("/predict_clustering"), &json!({"userId": 547, "movieId": 1}));
    let segments = v["cluster_id"].as_u64().unwrap();
    assert!(segments < 4 && !v["segment"].as_str().unwrap().is_empty(), "{v}");

    // Every 50th rating of the file, asked as one batch: the answers must carry the signal the
    // round's metrics claim (the lookup tables include these ratings, so this is an upper bound
    // on quality, but a misread table or a swapped id would fall to the baseline or below).
    let csv = std::fs::read_to_string(ratings_small()).unwrap();
    let sample: Vec<(i64, i64, f64)> = csv
        .lines()
        .skip(1)
        .step_by(50)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    let asks: Vec<Value> = sample.iter().map(|(u, m, _)| json!({"userId": u, "movieId": m})).collect();
    let (status, answers) = post(&client, &server.url("/predict"), &Value::Array(asks));
    assert_eq!(status, 200);
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), sample.len());
    let (mut se, mut hits) = (0.0, 0);
    for ((u, m, rating), a) in sample.iter().zip(answers) {
        assert_eq!((a["userId"].as_i64(), a["movieId"].as_i64(), a["round"].as_u64()), (Some(*u), Some(*m), Some(3)));
        assert!(a["known_user"].as_bool().unwrap() && a["known_movie"].as_bool().unwrap(), "{a}");
        se += (a["predicted_rating"].as_f64().unwrap() - rating).powi(2);
        hits += usize::from((a["prediction_like"] == 1) == (*rating >= 4.0));
    }
    let rmse = (se / sample.len() as f64).sqrt();
    let accuracy = hits as f64 / sample.len() as f64;
    eprintln!("{} ratings through the API: RMSE {rmse:.4}, accuracy {accuracy:.4}", sample.len());
    let models_v: Value = reqwest::blocking::get(server.url("/models")).unwrap().json().unwrap();
    let m = &models_v["serving"]["metrics"];
    assert!(rmse < m["rmse_baseline"].as_f64().unwrap() - 0.1, "API RMSE {rmse} vs {m}");
    assert!(accuracy > m["accuracy_baseline"].as_f64().unwrap() + 0.1, "API accuracy {accuracy} vs {m}");
    let rounds: Vec<u64> = models_v["rounds"].as_array().unwrap().iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, [1, 2, 3]);
    assert_eq!(models_v["serving"]["lineage"]["rows"], 100_004);

    // The pipeline status comes from the lake the round names.
    let status_v: Value = reqwest::blocking::get(server.url("/status")).unwrap().json().unwrap();
    assert_eq!((status_v["batches"].as_u64(), status_v["ratings"].as_u64(), status_v["round"].as_u64()), (Some(3), Some(100_004), Some(3)), "{status_v}");
    assert_eq!(status_v["batches_behind"], 0);

    // Bad input over the wire: status and the field at fault.
    let res = client.post(server.url("/predict")).body("{\"userId\": 1").header("content-type", "application/json").send().unwrap();
    assert_eq!(res.status().as_u16(), 400);
    assert_eq!(res.json::<Value>().unwrap()["field"], "body");
    let (status, v) = post(&client, &server.url("/predict_regression"), &json!([{"userId": 1, "movieId": 31}, {"userId": 1}]));
    assert_eq!((status, v["field"].as_str()), (422, Some("[1].movieId")), "{v}");
    assert_eq!(metric(&server, "lensflow_predictions_total{task=\"all\"}"), sample.len() as f64);

    // Ctrl-C: a clean, prompt exit.
    let mut server = server;
    interrupt(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(15), "lensflow serve");
    assert!(status.success(), "serve exited with {status}");
}

/// Copies round `round` from `from` into `to` (files first) and points `to`'s LATEST at it.
fn publish(from: &Path, to: &Path, round: u64) {
    let dir = format!("round-{round:06}");
    std::fs::create_dir_all(to.join(&dir)).unwrap();
    for file in ["users.parquet", "movies.parquet", "model.json"] {
        std::fs::copy(from.join(&dir).join(file), to.join(&dir).join(file)).unwrap();
    }
    let sum = sha256_hex(&std::fs::read(to.join(&dir).join("model.json")).unwrap());
    point(to, &LatestPointer { round, path: dir, model_sha256: sum });
}

fn point(models: &Path, pointer: &LatestPointer) {
    // Written aside and renamed, as an object store's put replaces an object whole.
    let tmp = models.join("LATEST.tmp");
    std::fs::write(&tmp, serde_json::to_vec(pointer).unwrap()).unwrap();
    std::fs::rename(tmp, models.join("LATEST")).unwrap();
}

#[test]
fn new_rounds_swap_in_under_load_without_a_failed_request() {
    let trained = trained();
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("models");
    publish(trained, &live, 1);
    let server = Server::start(&live, &["--poll-interval", "100ms"]);
    server.wait_round(1, Duration::from_secs(30));

    let stop = AtomicBool::new(false);
    let results: Vec<(u64, Vec<u64>)> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let (stop, url) = (&stop, server.url("/predict"));
                s.spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    let (mut failed, mut rounds) = (0u64, Vec::new());
                    let mut i = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let movie = [1, 31, 50, 296, 593][(i % 5) as usize];
                        let ask = json!([{"userId": 1 + (i * 7 + c) % 671, "movieId": movie}]);
                        match client.post(&url).json(&ask).send() {
                            Ok(res) if res.status().is_success() => rounds.push(res.json::<Value>().unwrap()[0]["round"].as_u64().unwrap()),
                            _ => failed += 1,
                        }
                    }
                    (failed, rounds)
                })
            })
            .collect();

        std::thread::sleep(Duration::from_millis(500));
        publish(trained, &live, 2);
        server.wait_round(2, Duration::from_secs(10));
        // A LATEST whose checksum disowns its model.json: refused, round 2 keeps serving.
        publish(trained, &live, 3);
        point(&live, &LatestPointer { round: 3, path: "round-000003".into(), model_sha256: "0".repeat(64) });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metric(&server, "lensflow_model_refused_total") < 1.0 {
            assert!(std::time::Instant::now() < deadline, "the corrupt round was not noticed");
            std::thread::sleep(Duration::from_millis(50));
        }
        server.wait_round(2, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(300));
        publish(trained, &live, 3);
        server.wait_round(3, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });

    let total: usize = results.iter().map(|(_, r)| r.len()).sum();
    let failed: u64 = results.iter().map(|(f, _)| f).sum();
    eprintln!("{total} answers during three swaps, {failed} failed");
    assert_eq!(failed, 0, "no request may fail during a swap");
    for (_, rounds) in &results {
        assert!(rounds.windows(2).all(|w| w[0] <= w[1]), "a client saw rounds go backwards: {rounds:?}");
        assert_eq!((rounds.first(), rounds.last()), (Some(&1), Some(&3)), "answers move from round 1 to 3");
        assert!(rounds.contains(&2));
    }
    assert_eq!(metric(&server, "lensflow_model_swaps_total"), 3.0);
    assert_eq!(metric(&server, "lensflow_model_round"), 3.0);
}

#[test]
fn the_web_page_works_in_a_real_browser() {
    let models = trained();
    let server = Server::start(models, &[]);
    server.wait_round(3, Duration::from_secs(30));
    let node = tool("node", "LENSFLOW_NODE", "apt-get install nodejs");
    let chromium = tool("chromium", "CHROMIUM", "apt-get install chromium");
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(browser_dir.join("node_modules/playwright-core").is_dir(), "run `npm ci --prefix tests/browser` (bash .ci/run does)");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let out = std::process::Command::new(node)
        .current_dir(&browser_dir)
        .arg("ui.mjs")
        .arg(server.url("/"))
        .arg(&shots)
        .env("CHROMIUM", chromium)
        .output()
        .unwrap();
    assert!(out.status.success(), "browser run failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("the page showed: {page}\nscreenshots in {}", shots.display());

    // The three answers are the API's own for the same question.
    let (_, api) = post(&reqwest::blocking::Client::new(), &server.url("/predict"), &json!({"userId": 547, "movieId": 1}));
    let shown = &page["answer"];
    let raw = |card: &str| shown[card]["raw"].as_str().unwrap().parse::<f64>().unwrap();
    assert_eq!(raw("classification"), api["probability_like"].as_f64().unwrap());
    assert!(shown["classification"]["value"].as_str().unwrap().starts_with(if api["prediction_like"] == 1 { "Yes" } else { "No" }));
    assert_eq!(raw("regression"), api["predicted_rating"].as_f64().unwrap());
    assert_eq!(raw("clustering"), api["cluster_id"].as_f64().unwrap());
    assert_eq!(shown["clustering"]["detail"], api["segment"]);
    assert!(page["whatIf"]["raw"].as_str().unwrap().parse::<f64>().unwrap() < raw("regression"), "a lower movie mean lowers the rating: {page}");

    // The metrics chart: three rounds of model and baseline in each chart, the served round marked.
    let charts = page["charts"].as_array().unwrap();
    assert_eq!(charts.len(), 2, "{page}");
    for chart in charts {
        assert_eq!((chart["points"].as_u64(), chart["servingMarks"].as_u64()), (Some(6), Some(1)), "{chart}");
    }
    // The segments chart: the served round's segments, sizes and words.
    let models_v: Value = reqwest::blocking::get(server.url("/models")).unwrap().json().unwrap();
    let segments = models_v["serving"]["segments"].as_array().unwrap();
    let sizes: Vec<u64> = segments.iter().map(|s| s["size"].as_u64().unwrap()).collect();
    assert_eq!(page["segmentSizes"], json!(sizes));
    for (s, text) in segments.iter().zip(page["segmentTexts"].as_array().unwrap()) {
        assert!(text.as_str().unwrap().ends_with(s["description"].as_str().unwrap()), "{text}");
    }
    assert_eq!(page["profileRows"].as_u64(), Some(segments.len() as u64));
    assert_eq!((page["status"]["Batches"].as_str(), page["status"]["Ratings landed"].as_str()), (Some("3"), Some("100,004")), "{page}");
    assert!(page["serving"].as_str().unwrap().contains("round 3"));
    assert_eq!(page["userSuggestions"], 20);

    // Errors next to their fields; a phone-width screen needs no sideways scrolling.
    assert!(page["userError"]["text"].as_str().unwrap().contains("positive id"), "{page}");
    assert_eq!(page["userError"]["invalid"], "true");
    assert!(page["featureError"].as_str().unwrap().contains("between 0.5 and 5"), "{page}");
    assert!(page["phoneOverflow"].as_i64().unwrap() <= 0, "wider than a phone: {page}");
    for e in page["consoleErrors"].as_array().unwrap() {
        assert!(e.as_str().unwrap().contains("422"), "only the two bad inputs may log errors: {e}");
    }
    for shot in ["desktop.png", "phone.png"] {
        assert!(std::fs::metadata(shots.join(shot)).unwrap().len() > 10_000, "{shot} is empty");
    }
}
