//! End to end: `lensflow serve` over real HTTP on rounds the real trainer made, for both shipped
//! pipelines in one model store: MovieLens from ratings_small and smart-home from the published
//! device file, each landed through a real broker in three batches. Includes new rounds
//! published while clients keep asking, and the web page in a real browser.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use lensflow_core::model::{LATEST, LatestPointer, MODEL_FILE, round_dir, sha256_hex};
use serde_json::{Value, json};

/// Three rounds of each pipeline, trained from the real files in three batches each, made once
/// for every test here: (lake root, model store root).
fn trained() -> (&'static str, &'static Path) {
    static TRAINED: OnceLock<(tempfile::TempDir, String, PathBuf)> = OnceLock::new();
    let (_, lake, models) = TRAINED.get_or_init(|| {
        let _heavy = heavy();
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start();
        let lake = land_pipeline(&broker, dir.path(), &ratings_small(), "movielens", "ratings", 33_335);
        land_pipeline(&broker, dir.path(), &smart_home_csv(), "smart-home", "smart-home-devices", 1_801);
        let models = dir.path().join("models");
        for pipeline in ["movielens", "smart-home"] {
            assert_eq!(train_json(&lake, &models, &["--pipeline", pipeline]).len(), 3, "{pipeline}");
        }
        (dir, lake, models)
    });
    (lake, models)
}

fn post(client: &reqwest::blocking::Client, url: &str, body: &Value) -> (u16, Value) {
    let res = client.post(url).json(body).send().unwrap();
    (res.status().as_u16(), res.json().unwrap())
}

fn get(server: &Server, path: &str) -> Value {
    reqwest::blocking::get(server.url(path)).unwrap().json().unwrap()
}

