//! The router through `oneshot`, on hand-made rounds in a temporary model store.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::testing::publish;
use crate::{AppState, Limits, ServeOptions, app};

async fn state_for(models: &std::path::Path, limits: Limits) -> AppState {
    let mut opts = ServeOptions::new(models.to_str().unwrap());
    opts.limits = limits;
    crate::state(&opts).await.unwrap()
}

async fn call(app: &Router, method: &str, uri: &str, body: impl Into<Body>) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn post(app: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    call(app, "POST", uri, body.to_string()).await
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[tokio::test]
async fn the_seed_request_gets_the_seed_answer_and_more() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 3);
    let app = app(state_for(dir.path(), Limits::default()).await);

    let (status, v) = post(&app, "/predict", json!({"userId": 1, "movieId": 31})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["userId"].as_i64(),
            v["movieId"].as_i64(),
            v["round"].as_u64()
        ),
        (Some(1), Some(31), Some(3))
    );
    // Regression: the movie's shrunk mean (90 + 5·3.5) / 25 = 4.3, plus round/100.
    assert_eq!(v["predicted_rating"], 4.33);
    // Classification: sigmoid(2·(u_mean − 3.5)) with u_mean = (45 + 17.5) / 15.
    let p = sigmoid(2.0 * (62.5 / 15.0 - 3.5));
    assert!(
        (v["probability_like"].as_f64().unwrap() - p).abs() < 1e-12,
        "{v}"
    );
    assert_eq!(v["prediction_like"], 1);
    assert_eq!(
        (v["cluster_id"].as_u64(), v["segment"].as_str()),
        (Some(1), Some("raters who rate high"))
    );
    assert_eq!(
        (v["known_user"].as_bool(), v["known_movie"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(v["features"].as_object().unwrap().len(), 12);

    // Each seed endpoint answers its own part only; a batch is answered with an array in order.
    let (status, v) = post(
        &app,
        "/predict_classification",
        json!([{"userId": 1, "movieId": 31}, {"userId": 2, "movieId": 31}]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v[0]["prediction_like"].as_u64(),
            v[1]["prediction_like"].as_u64()
        ),
        (Some(1), Some(0))
    );
    assert!(
        v[0].get("predicted_rating").is_none() && v[0].get("cluster_id").is_none(),
        "{v}"
    );
    let (_, v) = post(
        &app,
        "/predict_regression",
        json!([{"userId": 2, "movieId": 31}]),
    )
    .await;
    assert_eq!(v[0]["predicted_rating"], 4.33);
    assert!(v[0].get("prediction_like").is_none());
    let (status, v) = post(&app, "/predict_clustering", json!({"userId": 2})).await;
    assert_eq!(status, StatusCode::OK, "clustering needs no movie: {v}");
    assert_eq!(v["cluster_id"], 0);
    assert_eq!(
        v["features"].as_object().unwrap().len(),
        4,
        "only the segment features: {v}"
    );
}

#[tokio::test]
async fn unknown_ids_get_the_priors_and_what_ifs_override_features() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 1);
    let app = app(state_for(dir.path(), Limits::default()).await);

    let (status, v) = post(&app, "/predict", json!({"userId": 999, "movieId": 12345})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (v["known_user"].as_bool(), v["known_movie"].as_bool()),
        (Some(false), Some(false))
    );
    assert_eq!(v["features"]["m_mean"], 3.5);
    assert_eq!(v["predicted_rating"], 3.51);
    assert!((v["probability_like"].as_f64().unwrap() - 0.5).abs() < 1e-12);

    let (_, v) = post(
        &app,
        "/predict",
        json!({"userId": 1, "movieId": 31, "features": {"m_mean": 2.0, "u_mean": 2.0}}),
    )
    .await;
    assert_eq!(v["predicted_rating"], 2.01, "{v}");
    assert_eq!(v["prediction_like"], 0);
    assert_eq!(
        v["cluster_id"], 0,
        "the segment follows the overridden user features"
    );

    // Every feature given: no ids needed.
    let all: serde_json::Map<String, Value> = lensflow_core::model::FEATURES
        .iter()
        .map(|f| {
            (
                f.to_string(),
                json!(if f.ends_with("mean") { 4.0 } else { 0.5 }),
            )
        })
        .collect();
    let (status, v) = post(&app, "/predict", json!({"features": all})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["predicted_rating"], 4.01);
    assert!(v.get("userId").is_none());
}

