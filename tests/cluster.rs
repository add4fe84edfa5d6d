//! End to end: the docker-compose topology as separate processes on 127.0.0.1, with no Docker
//! engine: a real Kafka-protocol broker (tansu), a real S3 server (moto) holding the lake and
//! the models, a Ballista scheduler with two executors, a one-shot producer of ratings_small,
//! the consumer, the trainer watching the lake and training on the cluster, and the API.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn service(args: &[&str], env: &[(String, String)], log: std::fs::File) -> Running {
    Running(lensflow(args).env("LENSFLOW_LOG", "info").envs(env.iter().cloned()).stdout(Stdio::null()).stderr(log).spawn().unwrap())
}

/// Every crate of lensflow logs at debug, the libraries at info: the most a log ever says.
const VERBOSE: &str = "info,lensflow=debug,lensflow_core=debug,lensflow_jobs=debug,lensflow_api=debug,lensflow_scheduler=debug,lensflow_executor=debug";

fn stop(child: &mut Child, what: &str) {
    interrupt(child);
    let status = wait_exit(child, Duration::from_secs(60), what);
    assert!(status.success(), "{what} did not shut down cleanly: {status}");
}

#[test]
fn the_compose_topology_as_processes_serves_round_three() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let log = |name: &str| std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
    let broker = Broker::start();
    let s3 = S3::start("lensflow");
    let mut env = s3.env();
    env.push(("LENSFLOW_LOG".into(), VERBOSE.into()));
    let cluster = Cluster::start_with_env(dir.path(), 2, &env);
    let (lake, models) = ("s3://lensflow/lake", "s3://lensflow/models");

    // The one-shot producer first, so that batch boundaries do not depend on timing: two
    // batches close on size at once and the last, short one on the interval.
    run_ok(lensflow(["produce", "--brokers", &broker.addr(), "--topic", "ratings", "--input"]).arg(ratings_small()));
    let mut consumer = service(
        &["consume", "--brokers", &broker.addr(), "--topic", "ratings", "--lake", lake, "--batch-rows", "33335", "--batch-interval", "10s"],
        &env,
        log("consumer"),
    );
    let mut trainer =
        service(&["train", "--watch", "--poll-interval", "1s", "--lake", lake, "--models", models, "--scheduler", &cluster.url()], &env, log("trainer"));
    let api = Server::start_logged(models.as_ref(), &["--lake", lake, "--poll-interval", "500ms"], &env, log("api"));
    api.wait_round(3, Duration::from_secs(600));

    let client = reqwest::blocking::Client::new();
    let ask = json!([{"userId": 1, "movieId": 31}, {"userId": 547, "movieId": 1}]);
    for (path, field) in [("/predict_classification", "prediction_like"), ("/predict_regression", "predicted_rating"), ("/predict_clustering", "cluster_id")] {
        let res = client.post(api.url(path)).json(&ask).send().unwrap();
        assert_eq!(res.status().as_u16(), 200, "{path}");
        let answers: Value = res.json().unwrap();
        for a in answers.as_array().unwrap() {
            assert_eq!(a["round"], 3, "{path}: {a}");
            assert!(a[field].is_number(), "{path} lacks {field}: {a}");
        }
    }
    let models_v: Value = reqwest::blocking::get(api.url("/models")).unwrap().json().unwrap();
    let rounds: Vec<u64> = models_v["rounds"].as_array().unwrap().iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, [1, 2, 3]);
    assert_eq!(models_v["serving"]["lineage"]["rows"], 100_004);
    assert!(models_v["serving"]["metrics"]["rmse"].as_f64().unwrap() <= 0.88, "{}", models_v["serving"]["metrics"]);
    let status: Value = reqwest::blocking::get(api.url("/status")).unwrap().json().unwrap();
    assert_eq!((status["lake"].as_str(), status["events"].as_u64()), (Some("s3://lensflow/lake/movielens"), Some(100_004)), "{status}");
    // The rounds ran as jobs on the cluster's scheduler, not in the trainer.
    let jobs = http_get(cluster.port, "/api/jobs").unwrap_or_default();
    assert!(jobs.matches("job_id").count() >= 1, "the scheduler ran the training queries: {jobs}");

    // A SQL job, as spark-submit would run one: on the cluster, over the S3 lake, its result
    // written to S3 as plain Parquet that any reader opens (here the parquet crate, no lensflow).
    let job = dir.path().join("ratings-per-user.sql");
    std::fs::write(&job, "SELECT user_id, COUNT(*) AS ratings, SUM(CAST(rating * 2 AS BIGINT)) AS halves FROM ratings GROUP BY user_id").unwrap();
    let out = "s3://lensflow/reports/ratings-per-user";
    run_ok(lensflow(["sql", "--lake", lake, "--models", models, "--scheduler", &cluster.url(), "--out", out, "-f"]).arg(&job).envs(env.iter().cloned()));
    let jobs = http_get(cluster.port, "/api/jobs").unwrap_or_default();
    assert!(jobs.contains("ratings-per-user"), "the job ran under its file's name: {jobs}");
    let reports = lensflow_core::Lake::open(out, &lensflow_core::StorageOptions(env.clone())).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut users, mut ratings) = (0usize, 0i64);
    for file in rt.block_on(reports.list("")).unwrap() {
        let bytes = rt.block_on(reports.get(&file)).unwrap();
        for batch in parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap() {
            let batch = batch.unwrap();
            users += batch.num_rows();
            let counts = batch.column_by_name("ratings").unwrap().as_any().downcast_ref::<arrow_array::Int64Array>().unwrap();
            ratings += counts.iter().flatten().sum::<i64>();
        }
    }
    assert_eq!((users, ratings), (671, 100_004), "one row per user, every rating counted");

    // The secret the processes used is in no answer, no `--help` and no log line, at debug.
    let secret_free = |what: &str, text: &str| assert!(!text.contains(S3_SECRET), "{what} shows the S3 secret key");
    for path in ["/status", "/models", "/metrics", "/pipelines"] {
        secret_free(path, &reqwest::blocking::get(api.url(path)).unwrap().text().unwrap());
    }
    for command in ["consume", "train", "serve", "sql", "scheduler", "executor", "demo"] {
        let help = lensflow([command, "--help"]).envs(env.iter().cloned()).output().unwrap();
        secret_free(&format!("{command} --help"), &String::from_utf8_lossy(&help.stdout));
    }
    // A failing S3 request's error names the store, not the credentials.
    let bad = lensflow(["train", "--lake", "s3://no-such-bucket/lake", "--models", "s3://no-such-bucket/models"]).envs(env.iter().cloned()).output().unwrap();
    assert!(!bad.status.success());
    secret_free("an S3 error", &String::from_utf8_lossy(&bad.stderr));

    stop(&mut trainer, "trainer");
    stop(&mut consumer, "consumer");
    let mut api = api;
    stop(&mut api.child, "api");
    let mut logged = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap();
            secret_free(&path.display().to_string(), &text);
            logged += text.lines().count();
        }
    }
    assert!(logged > 100, "the services logged ({logged} lines)");
    let trainer_log = std::fs::read_to_string(dir.path().join("trainer.log")).unwrap();
    assert!(trainer_log.contains("DEBUG"), "the trainer logged at debug");
}