/// A metric's value; `name` includes its labels, e.g. `lensflow_model_round{pipeline="movielens"}`.
fn metric(server: &Server, name: &str) -> f64 {
    let text = reqwest::blocking::get(server.url("/metrics")).unwrap().text().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).filter(|v| v.starts_with(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Waits until every pipeline `/pipelines` lists serves `round`.
fn wait_all(server: &Server, pipelines: &[&str], round: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let listed = reqwest::blocking::get(server.url("/pipelines")).and_then(|r| r.json::<Value>()).unwrap_or(Value::Null);
        let rounds: Vec<(String, Option<u64>)> = listed["pipelines"]
            .as_array()
            .map(|a| a.iter().map(|p| (p["name"].as_str().unwrap_or("").to_string(), p["round"].as_u64())).collect())
            .unwrap_or_default();
        if pipelines.iter().all(|name| rounds.iter().any(|(n, r)| n == name && *r == Some(round))) {
            return;
        }
        assert!(Instant::now() < deadline, "not every pipeline at round {round} within {limit:?}: {listed}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The device file's rows as requests (the request fields by wire name) and their label.
fn devices(every: usize) -> Vec<(Value, bool)> {
    let mut reader = csv::Reader::from_path(smart_home_csv()).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_string).collect();
    reader
        .records()
        .step_by(every)
        .map(|r| {
            let r = r.unwrap();
            let mut ask = serde_json::Map::new();
            let mut efficient = false;
            for (name, value) in header.iter().zip(r.iter()) {
                match name.as_str() {
                    "UserID" => {}
                    "SmartHomeEfficiency" => efficient = value == "1",
                    "DeviceType" => {
                        ask.insert(name.clone(), json!(value));
                    }
                    _ => {
                        ask.insert(name.clone(), json!(value.parse::<f64>().unwrap()));
                    }
                }
            }
            (Value::Object(ask), efficient)
        })
        .collect()
}

#[test]
fn rounds_from_the_real_trainer_answer_over_http() {
    let (_, models) = trained();
    let server = Server::start(models, &[]);
    wait_all(&server, &["movielens", "smart-home"], 3, Duration::from_secs(30));
    assert_eq!(reqwest::blocking::get(server.url("/readyz")).unwrap().text().unwrap(), "ready: round 3, smart-home round 3");
    let client = reqwest::blocking::Client::new();

    // The seed's request shapes and answer fields, on the default pipeline's seed routes.
    let (status, v) = post(&client, &server.url("/predict_classification"), &json!([{"userId": 1, "movieId": 31}]));
    assert_eq!(status, 200, "{v}");
    assert!(matches!(v[0]["prediction_like"].as_u64(), Some(0 | 1)) && v[0]["userId"] == 1 && v[0]["movieId"] == 31, "{v}");
    let (_, v) = post(&client, &server.url("/predict_clustering"), &json!({"userId": 547, "movieId": 1}));
    assert!(v["cluster_id"].as_u64().unwrap() < 4 && !v["segment"].as_str().unwrap().is_empty(), "{v}");

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
    let models_v = get(&server, "/models");
    let m = &models_v["serving"]["metrics"];
    assert!(rmse < m["rmse_baseline"].as_f64().unwrap() - 0.1, "API RMSE {rmse} vs {m}");
    assert!(accuracy > m["accuracy_baseline"].as_f64().unwrap() + 0.1, "API accuracy {accuracy} vs {m}");
    let rounds: Vec<u64> = models_v["rounds"].as_array().unwrap().iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, [1, 2, 3]);
    assert_eq!(models_v["serving"]["lineage"]["rows"], 100_004);
    assert_eq!(models_v, get(&server, "/pipelines/movielens/models"), "the seed route is the default pipeline's");

    // The pipeline status comes from the lake the round names.
    let status_v = get(&server, "/status");
    assert_eq!((status_v["batches"].as_u64(), status_v["events"].as_u64(), status_v["round"].as_u64()), (Some(3), Some(100_004), Some(3)), "{status_v}");
    assert_eq!(status_v["batches_behind"], 0);

    // Smart-home: every 10th device as one batch on its own route; the classifier must beat the
    // majority class, as its round's metrics say it does.
    let devices = devices(10);
    let asks: Vec<Value> = devices.iter().map(|(ask, _)| ask.clone()).collect();
    let (status, answers) = post(&client, &server.url("/pipelines/smart-home/predict"), &Value::Array(asks));
    assert_eq!(status, 200, "{answers}");
    let answers = answers.as_array().unwrap();
    let hits = devices.iter().zip(answers).filter(|((_, efficient), a)| (a["prediction_efficient"] == 1) == *efficient).count();
    let accuracy = hits as f64 / devices.len() as f64;
    let home = get(&server, "/pipelines/smart-home/models");
    let m = &home["serving"]["metrics"];
    eprintln!("{} devices through the API: accuracy {accuracy:.4} (round: {m})", devices.len());
    assert!(accuracy > m["accuracy_baseline"].as_f64().unwrap() + 0.05, "API accuracy {accuracy} vs {m}");
    for a in answers {
        assert!(a["predicted_incidents"].as_f64().is_some_and(|y| (0.0..=4.0).contains(&y)) && a["cluster_id"].is_u64() && a["round"] == 3, "{a}");
        assert!(a.get("prediction_like").is_none() && a.get("known_user").is_none(), "{a}");
    }
    assert_eq!(home["serving"]["lineage"]["rows"], 5_403);
    let status_v = get(&server, "/pipelines/smart-home/status");
    assert_eq!((status_v["batches"].as_u64(), status_v["events"].as_u64()), (Some(3), Some(5_403)), "{status_v}");

    // The OpenAPI description has both pipelines' routes.
    let api = get(&server, "/openapi.json");
    for path in ["/predict", "/pipelines/movielens/predict", "/pipelines/smart-home/predict_regression", "/pipelines/smart-home/status"] {
        assert!(api["paths"].get(path).is_some(), "{path} missing");
    }

    // Bad input over the wire: status and the field at fault.
    let res = client.post(server.url("/predict")).body("{\"userId\": 1").header("content-type", "application/json").send().unwrap();
    assert_eq!(res.status().as_u16(), 400);
    assert_eq!(res.json::<Value>().unwrap()["field"], "body");
    let (status, v) = post(&client, &server.url("/predict_regression"), &json!([{"userId": 1, "movieId": 31}, {"userId": 1}]));
    assert_eq!((status, v["field"].as_str()), (422, Some("[1].movieId")), "{v}");
    let mut toaster = devices[0].0.clone();
    toaster["DeviceType"] = json!("Toaster");
    let (status, v) = post(&client, &server.url("/pipelines/smart-home/predict"), &toaster);
    assert_eq!((status, v["field"].as_str()), (422, Some("DeviceType")), "{v}");
    assert_eq!(metric(&server, "lensflow_predictions_total{task=\"all\",pipeline=\"movielens\"}"), sample.len() as f64);
    assert_eq!(metric(&server, "lensflow_predictions_total{task=\"all\",pipeline=\"smart-home\"}"), devices.len() as f64);

    // Ctrl-C: a clean, prompt exit.
    let mut server = server;
    interrupt(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(15), "lensflow serve");
    assert!(status.success(), "serve exited with {status}");
}

/// Copies round `round` of `pipeline` from the store `from` into the store `to` (files first)
/// and points `to`'s LATEST of that pipeline at it.
fn publish(from: &Path, to: &Path, pipeline: &str, round: u64) {
    let dir = round_dir(round);
    let (src, dst) = (from.join(pipeline).join(&dir), to.join(pipeline).join(&dir));
    std::fs::create_dir_all(&dst).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name()).collect();
    // model.json last, as the trainer writes it.
    files.sort_by_key(|f| f == MODEL_FILE);
    for file in files {
        std::fs::copy(src.join(&file), dst.join(&file)).unwrap();
    }
    let sum = sha256_hex(&std::fs::read(dst.join(MODEL_FILE)).unwrap());
    point(&to.join(pipeline), &LatestPointer { round, path: dir, model_sha256: sum });
}

fn point(store: &Path, pointer: &LatestPointer) {
    // Written aside and renamed, as an object store's put replaces an object whole.
    let tmp = store.join("LATEST.tmp");
    std::fs::write(&tmp, serde_json::to_vec(pointer).unwrap()).unwrap();
    std::fs::rename(tmp, store.join(LATEST)).unwrap();
}

/// Sets its flag when dropped, also while a panic unwinds.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn new_rounds_swap_in_under_load_without_a_failed_request() {
    let (_, trained) = trained();
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("models");
    publish(trained, &live, "movielens", 1);
    publish(trained, &live, "smart-home", 3);
    let server = Server::start(&live, &["--poll-interval", "100ms"]);
    server.wait_ready("ready: round 1, smart-home round 3", Duration::from_secs(30));
    let round_of = |p: &str| format!("lensflow_model_round{{pipeline=\"{p}\"}}");

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

        // Stops the clients however this ends: a failed check must not leave them asking forever.
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(500));
        publish(trained, &live, "movielens", 2);
        server.wait_ready("ready: round 2, smart-home round 3", Duration::from_secs(10));
        // A LATEST whose checksum disowns its model.json: refused, round 2 keeps serving.
        publish(trained, &live, "movielens", 3);
        point(&live.join("movielens"), &LatestPointer { round: 3, path: round_dir(3), model_sha256: "0".repeat(64) });
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&server, "lensflow_model_refused_total{pipeline=\"movielens\"}") < 1.0 {
            assert!(Instant::now() < deadline, "the corrupt round was not noticed");
            std::thread::sleep(Duration::from_millis(50));
        }
        server.wait_ready("ready: round 2, smart-home round 3", Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(300));
        publish(trained, &live, "movielens", 3);
        server.wait_ready("ready: round 3, smart-home round 3", Duration::from_secs(10));
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
    assert_eq!(metric(&server, "lensflow_model_swaps_total{pipeline=\"movielens\"}"), 3.0);
    assert_eq!(metric(&server, &round_of("movielens")), 3.0);
    // The other pipeline was loaded once and left alone.
    assert_eq!((metric(&server, &round_of("smart-home")), metric(&server, "lensflow_model_swaps_total{pipeline=\"smart-home\"}")), (3.0, 1.0));
}