#[tokio::test]
async fn bad_input_is_a_4xx_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 1);
    let limits = Limits {
        body_bytes: 4096,
        batch: 5,
        ..Limits::default()
    };
    let app = app(state_for(dir.path(), limits).await);
    let cases: Vec<(&str, String, StatusCode, &str, &str)> = vec![
        (
            "/predict",
            "{\"userId\": 1,".into(),
            StatusCode::BAD_REQUEST,
            "body",
            "EOF while parsing",
        ),
        (
            "/predict",
            "[{\"userId\": 1, \"movieId\": 1e999}]".into(),
            StatusCode::BAD_REQUEST,
            "body",
            "out of range",
        ),
        (
            "/predict",
            json!({"userId": "one", "movieId": 31}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "userId",
            "invalid type: string \"one\"",
        ),
        (
            "/predict",
            json!({"userId": 1.5, "movieId": 31}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "userId",
            "invalid type: floating point",
        ),
        (
            "/predict",
            json!({"userId": 1}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "movieId",
            "missing",
        ),
        (
            "/predict_clustering",
            json!({"movieId": 31}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "userId",
            "missing",
        ),
        (
            "/predict",
            json!([{"userId": 1, "movieId": 31}, {"userId": 1}]).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "[1].movieId",
            "missing",
        ),
        (
            "/predict",
            json!([{"userId": 1, "movieId": 31}, {"userId": 1, "movieId": []}]).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "[1].movieId",
            "invalid type: sequence",
        ),
        (
            "/predict",
            json!({"userId": -4, "movieId": 31}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "userId",
            "positive id, got -4",
        ),
        (
            "/predict",
            json!({"userId": 1, "movieId": 31, "ts": 1.7e12}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ts",
            "unix seconds",
        ),
        (
            "/predict",
            json!({"userId": 1, "movieId": 31, "features": {"u_mean": 7}}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "features.u_mean",
            "between 0.5 and 5, got 7",
        ),
        (
            "/predict",
            json!({"userId": 1, "movieId": 31, "features": {"age": 3}}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "features.age",
            "unknown feature",
        ),
        (
            "/predict",
            json!({"userId": 1, "movieId": 31, "features": {"u_sd": "x"}}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "features.u_sd",
            "invalid type: string",
        ),
        (
            "/predict",
            "[]".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "body",
            "empty array",
        ),
        (
            "/predict",
            "42".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "body",
            "got a number",
        ),
        (
            "/predict",
            json!(vec![json!({"userId": 1, "movieId": 31}); 6]).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "body",
            "6 requests in one batch; the most is 5",
        ),
        (
            "/predict",
            format!(
                "{{\"userId\": 1, \"movieId\": 31, \"pad\": \"{}\"}}",
                "x".repeat(5000)
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body",
            "4096 byte limit",
        ),
    ];
    for (uri, body, status, field, message) in cases {
        let (got, v) = call(&app, "POST", uri, body.clone()).await;
        let shown = &body[..body.len().min(80)];
        assert_eq!(got, status, "{shown}: {v}");
        assert_eq!(v["field"], field, "{shown}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains(message),
            "{shown}: error {:?} lacks {message:?}",
            v["error"]
        );
    }
    // Several bad items: every one is listed, each with its index.
    let (_, v) = post(&app, "/predict", json!([{"userId": 0, "movieId": 31}, {"userId": 1, "movieId": 31}, {"userId": 1, "movieId": -1}])).await;
    let fields: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["[0].userId", "[2].movieId"], "{v}");
    let (status, _) = call(&app, "GET", "/no-such-page", Body::empty()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn not_ready_until_a_round_exists_then_ready() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_for(dir.path(), Limits::default()).await;
    let app = app(state.clone());
    assert_eq!(
        call(&app, "GET", "/healthz", Body::empty()).await.0,
        StatusCode::OK
    );
    let (status, v) = call(&app, "GET", "/readyz", Body::empty()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        v["error"].as_str().unwrap().contains("lensflow train"),
        "{v}"
    );
    assert_eq!(
        post(&app, "/predict", json!({"userId": 1, "movieId": 31}))
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    publish(dir.path(), 1);
    assert_eq!(state.models.refresh().await.unwrap(), Some(1));
    assert_eq!(
        call(&app, "GET", "/readyz", Body::empty()).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_new_round_swaps_in_and_a_corrupt_or_partial_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 1);
    let state = state_for(dir.path(), Limits::default()).await;
    let app = app(state.clone());
    let rating = |v: Value| v["predicted_rating"].as_f64().unwrap();
    let ask = json!({"userId": 1, "movieId": 31});
    assert_eq!(rating(post(&app, "/predict", ask.clone()).await.1), 4.31);

    publish(dir.path(), 2);
    assert_eq!(state.models.refresh().await.unwrap(), Some(2));
    assert_eq!(rating(post(&app, "/predict", ask.clone()).await.1), 4.32);
    assert_eq!(
        state.models.refresh().await.unwrap(),
        None,
        "nothing new: nothing swapped"
    );

    // Round 3's lookup table is damaged after its checksum was recorded.
    publish(dir.path(), 3);
    std::fs::write(
        dir.path().join("round-000003/users.parquet"),
        b"not parquet",
    )
    .unwrap();
    let err = state.models.refresh().await.unwrap_err().to_string();
    assert!(
        err.contains("round 3") && err.contains("users.parquet") && err.contains("SHA-256"),
        "{err}"
    );
    assert_eq!(
        rating(post(&app, "/predict", ask.clone()).await.1),
        4.32,
        "round 2 keeps serving"
    );
    assert_eq!(
        state.models.refresh().await.unwrap(),
        None,
        "a refused round is not retried at once"
    );

    // Round 4 lacks a file (a partial copy); round 5 has a model.json that LATEST's checksum disowns.
    publish(dir.path(), 4);
    std::fs::remove_file(dir.path().join("round-000004/movies.parquet")).unwrap();
    let err = state.models.refresh().await.unwrap_err().to_string();
    assert!(
        err.contains("movies.parquet") && err.contains("incomplete"),
        "{err}"
    );
    publish(dir.path(), 5);
    std::fs::write(dir.path().join("round-000005/model.json"), b"{}").unwrap();
    assert!(
        state
            .models
            .refresh()
            .await
            .unwrap_err()
            .to_string()
            .contains("model.json")
    );
    assert_eq!(rating(post(&app, "/predict", ask.clone()).await.1), 4.32);

    publish(dir.path(), 6);
    assert_eq!(state.models.refresh().await.unwrap(), Some(6));
    assert_eq!(rating(post(&app, "/predict", ask).await.1), 4.36);

    let (_, v) = call(&app, "GET", "/models", Body::empty()).await;
    assert_eq!(v["serving"]["round"], 6);
    let listed: Vec<u64> = v["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["round"].as_u64().unwrap())
        .collect();
    // The store's rounds whose model.json reads (5's does not); 3 and 4 were trained, just not served.
    assert_eq!(listed, [1, 2, 3, 4, 6], "{v}");
    assert_eq!(v["serving"]["sample_users"], json!([1, 2]));

    let (_, metrics) = call(&app, "GET", "/metrics", Body::empty()).await;
    let text = metrics.as_str().unwrap();
    for line in [
        "lensflow_model_round 6",
        "lensflow_model_swaps_total 3",
        "lensflow_model_refused_total 3",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "metrics lack `{line}`:\n{text}"
        );
    }
    assert!(
        text.contains(
            "lensflow_http_requests_total{route=\"/predict\",method=\"POST\",status=\"200\"} 5"
        ),
        "{text}"
    );
    assert!(
        text.contains("lensflow_http_request_duration_seconds_bucket{le="),
        "{text}"
    );
    assert!(
        text.contains("lensflow_predictions_total{task=\"all\"} 5"),
        "{text}"
    );
}

#[tokio::test]
async fn the_openapi_description_lists_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(state_for(dir.path(), Limits::default()).await);
    let (status, v) = call(&app, "GET", "/openapi.json", Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/predict",
        "/predict_classification",
        "/predict_regression",
        "/predict_clustering",
        "/models",
        "/status",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(
            v["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI paths"
        );
    }
    assert!(v["components"]["schemas"].get("PredictRequest").is_some());
    let (status, page) = call(&app, "GET", "/docs", Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.as_str().unwrap().contains("/openapi.json"));
}
