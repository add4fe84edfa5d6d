//! End to end: `lensflow demo`, the README's first command, as a newcomer runs it.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Starts `lensflow demo ARGS --input INPUT` serving on a free port with its data in `dir`, waits
/// until it serves `round`, and returns the server with what the demo printed so far.
fn start_demo(dir: &Path, args: &[&str], input: &Path, round: u64) -> (Server, String) {
    let port = free_port();
    let out = std::fs::File::create(dir.join("demo.out")).unwrap();
    let demo = lensflow(["demo"])
        .args(args)
        .arg("--input")
        .arg(input)
        .args(["--bind", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("data"))
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server { child: demo, port };
    server.wait_round(round, Duration::from_secs(300));
    (server, std::fs::read_to_string(dir.join("demo.out")).unwrap())
}

#[test]
fn the_demo_runs_every_stage_and_serves_until_ctrl_c() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let (server, printed) = start_demo(dir.path(), &[], &ratings_small(), 3);
    assert!(printed.contains(&format!("open http://127.0.0.1:{}/", server.port)), "the URL is printed at the end:\n{printed}");
    assert!(printed.contains("landed 100004 events in 3 batches"), "{printed}");
    for round in 1..=3 {
        assert!(printed.contains(&format!("round {round} (batches 1..={round})")), "{printed}");
    }

    let client = reqwest::blocking::Client::new();
    let answer: Value = client.post(server.url("/predict")).json(&json!({"userId": 1, "movieId": 31})).send().unwrap().json().unwrap();
    assert_eq!(answer["round"], 3, "{answer}");
    assert!(answer["predicted_rating"].is_number() && answer["prediction_like"].is_number() && answer["cluster_id"].is_number(), "{answer}");
    let page = reqwest::blocking::get(server.url("/")).unwrap().text().unwrap();
    assert!(page.contains("<title>lensflow</title>"));
    let status: Value = reqwest::blocking::get(server.url("/status")).unwrap().json().unwrap();
    assert_eq!((status["batches"].as_u64(), status["events"].as_u64()), (Some(3), Some(100_004)), "{status}");

    let mut server = server;
    interrupt(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(20), "lensflow demo");
    assert!(status.success(), "Ctrl-C ends the demo cleanly: {status}");
}

#[test]
fn a_second_run_reuses_its_data_or_starts_fresh() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |extra: &[&str]| run_ok(lensflow(["demo", "--exit-after-train", "--ratings", "30000", "--data-dir"]).arg(&data).args(extra));
    let latest = || std::fs::read_to_string(data.join("models/movielens/LATEST")).unwrap();
    let lake = format!("file://{}", data.join("lake").display());

    let first = run(&[]);
    assert!(first.contains("round 3 (batches 1..=3)"), "{first}");
    let (pointer, rows) = (latest(), lake_rows(&lake, &[]));
    assert_eq!((rows.len(), lake_batches(&lake, &[])), (30_000, 3));

    let again = run(&[]);
    assert!(again.contains("reusing") && again.contains("every batch already has its round"), "{again}");
    assert_eq!(latest(), pointer, "nothing retrained");
    assert_eq!(lake_rows(&lake, &[]).len(), 30_000, "nothing landed twice");

    let fresh = run(&["--fresh", "--rounds", "2"]);
    assert!(fresh.contains("removed") && fresh.contains("round 2 (batches 1..=2)") && !fresh.contains("round 3"), "{fresh}");
    assert_eq!(lake_batches(&lake, &[]), 2);
    assert_exactly_once(&lake_rows(&lake, &[]), &csv_ratings(&data.join("ratings.csv")));
    assert_ne!(latest(), pointer);
}

#[test]
fn the_demo_runs_the_smart_home_pipeline_the_same_way() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let (mut server, printed) = start_demo(dir.path(), &["--pipeline", "smart-home", "--rounds", "2"], &smart_home_csv(), 2);
    assert!(printed.contains("landed 5403 events in 2 batches"), "{printed}");
    assert!(printed.contains("smart-home round 2 (batches 1..=2)") && printed.contains("no skill"), "the regression says it has no skill:\n{printed}");

    // The demo's own pipeline answers on the original routes and on its versioned ones alike.
    let device = json!({"DeviceType": "Thermostat", "UsageHoursPerDay": 12.0, "EnergyConsumption": 2.5, "UserPreferences": 1, "MalfunctionIncidents": 0, "DeviceAgeMonths": 10});
    let client = reqwest::blocking::Client::new();
    let a: Value = client.post(server.url("/predict")).json(&device).send().unwrap().json().unwrap();
    let b: Value = client.post(server.url("/pipelines/smart-home/predict")).json(&device).send().unwrap().json().unwrap();
    assert_eq!(a, b);
    assert_eq!(a["round"], 2, "{a}");
    assert_eq!(a["prediction_efficient"], 1, "a new, lightly loaded, fault-free device used by an automation fan is efficient: {a}");
    assert!(a["predicted_incidents"].is_number() && a["cluster_id"].is_number() && a["segment"].is_string(), "{a}");
    let status: Value = reqwest::blocking::get(server.url("/status")).unwrap().json().unwrap();
    assert_eq!((status["batches"].as_u64(), status["events"].as_u64()), (Some(2), Some(5_403)), "{status}");

    interrupt(&server.child);
    assert!(wait_exit(&mut server.child, Duration::from_secs(20), "lensflow demo").success());
}
