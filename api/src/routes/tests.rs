//! The router through `oneshot`, on hand-made rounds of the shipped pipelines in a temporary
//! model store.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::testing::{self, publish, publish_artifact};
use crate::{ApiError, AppState, Limits, ServeOptions, app};

async fn state_for(models: &std::path::Path, limits: Limits) -> AppState {
    let mut opts = ServeOptions::new(models.to_str().unwrap());
    opts.limits = limits;
    crate::state(&opts).await.unwrap()
}

async fn call(app: &Router, method: &str, uri: &str, body: impl Into<Body>) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(uri).header("content-type", "application/json").body(body.into()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn post(app: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    call(app, "POST", uri, body.to_string()).await
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    call(app, "GET", uri, Body::empty()).await
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-12)
}

/// A camera: 10 h a day, 2 kWh, automation preferred, no malfunctions, 20 months old.
fn camera() -> Value {
    json!({"DeviceType": "Camera", "UsageHoursPerDay": 10, "EnergyConsumption": 2.0, "UserPreferences": 1, "MalfunctionIncidents": 0, "DeviceAgeMonths": 20})
}

#[tokio::test]
async fn the_seed_request_gets_the_seed_answer_and_more() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), "movielens", 3);
    let app = app(state_for(dir.path(), Limits::default()).await);

    let (status, v) = post(&app, "/predict", json!({"userId": 1, "movieId": 31})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!((v["userId"].as_i64(), v["movieId"].as_i64(), v["round"].as_u64()), (Some(1), Some(31), Some(3)));
    assert!(v.get("timestamp").is_none(), "only the fields given are echoed: {v}");
    // Regression: the movie's shrunk mean (90 + 5·3.5) / 25 = 4.3, plus round/100.
    assert_eq!(v["predicted_rating"], 4.33);
    // Classification: sigmoid(2·(u_mean − 3.5)) with u_mean = (45 + 17.5) / 15.
    assert!(close(&v["probability_like"], sigmoid(2.0 * (62.5 / 15.0 - 3.5))), "{v}");
    assert_eq!(v["prediction_like"], 1);
    assert_eq!((v["cluster_id"].as_u64(), v["segment"].as_str()), (Some(1), Some("raters who rate high")));
    assert_eq!((v["known_user"].as_bool(), v["known_movie"].as_bool()), (Some(true), Some(true)));
    let features = v["features"].as_object().unwrap();
    assert_eq!(features.len(), 12);
    // The SQL's own expressions, on the lookup rows: ln(1 + 10), and the user's recency from
    // their last rating (1,000,000) to the default time, the newest rating (2,000,000).
    assert!(close(&v["features"]["u_log_n"], 11f64.ln()), "{v}");
    assert!(close(&v["features"]["u_recency"], (1.0 + 1_000_000.0 / 86_400.0f64).ln()), "{v}");
    assert!(close(&v["features"]["m_mean"], 4.3), "{v}");

    // The pipeline's own route answers the same.
    let (status, same) = post(&app, "/pipelines/movielens/predict", json!({"userId": 1, "movieId": 31})).await;
    assert_eq!((status, &same), (StatusCode::OK, &v));

    // Each seed endpoint answers its own part only; a batch is answered with an array in order.
    let (status, v) = post(&app, "/predict_classification", json!([{"userId": 1, "movieId": 31}, {"userId": 2, "movieId": 31}])).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!((v[0]["prediction_like"].as_u64(), v[1]["prediction_like"].as_u64()), (Some(1), Some(0)));
    assert!(v[0].get("predicted_rating").is_none() && v[0].get("cluster_id").is_none(), "{v}");
    let (_, v) = post(&app, "/predict_regression", json!([{"userId": 2, "movieId": 31}])).await;
    assert_eq!(v[0]["predicted_rating"], 4.33);
    assert!(v[0].get("prediction_like").is_none());
    let (status, v) = post(&app, "/predict_clustering", json!({"userId": 2})).await;
    assert_eq!(status, StatusCode::OK, "clustering needs no movie: {v}");
    assert_eq!(v["cluster_id"], 0);
    assert_eq!(v["features"].as_object().unwrap().len(), 4, "only the profile features: {v}");
    assert_eq!(v["known_movie"], false, "no movie asked");

    // The seed's snake_case names and numbers as strings (the seed's producer sent those) work too.
    let (status, v) = post(&app, "/predict", json!({"user_id": "1", "movie_id": 31, "ts": 1_000_000})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!((v["userId"].as_i64(), v["timestamp"].as_i64()), (Some(1), Some(1_000_000)), "echoed by wire name: {v}");
    assert_eq!(v["features"]["u_recency"], 0.0);
    // Features of a user at the default time are computed once per user; a request that gives
    // its own time has them evaluated for it, beside one that does not.
    let (_, v) = post(&app, "/predict", json!([{"userId": 1, "movieId": 31, "timestamp": 1_000_000}, {"userId": 1, "movieId": 31}])).await;
    assert_eq!(v[0]["features"]["u_recency"], 0.0);
    assert!(close(&v[1]["features"]["u_recency"], (1.0 + 1_000_000.0 / 86_400.0f64).ln()), "{v}");
    assert_eq!(v[0]["features"]["u_mean"], v[1]["features"]["u_mean"]);
}

#[tokio::test]
async fn unknown_ids_get_zero_state_and_what_ifs_override_features() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), "movielens", 1);
    let app = app(state_for(dir.path(), Limits::default()).await);

    let (status, v) = post(&app, "/predict", json!({"userId": 999, "movieId": 12345})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!((v["known_user"].as_bool(), v["known_movie"].as_bool()), (Some(false), Some(false)));
    // No history: the shrunk means are the prior, exactly as training treats a first rating.
    assert_eq!(v["features"]["m_mean"], 3.5);
    assert_eq!(v["features"]["u_log_n"], 0.0);
    assert_eq!(v["predicted_rating"], 3.51);
    assert!(close(&v["probability_like"], 0.5), "{v}");

    let (_, v) = post(&app, "/predict", json!({"userId": 1, "movieId": 31, "features": {"m_mean": 2.0, "u_mean": 2.0}})).await;
    assert_eq!(v["predicted_rating"], 2.01, "{v}");
    assert_eq!(v["prediction_like"], 0);
    assert_eq!(v["cluster_id"], 0, "the segment follows the overridden profile features");
    assert_eq!(v["features"]["m_mean"], 2.0);

    // Every feature given: no ids needed.
    let all: serde_json::Map<String, Value> =
        testing::pipeline("movielens").features().iter().map(|f| (f.clone(), json!(if f.ends_with("mean") { 4.0 } else { 0.5 }))).collect();
    let (status, v) = post(&app, "/predict", json!({"features": all})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["predicted_rating"], 4.01);
    assert!(v.get("userId").is_none());
    assert_eq!((v["known_user"].as_bool(), v["features"].as_object().unwrap().len()), (Some(false), 12));

    // The movie's features given, the user's looked up: no movie id needed.
    let movie: serde_json::Map<String, Value> = all.iter().filter(|(k, _)| k.starts_with("m_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let (status, v) = post(&app, "/predict_regression", json!({"userId": 1, "features": movie})).await;
    assert_eq!((status, v["predicted_rating"].as_f64()), (StatusCode::OK, Some(4.01)), "{v}");
}

#[tokio::test]
async fn a_second_pipeline_answers_on_its_own_routes_with_its_own_fields() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), "movielens", 1);
    publish(dir.path(), "smart-home", 2);
    let app = app(state_for(dir.path(), Limits::default()).await);

    let (status, v) = post(&app, "/pipelines/smart-home/predict", camera()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!((v["DeviceType"].as_str(), v["UsageHoursPerDay"].as_f64(), v["round"].as_u64()), (Some("Camera"), Some(10.0), Some(2)));
    // sigmoid(−1.5 + 2·low_energy + young), both 1.
    assert!(close(&v["probability_efficient"], sigmoid(1.5)), "{v}");
    assert_eq!(v["prediction_efficient"], 1);
    // 0.5 + 2/100 + 0.1·10 h + 1 (a camera).
    assert_eq!(v["predicted_incidents"], 2.52);
    // Profile (10 h, 2 kWh, 20 months, 0): nearer the light-use centroid.
    assert_eq!((v["cluster_id"].as_u64(), v["segment"].as_str()), (Some(0), Some("lightly used")));
    assert_eq!(
        (v["features"]["heavy_use"].as_f64(), v["features"]["is_camera"].as_f64(), v["features"]["is_lights"].as_f64()),
        (Some(1.0), Some(1.0), Some(0.0))
    );
    assert!(v.as_object().unwrap().keys().all(|k| !k.starts_with("known_")), "no lookups, no known_ fields: {v}");
    assert!(v.get("prediction_like").is_none(), "MovieLens names do not leak: {v}");

    // A batch of two in one evaluation; numbers as strings are read as numbers.
    let thermostat = json!({"DeviceType": "Thermostat", "UsageHoursPerDay": "22", "EnergyConsumption": 9, "UserPreferences": 0, "MalfunctionIncidents": 2, "DeviceAgeMonths": 50});
    let (status, v) = post(&app, "/pipelines/smart-home/predict", json!([camera(), thermostat])).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!((v[0]["cluster_id"].as_u64(), v[1]["cluster_id"].as_u64()), (Some(0), Some(1)));
    assert_eq!((v[1]["prediction_efficient"].as_u64(), v[1]["predicted_incidents"].as_f64()), (Some(0), Some(2.72)));

    // Regression does not read the incidents (they are its target): it needs no MalfunctionIncidents,
    // and the features that read them are left out of the answer.
    let mut no_incidents = camera();
    no_incidents.as_object_mut().unwrap().remove("MalfunctionIncidents");
    let (status, v) = post(&app, "/pipelines/smart-home/predict_regression", no_incidents.clone()).await;
    assert_eq!((status, v["predicted_incidents"].as_f64()), (StatusCode::OK, Some(2.52)), "{v}");
    assert!(v["features"].get("malfunctions").is_none() && v["features"].get("usage_hours").is_some(), "{v}");
    // Classification does read them: the error names the field and what could stand in.
    let (status, v) = post(&app, "/pipelines/smart-home/predict_classification", no_incidents.clone()).await;
    assert_eq!((status, v["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("MalfunctionIncidents")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("or these features: no_malfunctions, malfunctions"), "{v}");
    no_incidents["features"] = json!({"no_malfunctions": 1, "malfunctions": 0});
    let (status, v) = post(&app, "/pipelines/smart-home/predict", no_incidents).await;
    assert_eq!((status, v["cluster_id"].as_u64()), (StatusCode::OK, Some(0)), "{v}");

    // A what-if beyond the clip: 0.52 + 1 + 5 = 6.52 is clipped to 4.
    let mut what_if = camera();
    what_if["features"] = json!({"is_camera": 5});
    let (_, v) = post(&app, "/pipelines/smart-home/predict_regression", what_if).await;
    assert_eq!(v["predicted_incidents"], 4.0, "{v}");

    // Clustering needs only what the profile reads.
    let (status, v) = post(
        &app,
        "/pipelines/smart-home/predict_clustering",
        json!({"UsageHoursPerDay": 22, "EnergyConsumption": 9, "DeviceAgeMonths": 50, "MalfunctionIncidents": 2}),
    )
    .await;
    assert_eq!((status, v["segment"].as_str()), (StatusCode::OK, Some("heavily used")), "{v}");
    assert_eq!(v["features"].as_object().unwrap().len(), 4, "{v}");

    // The two pipelines at once, and the seed routes still on MovieLens.
    let (_, v) = post(&app, "/predict", json!({"userId": 1, "movieId": 31})).await;
    assert_eq!(v["predicted_rating"], 4.31, "{v}");
    let (status, v) = post(&app, "/predict", camera()).await;
    assert_eq!((status, v["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("userId")), "smart-home fields on the MovieLens route: {v}");

    let (_, v) = get(&app, "/pipelines").await;
    assert_eq!(v["default"], "movielens");
    let listed: Vec<(&str, u64)> = v["pipelines"].as_array().unwrap().iter().map(|p| (p["name"].as_str().unwrap(), p["round"].as_u64().unwrap())).collect();
    assert_eq!(listed, [("movielens", 1), ("smart-home", 2)], "{v}");

    // /models describes the request fields a form needs.
    let (status, v) = get(&app, "/pipelines/smart-home/models").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let fields = v["serving"]["request"].as_array().unwrap();
    let device = fields.iter().find(|f| f["wire"] == "DeviceType").unwrap();
    assert_eq!((device["type"].as_str(), device["values"][0].as_str()), (Some("string"), Some("Camera")), "{device}");
    let hours = fields.iter().find(|f| f["wire"] == "UsageHoursPerDay").unwrap();
    assert_eq!((hours["min"].as_f64(), hours["max"].as_f64()), (Some(0.0), Some(24.0)));
    assert_eq!(v["serving"]["models"]["regression"]["answer"], "predicted_incidents");
    assert_eq!(v["serving"]["models"]["regression"]["features"].as_array().unwrap().len(), 11);
    assert_eq!(v["serving"]["pipeline"], "smart-home");
    let (_, v) = get(&app, "/models").await;
    let user = v["serving"]["request"].as_array().unwrap().iter().find(|f| f["wire"] == "userId").unwrap().clone();
    assert_eq!((user["lookup"].as_str(), &user["suggestions"]), (Some("user"), &json!([1, 2])), "most active first, ties by id: {user}");
    let ts = v["serving"]["request"].as_array().unwrap().iter().find(|f| f["wire"] == "timestamp").unwrap().clone();
    assert_eq!(ts["default"].as_f64(), Some(testing::NEWEST_TS));
    assert_eq!(v["serving"]["lookups"], json!([{"name": "user", "key": "user_id", "rows": 2}, {"name": "movie", "key": "movie_id", "rows": 1}]));

    let (status, v) = post(&app, "/pipelines/nope/predict", camera()).await;
    assert_eq!((status, v["field"].as_str()), (StatusCode::NOT_FOUND, Some("pipeline")));
    assert!(v["error"].as_str().unwrap().contains("movielens, smart-home"), "{v}");
}

#[tokio::test]
async fn bad_input_is_a_4xx_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), "movielens", 1);
    publish(dir.path(), "smart-home", 1);
    let limits = Limits { body_bytes: 4096, batch: 5, ..Limits::default() };
    let app = app(state_for(dir.path(), limits).await);
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let mut toaster = camera();
    toaster["DeviceType"] = json!("Toaster");
    let mut hours = camera();
    hours["UsageHoursPerDay"] = json!(25);
    let mut no_type = camera();
    no_type.as_object_mut().unwrap().remove("DeviceType");
    let cases: Vec<(&str, String, StatusCode, &str, &str)> = vec![
        ("/predict", "{\"userId\": 1,".into(), StatusCode::BAD_REQUEST, "body", "EOF while parsing"),
        ("/predict", "[{\"userId\": 1, \"movieId\": 1e999}]".into(), StatusCode::BAD_REQUEST, "body", "out of range"),
        ("/predict", json!({"userId": "one", "movieId": 31}).to_string(), unprocessable, "userId", "expected an integer, found \"one\""),
        ("/predict", json!({"userId": 1.5, "movieId": 31}).to_string(), unprocessable, "userId", "expected an integer, found 1.5"),
        ("/predict", json!({"userId": 1}).to_string(), unprocessable, "movieId", "missing: give movieId, or these features: m_log_n"),
        ("/predict_clustering", json!({"movieId": 31}).to_string(), unprocessable, "userId", "missing"),
        ("/predict", json!([{"userId": 1, "movieId": 31}, {"userId": 1}]).to_string(), unprocessable, "[1].movieId", "missing"),
        ("/predict", json!([{"userId": 1, "movieId": 31}, {"userId": 1, "movieId": []}]).to_string(), unprocessable, "[1].movieId", "found an array"),
        ("/predict", json!([{"userId": 1, "movieId": 31}, "x"]).to_string(), unprocessable, "[1]", "expected an object"),
        ("/predict", json!({"userId": -4, "movieId": 31}).to_string(), unprocessable, "userId", "-4 is out of range (at least 1)"),
        ("/predict", json!({"userId": 1, "movieId": 31, "ts": 1.7e12}).to_string(), unprocessable, "ts", "out of range"),
        ("/predict", json!({"userId": 1, "movieId": 31, "timestamp": "soon"}).to_string(), unprocessable, "timestamp", "expected an integer"),
        ("/predict", json!({"userId": 1, "movieId": 31, "features": {"u_mean": 7}}).to_string(), unprocessable, "features.u_mean", "between 0.5 and 5, got 7"),
        ("/predict", json!({"userId": 1, "movieId": 31, "features": {"age": 3}}).to_string(), unprocessable, "features.age", "unknown feature"),
        ("/predict", json!({"userId": 1, "movieId": 31, "features": {"u_sd": "x"}}).to_string(), unprocessable, "features.u_sd", "expected a number"),
        ("/predict", json!({"userId": 1, "movieId": 31, "features": [1]}).to_string(), unprocessable, "features", "expected an object"),
        ("/predict", "[]".into(), unprocessable, "body", "empty array"),
        ("/predict", "42".into(), unprocessable, "body", "got a number"),
        ("/predict", json!(vec![json!({"userId": 1, "movieId": 31}); 6]).to_string(), unprocessable, "body", "6 requests in one batch; the most is 5"),
        (
            "/predict",
            format!("{{\"userId\": 1, \"movieId\": 31, \"pad\": \"{}\"}}", "x".repeat(5000)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body",
            "4096 byte limit",
        ),
        ("/pipelines/smart-home/predict", toaster.to_string(), unprocessable, "DeviceType", "\"Toaster\" is not a known value (one of Camera, Lights"),
        ("/pipelines/smart-home/predict", hours.to_string(), unprocessable, "UsageHoursPerDay", "25 is out of range (0 to 24)"),
        (
            "/pipelines/smart-home/predict",
            no_type.to_string(),
            unprocessable,
            "DeviceType",
            "or these features: is_camera, is_lights, is_security_system, is_thermostat",
        ),
        ("/pipelines/smart-home/predict", json!([camera(), toaster]).to_string(), unprocessable, "[1].DeviceType", "Toaster"),
        ("/pipelines/smart-home/predict", json!({"features": {"usage_hours": 30}}).to_string(), unprocessable, "features.usage_hours", "between 0 and 24"),
    ];
    for (uri, body, status, field, message) in cases {
        let (got, v) = call(&app, "POST", uri, body.clone()).await;
        let shown = &body[..body.len().min(80)];
        assert_eq!(got, status, "{shown}: {v}");
        assert_eq!(v["field"], field, "{shown}: {v}");
        assert!(v["error"].as_str().unwrap().contains(message), "{shown}: error {:?} lacks {message:?}", v["error"]);
    }
    // Several bad items: every one is listed, each with its index.
    let (_, v) = post(&app, "/predict", json!([{"userId": 0, "movieId": 31}, {"userId": 1, "movieId": 31}, {"userId": 1, "movieId": -1}])).await;
    let fields: Vec<&str> = v["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["[0].userId", "[2].movieId"], "{v}");
    let (status, _) = get(&app, "/no-such-page").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn not_ready_until_every_pipeline_has_a_round() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_for(dir.path(), Limits::default()).await;
    let app = app(state.clone());
    assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
    let (status, v) = get(&app, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v["error"].as_str().unwrap().contains("lensflow train --pipeline movielens"), "{v}");
    assert_eq!(post(&app, "/predict", json!({"userId": 1, "movieId": 31})).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (_, v) = get(&app, "/pipelines").await;
    assert_eq!(v["pipelines"], json!([{"name": "movielens", "description": "", "default": true}]), "the default is listed, not trained yet");

    publish(dir.path(), "movielens", 1);
    let refreshed = state.models.refresh().await.unwrap();
    assert_eq!(refreshed.swapped, [("movielens".to_string(), 1)]);
    let (status, v) = get(&app, "/readyz").await;
    assert_eq!((status, v.as_str()), (StatusCode::OK, Some("ready: round 1")));

    // A second pipeline whose first round is refused: not ready until it has one.
    let pointer = publish(dir.path(), "smart-home", 1);
    std::fs::write(dir.path().join("smart-home").join(&pointer.path).join("model.json"), b"{}").unwrap();
    let refreshed = state.models.refresh().await.unwrap();
    assert!(refreshed.swapped.is_empty() && refreshed.failed[0].0 == "smart-home", "{refreshed:?}");
    assert_eq!(get(&app, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(post(&app, "/pipelines/smart-home/predict", camera()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(post(&app, "/predict", json!({"userId": 1, "movieId": 31})).await.0, StatusCode::OK, "movielens is unaffected");
    publish(dir.path(), "smart-home", 2);
    state.models.refresh().await.unwrap();
    let (status, v) = get(&app, "/readyz").await;
    assert_eq!((status, v.as_str()), (StatusCode::OK, Some("ready: round 1, smart-home round 2")));
}

#[tokio::test]
async fn a_new_round_swaps_in_and_a_corrupt_or_partial_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path();
    publish(models, "movielens", 1);
    publish(models, "smart-home", 1);
    let state = state_for(models, Limits::default()).await;
    let app = app(state.clone());
    let rating = |v: Value| v["predicted_rating"].as_f64().unwrap();
    let ask = json!({"userId": 1, "movieId": 31});
    let refresh = || async { state.models.refresh().await.unwrap() };
    let refused = |r: crate::watcher::Refreshed| r.failed.into_iter().map(|(p, e)| format!("{p}: {e}")).collect::<Vec<_>>().join("; ");
    assert_eq!(rating(post(&app, "/predict", ask.clone()).await.1), 4.31);

    publish(models, "movielens", 2);
    assert_eq!(refresh().await.swapped, [("movielens".to_string(), 2)]);
    assert_eq!(rating(post(&app, "/predict", ask.clone()).await.1), 4.32);
    let again = refresh().await;
    assert!(again.swapped.is_empty() && again.failed.is_empty(), "nothing new: nothing swapped");

    // Round 3's lookup table is damaged after its checksum was recorded.
    publish(models, "movielens", 3);
    std::fs::write(models.join("movielens/round-000003/lookup-user.parquet"), b"not parquet").unwrap();
    let err = refused(refresh().await);
    assert!(err.contains("round 3") && err.contains("lookup-user.parquet") && err.contains("SHA-256"), "{err}");
    assert_eq!(rating(post(&app, "/predict", ask.clone()).await.1), 4.32, "round 2 keeps serving");
    assert!(refresh().await.failed.is_empty(), "a refused round is not retried at once");

    // Round 4 lacks a file (a partial copy); round 5 has a model.json that LATEST's checksum disowns.
    publish(models, "movielens", 4);
    std::fs::remove_file(models.join("movielens/round-000004/lookup-movie.parquet")).unwrap();
    let err = refused(refresh().await);
    assert!(err.contains("lookup-movie.parquet") && err.contains("incomplete"), "{err}");
    publish(models, "movielens", 5);
    std::fs::write(models.join("movielens/round-000005/model.json"), b"{}").unwrap();
    assert!(refused(refresh().await).contains("model.json"));
    assert_eq!(rating(post(&app, "/predict", ask.clone()).await.1), 4.32);

    publish(models, "movielens", 6);
    assert_eq!(refresh().await.swapped, [("movielens".to_string(), 6)]);
    assert_eq!(rating(post(&app, "/predict", ask.clone()).await.1), 4.36);

    // Round 7 was trained with a definition edited afterwards; round 8 is a smart-home round
    // copied into the movielens folder; round 9 names a lookup table the pipeline does not have.
    let mut edited = testing::movielens(7);
    edited.pipeline.definition.description.push_str(" (edited)");
    publish_artifact(models, edited, testing::tables("movielens"));
    assert!(refused(refresh().await).contains("fingerprint"));
    let mut moved = testing::smart_home(8);
    let store = tempfile::tempdir().unwrap();
    let pointer = publish_artifact(store.path(), moved.clone(), vec![]);
    std::fs::create_dir_all(models.join("movielens/round-000008")).unwrap();
    std::fs::copy(store.path().join("smart-home/round-000008/model.json"), models.join("movielens/round-000008/model.json")).unwrap();
    std::fs::write(models.join("movielens/LATEST"), serde_json::to_vec(&pointer).unwrap()).unwrap();
    assert!(refused(refresh().await).contains("lies in the model store's folder `movielens`"));
    moved = testing::movielens(9);
    moved.segmentation.segments[0].centroid.push(1.0);
    publish_artifact(models, moved, testing::tables("movielens"));
    assert!(refused(refresh().await).contains("segment 0 centroid has 5 values, expected 4"));
    assert_eq!(rating(post(&app, "/predict", ask.clone()).await.1), 4.36);
    assert_eq!(post(&app, "/pipelines/smart-home/predict", camera()).await.1["round"], 1, "smart-home is unaffected");

    let (_, v) = get(&app, "/models").await;
    assert_eq!(v["serving"]["round"], 6);
    let listed: Vec<u64> = v["rounds"].as_array().unwrap().iter().map(|r| r["round"].as_u64().unwrap()).collect();
    // The store's rounds whose model.json reads (5's does not); 3 and 4 were trained, just not served.
    assert_eq!(listed, [1, 2, 3, 4, 6], "{v}");

    let (_, metrics) = get(&app, "/metrics").await;
    let text = metrics.as_str().unwrap();
    for line in [
        "lensflow_model_round{pipeline=\"movielens\"} 6",
        "lensflow_model_round{pipeline=\"smart-home\"} 1",
        "lensflow_model_swaps_total{pipeline=\"movielens\"} 3",
        "lensflow_model_refused_total{pipeline=\"movielens\"} 6",
        "lensflow_model_refused_total{pipeline=\"smart-home\"} 0",
        "lensflow_http_requests_total{route=\"/predict\",method=\"POST\",status=\"200\",pipeline=\"movielens\"} 6",
        "lensflow_http_requests_total{route=\"/pipelines/{name}/predict\",method=\"POST\",status=\"200\",pipeline=\"smart-home\"} 1",
        "lensflow_predictions_total{task=\"all\",pipeline=\"movielens\"} 6",
    ] {
        assert!(text.lines().any(|l| l == line), "metrics lack `{line}`:\n{text}");
    }
    assert!(text.contains("lensflow_http_request_duration_seconds_bucket{le="), "{text}");
}

#[tokio::test]
async fn status_reads_each_pipelines_own_lake() {
    use lensflow_core::lake::MANIFEST_FORMAT_VERSION;
    use lensflow_core::{BatchFile, BatchManifest, Lake, OffsetRange, StorageOptions};

    let dir = tempfile::tempdir().unwrap();
    let (models, lakes) = (dir.path().join("models"), dir.path().join("lake"));
    publish(&models, "movielens", 1);
    publish(&models, "smart-home", 1);
    for (pipeline, batches) in [("movielens", 3u64), ("smart-home", 1)] {
        let lake = Lake::open(lakes.join(pipeline).to_str().unwrap(), &StorageOptions::default()).unwrap();
        for batch in 1..=batches {
            let offsets = OffsetRange { first: (batch as i64 - 1) * 100, last: batch as i64 * 100 - 1 };
            let file = BatchFile { path: format!("events/{batch}.parquet"), partition: 0, offsets, rows: 100, bytes: 1, min_ts: 0, max_ts: 0 };
            let manifest = BatchManifest {
                format_version: MANIFEST_FORMAT_VERSION,
                batch,
                topic: pipeline.into(),
                writer: "test".into(),
                created_at_ms: batch as i64,
                partitions: [(0, offsets)].into(),
                files: vec![file],
                dead_letters: vec![],
                rows: 100,
                dead_letter_count: 1,
                min_ts: None,
                max_ts: None,
            };
            assert!(lake.try_commit(&manifest).await.unwrap());
        }
    }
    let mut opts = ServeOptions::new(models.to_str().unwrap());
    opts.lake = Some(lakes.to_str().unwrap().to_string());
    let app = app(crate::state(&opts).await.unwrap());
    let (status, v) = get(&app, "/status").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!((v["pipeline"].as_str(), v["batches"].as_u64(), v["events"].as_u64(), v["round"].as_u64()), (Some("movielens"), Some(3), Some(300), Some(1)));
    assert_eq!((v["batches_behind"].as_u64(), v["dead_letters"].as_u64()), (Some(2), Some(3)));
    assert!(v["lake"].as_str().unwrap().ends_with("/lake/movielens"), "{v}");
    let (_, v) = get(&app, "/pipelines/smart-home/status").await;
    assert_eq!((v["batches"].as_u64(), v["batches_behind"].as_u64()), (Some(1), Some(0)), "{v}");
    assert_eq!(get(&app, "/pipelines/nope/status").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_openapi_description_has_every_pipelines_paths_and_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_for(dir.path(), Limits::default()).await;
    let app = app(state.clone());
    // Before any round: the fixed routes, and the default pipeline's from its built-in definition.
    let (status, v) = get(&app, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/predict",
        "/predict_classification",
        "/predict_regression",
        "/predict_clustering",
        "/models",
        "/status",
        "/pipelines",
        "/healthz",
        "/readyz",
        "/metrics",
        "/pipelines/movielens/predict",
    ] {
        assert!(v["paths"].get(path).is_some(), "{path} missing from the OpenAPI paths");
    }
    assert!(v["paths"].get("/pipelines/smart-home/predict").is_none());

    publish(dir.path(), "movielens", 1);
    publish(dir.path(), "smart-home", 1);
    state.models.refresh().await.unwrap();
    let (_, v) = get(&app, "/openapi.json").await;
    for name in ["movielens", "smart-home"] {
        for suffix in ["predict", "predict_classification", "predict_regression", "predict_clustering"] {
            let op = &v["paths"][format!("/pipelines/{name}/{suffix}")]["post"];
            assert!(
                op["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]["$ref"].as_str().unwrap().ends_with(&format!("{name}.PredictRequest")),
                "{op}"
            );
        }
        assert!(v["paths"][format!("/pipelines/{name}/models")].get("get").is_some());
        assert!(v["paths"][format!("/pipelines/{name}/status")].get("get").is_some());
    }
    let schemas = &v["components"]["schemas"];
    let device = &schemas["smart-home.PredictRequest"]["properties"]["DeviceType"];
    assert_eq!((&device["type"], device["enum"][0].as_str()), (&json!(["string", "null"]), Some("Camera")), "{device}");
    assert_eq!(schemas["smart-home.PredictRequest"]["properties"]["UsageHoursPerDay"]["maximum"], 24.0);
    assert_eq!(schemas["movielens.PredictRequest"]["properties"]["userId"]["type"], json!(["integer", "null"]));
    assert!(schemas["movielens.PredictRequest"]["properties"]["features"]["properties"].get("u_mean").is_some());
    assert!(schemas["movielens.Prediction"]["properties"].get("prediction_like").is_some());
    assert!(schemas["movielens.Prediction"]["required"].as_array().unwrap().contains(&json!("known_user")));
    assert!(schemas["smart-home.Prediction"]["properties"].get("predicted_incidents").is_some());
    assert!(schemas.get("ErrorBody").is_some());
    // The seed routes are described with the default pipeline's schemas.
    assert!(v["paths"]["/predict"]["post"]["requestBody"].to_string().contains("movielens.PredictRequest"));
    let (status, page) = get(&app, "/docs").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.as_str().unwrap().contains("/openapi.json"));
}

/// A router under the app's own limits whose routes `/a` and `/b` count the requests inside
/// them and hold each until `gate` lets it go.
fn gated(state: AppState, inside: Arc<AtomicUsize>, most: Arc<AtomicUsize>, gate: Arc<Semaphore>) -> Router {
    let handler = move || {
        let (inside, most, gate) = (inside.clone(), most.clone(), gate.clone());
        async move {
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let _turn = gate.acquire().await;
            inside.fetch_sub(1, Ordering::SeqCst);
            "done"
        }
    };
    super::limited(Router::new().route("/a", axum::routing::get(handler.clone())).route("/b", axum::routing::get(handler)), state)
}

/// Waits (up to 5 s) until `check` holds.
async fn eventually(check: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "timed out");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_concurrency_limit_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { concurrent: 2, timeout: std::time::Duration::from_secs(30), ..Limits::default() };
    let (inside, most, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
    let app = gated(state_for(dir.path(), limits).await, inside.clone(), most.clone(), gate.clone());
    // Five requests over two routes: the limit is one for the whole router, not per route.
    let calls: Vec<_> = ["/a", "/b", "/a", "/b", "/b"]
        .into_iter()
        .map(|uri| {
            let app = app.clone();
            tokio::spawn(async move { call(&app, "GET", uri, Body::empty()).await })
        })
        .collect();
    eventually(|| inside.load(Ordering::SeqCst) == 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(inside.load(Ordering::SeqCst), 2, "the others wait outside");
    assert!(calls.iter().all(|c| !c.is_finished()), "nobody is turned away");
    gate.add_permits(5);
    for c in calls {
        assert_eq!(c.await.unwrap(), (StatusCode::OK, Value::String("done".into())));
    }
    assert_eq!(most.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_turn_counts_against_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = std::time::Duration::from_millis(1000);
    let limits = Limits { concurrent: 1, timeout, ..Limits::default() };
    let (inside, most, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
    let app = gated(state_for(dir.path(), limits).await, inside.clone(), most, gate.clone());
    // The first request holds the only turn until its own timeout; the second, sent half a
    // timeout later, waits for it and gets in when the first is answered 408.
    let first = tokio::spawn({
        let app = app.clone();
        async move { call(&app, "GET", "/a", Body::empty()).await.0 }
    });
    eventually(|| inside.load(Ordering::SeqCst) == 1).await;
    tokio::time::sleep(timeout / 2).await;
    let start = std::time::Instant::now();
    assert_eq!(call(&app, "GET", "/b", Body::empty()).await.0, StatusCode::REQUEST_TIMEOUT);
    // Its 408 comes one timeout after it was sent, the wait included: were the wait not
    // counted, it would come half a timeout later.
    let took = start.elapsed();
    assert!(took >= timeout && took < timeout * 13 / 10, "{took:?}");
    assert_eq!(first.await.unwrap(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(inside.load(Ordering::SeqCst), 2, "both got their turn, one after the other");
    gate.add_permits(1);
    assert_eq!(call(&app, "GET", "/a", Body::empty()).await.0, StatusCode::OK);
}

#[tokio::test]
async fn oversized_and_deeply_nested_bodies_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), "movielens", 1);
    let app = app(state_for(dir.path(), Limits::default()).await);
    // 10 MB, declared up front or streamed without a length: refused at the 2 MiB limit.
    let big = format!("{{\"userId\":1,\"movieId\":31,\"pad\":\"{}\"}}", "x".repeat(10 << 20));
    let (status, v) = call(&app, "POST", "/predict", big.clone()).await;
    assert_eq!((status, v["field"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("body")), "{v}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.into_bytes().chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
    let (status, v) = call(&app, "POST", "/predict", Body::from_stream(futures::stream::iter(chunks))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["error"].as_str().unwrap().contains("2097152 byte limit"), "{v}");
    // Nesting past serde_json's depth limit is malformed JSON, not a stack overflow.
    for body in ["[".repeat(100_000), format!("{{\"userId\":{}", "[".repeat(100_000)), format!("{}1{}", "[".repeat(127), "]".repeat(127))] {
        let (status, v) = call(&app, "POST", "/predict", body.clone()).await;
        let nested_ok = body.starts_with("[[") && body.ends_with("]]");
        if nested_ok {
            // 127 levels parse, and are then refused as not request objects.
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        } else {
            assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
            assert!(v["error"].as_str().unwrap().contains("recursion limit exceeded"), "{v}");
        }
    }
}

mod properties {
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    use super::*;

    /// JSON with the values that break parsers and arithmetic, nested a little.
    fn hostile_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop::sample::select(vec![0.0, -0.0, 0.5, 1e-300, 1e16, 4102444800.0, 1e308, -1e308, 24.0, 31.0]).prop_map(Value::from),
            prop::sample::select(vec![i64::MAX, i64::MIN, 0, -1, 1, 2, 31, 4102444800, 4102444801]).prop_map(Value::from),
            prop::sample::select(vec!["", "NaN", "inf", "1e999", "31", "Camera", "Toaster", " 1 ", "\u{0}"]).prop_map(Value::from),
            ".{0,10}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 12, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map(".{0,4}", inner, 0..3).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A request object naming the pipelines' own fields and features, with hostile values.
    fn hostile_request() -> impl Strategy<Value = Value> {
        let keys = prop::sample::select(vec![
            "userId",
            "movieId",
            "timestamp",
            "user_id",
            "ts",
            "DeviceType",
            "UsageHoursPerDay",
            "EnergyConsumption",
            "UserPreferences",
            "MalfunctionIncidents",
            "DeviceAgeMonths",
            "features",
            "x",
        ]);
        let features =
            prop::collection::btree_map(prop::sample::select(vec!["u_mean", "m_mean", "u_log_n", "usage_hours", "is_camera", "nope"]), hostile_json(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
        (prop::collection::btree_map(keys, hostile_json(), 0..8), proptest::option::of(features)).prop_map(|(m, f)| {
            let mut map: serde_json::Map<String, Value> = m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if let Some(f) = f {
                map.insert("features".into(), f);
            }
            Value::Object(map)
        })
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            2 => prop::collection::vec(any::<u8>(), 0..64),
            5 => hostile_request().prop_map(|v| v.to_string().into_bytes()),
            2 => prop::collection::vec(hostile_request(), 0..4).prop_map(|v| Value::Array(v).to_string().into_bytes()),
            1 => hostile_json().prop_map(|v| v.to_string().into_bytes()),
        ]
    }

    /// Any body to any prediction route gets an answer of the route's own shapes: never a
    /// 5xx, and every error in our error format naming what it can.
    #[test]
    fn any_body_gets_an_answer_never_a_server_error() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), "movielens", 1);
        publish(dir.path(), "smart-home", 1);
        let app = app(runtime.block_on(state_for(dir.path(), Limits { batch: 3, ..Limits::default() })));
        let routes = prop::sample::select(vec![
            "/predict",
            "/predict_classification",
            "/predict_regression",
            "/predict_clustering",
            "/pipelines/smart-home/predict",
            "/pipelines/smart-home/predict_regression",
            "/pipelines/smart-home/predict_clustering",
            "/pipelines/nope/predict",
        ]);
        let mut runner = TestRunner::new(ProptestConfig::with_cases(256));
        runner
            .run(&(routes, body()), |(route, body)| {
                let (status, v) = runtime.block_on(call(&app, "POST", route, body.clone()));
                let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                prop_assert!(
                    [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND, StatusCode::UNPROCESSABLE_ENTITY].contains(&status),
                    "{} {}: {} {}",
                    route,
                    shown,
                    status,
                    v
                );
                if status == StatusCode::OK {
                    let answers = if v.is_array() { v.as_array().unwrap().clone() } else { vec![v.clone()] };
                    prop_assert!(answers.iter().all(|a| a["round"] == 1 && a["features"].is_object()), "{}", v);
                } else {
                    prop_assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{}", v);
                    if status == StatusCode::UNPROCESSABLE_ENTITY {
                        prop_assert!(v["field"].is_string() && !v["errors"].as_array().unwrap().is_empty(), "{}", v);
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The body parser answers any bytes with request objects (one, or a batch within the
        /// limit) or a client error.
        #[test]
        fn any_bytes_parse_to_requests_or_a_client_error(bytes in prop::collection::vec(any::<u8>(), 0..128), json in hostile_json()) {
            for bytes in [bytes, json.to_string().into_bytes()] {
                match super::super::parse_body(&bytes, 2) {
                    Ok(body) => {
                        prop_assert!((1..=2).contains(&body.items.len()));
                        prop_assert!(body.batch || body.items[0].is_object());
                    }
                    Err(e) => prop_assert!(matches!(e, ApiError::MalformedJson(_) | ApiError::Invalid(_)), "{:?}", e),
                }
            }
        }
    }
}

#[tokio::test]
async fn the_openapi_description_says_what_the_api_accepts_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), "movielens", 1);
    let app = app(state_for(dir.path(), Limits { batch: 7, ..Limits::default() }).await);
    let (_, doc) = get(&app, "/openapi.json").await;
    let schemas = &doc["components"]["schemas"];
    // Partition numbers are JSON object keys, so strings.
    for schema in ["PipelineStatus", "Lineage"] {
        assert_eq!(schemas[schema]["properties"]["partitions"]["propertyNames"]["type"], "string", "{schema}");
    }
    // Suggested keys are numbers or strings, not objects.
    assert_eq!(schemas["RequestField"]["properties"]["suggestions"]["items"], json!({}));
    // A request field may be null (the same as left out), and so may `features`.
    let request = &schemas["movielens.PredictRequest"]["properties"];
    assert_eq!(request["userId"]["type"], json!(["integer", "null"]));
    assert_eq!(request["features"]["type"], json!(["object", "null"]));
    let (status, _) = post(&app, "/predict", json!({"userId": 1, "movieId": 31, "timestamp": null, "features": null})).await;
    assert_eq!(status, StatusCode::OK);
    // A batch holds 1 to the server's limit of requests; every operation may answer 408.
    let predict = &doc["paths"]["/predict"]["post"];
    let batch = &predict["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1];
    assert_eq!((batch["minItems"].as_u64(), batch["maxItems"].as_u64()), (Some(1), Some(7)), "{batch}");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for op in item.as_object().unwrap().values() {
            assert!(op["responses"].get("408").is_some(), "{path}");
        }
    }
    // What each task cannot do without, from the round's own rule.
    let clustering = doc["paths"]["/predict_clustering"]["post"]["description"].as_str().unwrap();
    assert!(clustering.contains("Each request needs `userId` (or all of u_log_n"), "{clustering}");
    assert!(!clustering.contains("`movieId`"), "clustering reads only the user: {clustering}");
    let all = predict["description"].as_str().unwrap();
    assert!(all.contains("`userId` (or all of") && all.contains("`movieId` (or all of m_log_n"), "{all}");
}
