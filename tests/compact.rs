//! `lensflow lake compact` beside a running consumer and trainer: a real broker (tansu on
//! sqlite), the consumer landing small batches into a lake, `train --watch` training a round
//! per batch, and compaction run again and again meanwhile. No round may fail, every event
//! must still be in the lake exactly once, and SQL over the lake must count them all, after
//! the replaced files are gone.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn spawn(args: &[&str], log: &std::path::Path) -> Running {
    Running(lensflow(args).env("LENSFLOW_LOG", "info").stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap()).spawn().unwrap())
}

fn compact(lake: &str, models: &str, grace: &str, min_files: &str) -> serde_json::Value {
    let out = run_ok(&mut lensflow(["lake", "compact", "--lake", lake, "--models", models, "--grace", grace, "--min-files", min_files, "--json"]));
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn compaction_beside_a_running_consumer_and_trainer_changes_nothing_they_see() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let broker = Broker::start();
    let input = generate(dir.path(), 120_000, 21);
    let lake = format!("file://{}", dir.path().join("lake").display());
    let models = format!("file://{}", dir.path().join("models").display());
    let trainer_metrics = free_port();

    // Paced, so that batches keep landing while rounds train and compactions commit.
    let mut producer = spawn(&["produce", "--brokers", &broker.addr(), "--rate", "8000", "--input", input.to_str().unwrap()], &log("producer"));
    // The lone consumer reads the topic's partitions at start: the producer creates the topic.
    wait_until(Duration::from_secs(60), "the producer's first message", || broker.messages("ratings") > 0);
    let mut consumer = spawn(
        &["consume", "--brokers", &broker.addr(), "--lake", &lake, "--all-partitions", "--batch-rows", "5000", "--batch-interval", "1s", "--metrics-bind", ""],
        &log("consumer"),
    );
    let bind = format!("127.0.0.1:{trainer_metrics}");
    let mut trainer = spawn(&["train", "--watch", "--poll-interval", "300ms", "--lake", &lake, "--models", &models, "--metrics-bind", &bind], &log("trainer"));

    let landed = || lake_manifests_of(&lake, "movielens", &[]).iter().map(|m| m.rows).sum::<u64>();
    let batches = || lake_manifests_of(&lake, "movielens", &[]).len() as u64;
    // Compact again and again until every rating has landed and every batch has its round.
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while landed() < 120_000 || latest_round(&models, &[]) < batches() {
        assert!(
            Instant::now() < deadline,
            "not every rating landed and trained within 300 s ({} landed, round {}):\n{}",
            landed(),
            latest_round(&models, &[]),
            std::fs::read_to_string(log("consumer")).unwrap()
        );
        // At least three batches' files (three partitions each) per compaction.
        let s = compact(&lake, &models, "1h", "9");
        if let Some(record) = s["record"].as_u64() {
            records.push((record, s));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(wait_exit(&mut producer, Duration::from_secs(30), "producer").success());
    let batches = batches();
    let failures = metric(trainer_metrics, "lensflow_trainer_round_failures_total").unwrap_or(0.0);
    let rounds = metric(trainer_metrics, "lensflow_trainer_rounds_total").unwrap_or(0.0);
    assert_eq!(failures, 0.0, "a round failed while compactions committed:\n{}", std::fs::read_to_string(log("trainer")).unwrap());
    assert!(records.len() >= 2, "compaction committed only {records:?} while {batches} batches landed");
    assert_eq!(rounds as u64, batches, "one round per batch");
    for child in [&mut consumer, &mut trainer] {
        interrupt(child);
        assert!(wait_exit(child, Duration::from_secs(60), "consumer or trainer").success());
    }

    // The last trained batches too, then the replaced files go (no grace: nothing reads now).
    let last = compact(&lake, &models, "0s", "1");
    let mut summaries: Vec<&serde_json::Value> = records.iter().map(|(_, s)| s).collect();
    if last["record"].is_u64() {
        summaries.push(&last);
    }
    let replaced: u64 = summaries.iter().map(|s| s["files_in"].as_u64().unwrap()).sum();
    let removed = compact(&lake, &models, "0s", "1")["removed"].as_u64().unwrap() + last["removed"].as_u64().unwrap();
    assert_eq!(removed, replaced, "every replaced file is removed once its grace has passed");
    let store = pipeline_lake(&lake, "movielens", &[]);
    let files = tokio::runtime::Runtime::new().unwrap().block_on(store.list("events")).unwrap().len() as u64;
    // One file per partition the compacted batches hold (a batch of the consumer's aligned
    // partitions may lack one), and none of the batch files left.
    let manifests = lake_manifests_of(&lake, "movielens", &[]);
    for s in &summaries {
        let (first, last) = (s["batches"][0].as_u64().unwrap(), s["batches"][1].as_u64().unwrap());
        let partitions: std::collections::BTreeSet<i32> =
            manifests.iter().filter(|m| (first..=last).contains(&m.batch)).flat_map(|m| m.partitions.keys().copied()).collect();
        assert_eq!(s["files_out"].as_u64(), Some(partitions.len() as u64), "compaction of batches {first}..={last}: {s}");
    }
    let written: u64 = summaries.iter().map(|s| s["files_out"].as_u64().unwrap()).sum();
    assert_eq!(files, written, "only the compactions' files are left of the {batches} batches' files");

    // Every event once, as the manifests and compaction records resolve them, and SQL agrees.
    assert_exactly_once(&lake_rows_of(&lake, "movielens", &[]), &csv_ratings(&input));
    let out = run_ok(&mut lensflow(["sql", "--lake", &lake, "--pipeline", "movielens", "--format", "csv", "-e", "SELECT COUNT(*) AS n FROM ratings"]));
    assert_eq!(out.lines().nth(1), Some("120000"), "{out}");
    let records: Vec<(u64, u64)> = records.iter().map(|(r, s)| (*r, s["files_in"].as_u64().unwrap())).collect();
    eprintln!("{batches} batches, {rounds} rounds, compactions {records:?}, {removed} files replaced and removed, {files} event files left");
}