#[test]
fn the_web_page_works_in_a_real_browser() {
    let (lake, models) = trained();
    let server = Server::start(models, &["--lake", lake]);
    wait_all(&server, &["movielens", "smart-home"], 3, Duration::from_secs(30));
    let node = tool("node", "LENSFLOW_NODE", "apt-get install nodejs");
    let chromium = tool("chromium", "CHROMIUM", "apt-get install chromium");
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(browser_dir.join("node_modules/playwright-core").is_dir(), "run `npm ci --prefix tests/browser` (bash .ci/run does)");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let out =
        std::process::Command::new(node).current_dir(&browser_dir).arg("ui.mjs").arg(server.url("/")).arg(&shots).env("CHROMIUM", chromium).output().unwrap();
    assert!(out.status.success(), "browser run failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("the page showed: {page}\nscreenshots in {}", shots.display());
    check_page(&server, &page)
}

/// Checks what the browser saw against the API's own answers.
fn check_page(server: &Server, page: &Value) {
    let client = reqwest::blocking::Client::new();
    assert_eq!(page["pipelines"], json!(["movielens", "smart-home"]), "the default first");
    let raw = |shown: &Value, card: &str| shown[card]["raw"].as_str().unwrap().parse::<f64>().unwrap();

    for (name, key, ask, events) in [
        ("movielens", "movielens", json!({"userId": 547, "movieId": 1}), "100,004"),
        (
            "smart-home",
            "smartHome",
            json!({"DeviceType": "Camera", "UsageHoursPerDay": 10, "EnergyConsumption": 2, "UserPreferences": 1, "MalfunctionIncidents": 0, "DeviceAgeMonths": 20}),
            "5,403",
        ),
    ] {
        let seen = &page[key];
        let models = get(server, &format!("/pipelines/{name}/models"));
        let m = &models["serving"]["models"];
        // The three answers are the API's own for the same question.
        let (_, api) = post(&client, &server.url(&format!("/pipelines/{name}/predict")), &ask);
        let shown = &seen["answer"];
        let field = |task: &str, key: &str| m[task][key].as_str().unwrap().to_string();
        assert_eq!(raw(shown, "classification"), api[field("classification", "probability")].as_f64().unwrap(), "{name}: {seen}");
        let yes = api[field("classification", "answer")] == 1;
        assert!(shown["classification"]["value"].as_str().unwrap().starts_with(if yes { "Yes" } else { "No" }), "{name}: {shown}");
        assert_eq!(raw(shown, "regression"), api[field("regression", "answer")].as_f64().unwrap(), "{name}: {shown}");
        assert_eq!(raw(shown, "clustering"), api[field("clustering", "answer")].as_f64().unwrap(), "{name}: {shown}");
        assert_eq!(shown["clustering"]["detail"], api["segment"], "{name}");

        // Three charts, each metric beside its baseline over three rounds; the served round marked.
        let charts = seen["charts"].as_array().unwrap();
        assert_eq!(charts.len(), 3, "{name}: {seen}");
        for chart in charts {
            assert_eq!((chart["points"].as_u64(), chart["servingMarks"].as_u64()), (Some(6), Some(1)), "{name}: {chart}");
        }
        // The segments chart: the served round's segments, sizes and words.
        let segments = models["serving"]["segments"].as_array().unwrap();
        let sizes: Vec<u64> = segments.iter().map(|s| s["size"].as_u64().unwrap()).collect();
        assert_eq!(seen["segmentSizes"], json!(sizes), "{name}");
        for (s, text) in segments.iter().zip(seen["segmentTexts"].as_array().unwrap()) {
            assert!(text.as_str().unwrap().ends_with(s["description"].as_str().unwrap()), "{name}: {text}");
        }
        assert_eq!(seen["profileRows"].as_u64(), Some(segments.len() as u64), "{name}");
        assert_eq!((seen["status"]["Batches"].as_str(), seen["status"]["Events landed"].as_str()), (Some("3"), Some(events)), "{name}: {seen}");
        assert!(seen["serving"].as_str().unwrap().contains(&format!("round 3 of {name}")), "{name}: {seen}");

        // The form is the pipeline's request fields, each labelled, as /models describes them.
        let fields: Vec<&str> = seen["fields"].as_array().unwrap().iter().map(|f| f["field"].as_str().unwrap()).collect();
        let wires: Vec<&str> = models["serving"]["request"].as_array().unwrap().iter().map(|f| f["wire"].as_str().unwrap()).collect();
        assert_eq!(fields, wires, "{name}");
        assert!(seen["fields"].as_array().unwrap().iter().all(|f| f["label"].is_string()), "{name}: every control has a label");
    }

    let ml = &page["movielens"];
    let user = ml["fields"].as_array().unwrap().iter().find(|f| f["field"] == "userId").unwrap();
    assert_eq!((user["tag"].as_str(), user["suggestions"].as_u64()), (Some("input"), Some(20)), "lookup ids come with suggestions: {user}");
    let number = |v: &Value| v.as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
    assert!(number(&ml["whatIf"]["raw"]) < number(&ml["answer"]["regression"]["raw"]), "a lower movie mean lowers the rating: {ml}");
    assert!(ml["userError"]["text"].as_str().unwrap().contains("out of range"), "{ml}");
    assert_eq!(ml["userError"]["invalid"], "true");
    assert!(ml["featureError"].as_str().unwrap().contains("between 0.5 and 5"), "{ml}");

    let home = &page["smartHome"];
    assert_eq!(home["hash"], "#smart-home", "the choice is in the address, for a link");
    let device = home["fields"].as_array().unwrap().iter().find(|f| f["field"] == "DeviceType").unwrap();
    assert_eq!(
        (device["tag"].as_str(), device["options"].as_array().map(Vec::len)),
        (Some("select"), Some(5)),
        "a category is a select of its values: {device}"
    );
    let hours = home["fields"].as_array().unwrap().iter().find(|f| f["field"] == "UsageHoursPerDay").unwrap();
    assert_eq!((hours["min"].as_str(), hours["max"].as_str()), (Some("0"), Some("24")), "{hours}");
    assert_eq!(home["tabbedTo"], json!(["EnergyConsumption", "UserPreferences", "MalfunctionIncidents", "DeviceAgeMonths"]), "Tab moves field to field");
    assert!(home["hoursError"]["text"].as_str().unwrap().contains("out of range (0 to 24)"), "{home}");
    assert_eq!(home["hoursError"]["invalid"], "true");

    for (pipeline, overflow) in page["phoneOverflow"].as_object().unwrap() {
        assert!(overflow.as_i64().unwrap() <= 0, "{pipeline} is wider than a phone: {page}");
    }
    for e in page["consoleErrors"].as_array().unwrap() {
        assert!(e.as_str().unwrap().contains("422"), "only the three bad inputs may log errors: {e}");
    }
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    for shot in ["desktop-movielens.png", "desktop-smart-home.png", "phone-movielens.png", "phone-smart-home.png"] {
        assert!(std::fs::metadata(shots.join(shot)).unwrap().len() > 10_000, "{shot} is empty");
    }
}
