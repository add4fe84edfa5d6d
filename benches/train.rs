//! Training benchmark: round time per stage and peak memory of trainer and executors, on
//! DataFusion in-process (the default, carrying state; and `--full`, recomputing every round),
//! Ballista standalone, and a two-executor cluster (separate processes on loopback).
//!
//! `cargo bench --bench train` (1M generated ratings in 3 batches; `LENSFLOW_BENCH_RATINGS=10000000`
//! for more, `LENSFLOW_BENCH_BATCHES=30` for more rounds, `LENSFLOW_BENCH_ENGINES=local,standalone`
//! for fewer engines (of local, full, window, standalone, cluster, cluster-window); `LENSFLOW_BENCH_WINDOW=5` is
//! the `--window` of the `window` run; `LENSFLOW_BENCH_LOG=lensflow_jobs=debug` logs each
//! query's seconds; `LENSFLOW_BENCH_PARTITIONS=4` spreads the events over 4 partitions, read
//! unevenly into batches as from a backlog, so that batches bring late events;
//! `LENSFLOW_BENCH_POPULATION=steady` makes every batch the generated file's last batch again,
//! shifted later in time, so that each batch holds the same users and movies while the lake and
//! every entity's history grow). The lake is written straight through the library (ingest has
//! its own benchmark).
//! Prints a report; nothing here is asserted on time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::*;

/// Prints a run's rounds; `steady_from` (a round number) adds the slope from that round on.
fn report(title: &str, out: &str, trainer: u64, executors: &[u64], wall: std::time::Duration, steady_from: Option<usize>) {
    println!(
        "\n### {title} (wall {:.1} s, trainer peak RSS {:.0} MiB{})\n",
        wall.as_secs_f64(),
        mib(trainer),
        executors.iter().enumerate().map(|(i, e)| format!(", executor {} peak RSS {:.0} MiB", i + 1, mib(*e))).collect::<String>()
    );
    let rounds: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let stages: Vec<String> = rounds[0]["seconds"].as_object().unwrap().keys().cloned().collect();
    println!("| round | rows | {} | total s | state rows recomputed | RMSE (base) | AUC | accuracy (base) |", stages.join(" s | ") + " s");
    println!("|---|---|{}---|---|---|---|---|", "---|".repeat(stages.len()));
    for r in &rounds {
        let secs: BTreeMap<String, f64> = serde_json::from_value(r["seconds"].clone()).unwrap();
        println!(
            "| {} | {} | {} | {:.2} | {} | {:.4} ({:.4}) | {:.4} | {:.4} ({:.4}) |",
            r["round"],
            r["train_rows"].as_u64().unwrap() + r["test_rows"].as_u64().unwrap(),
            stages.iter().map(|s| format!("{:.2}", secs[s])).collect::<Vec<_>>().join(" | "),
            round_seconds(r),
            match r["state"]["mode"].as_str() {
                Some("incremental") => r["state"]["recomputed"].to_string(),
                Some(_) => format!("all ({})", r["state"]["reason"].as_str().unwrap_or("")),
                None => "-".into(),
            },
            r["rmse"].as_f64().unwrap(),
            r["rmse_baseline"].as_f64().unwrap(),
            r["auc"].as_f64().unwrap(),
            r["accuracy"].as_f64().unwrap(),
            r["accuracy_baseline"].as_f64().unwrap()
        );
    }
    // How round time grows with the data: least squares of seconds on the lake's events.
    if rounds.len() >= 3 {
        let xy: Vec<(f64, f64)> = rounds.iter().map(|r| (r["events"].as_f64().unwrap(), round_seconds(r))).collect();
        let slope = slope(&xy);
        let all: f64 = xy.iter().map(|p| p.1).sum();
        println!("\nround time grows {:.2} s per 100k events of the lake; all {} rounds: {all:.1} s", slope * 1e5, rounds.len());
        if let Some(from) = steady_from.filter(|f| rounds.len() >= f + 2) {
            let steady = common::slope(&xy[from - 1..]);
            println!("from round {from} on (a full window): {:.3} s per 100k events of the lake", steady * 1e5);
        }
    }
}

/// Rewrites the generated ratings as `batches` copies of their last batch, each copy's
/// timestamps after the previous copy's: the batches' entities stay the same as the lake grows,
/// which tells growth with the lake apart from growth with the batch's distinct entities.
fn repeat_last_batch(csv: &std::path::Path, batches: usize) {
    let text = std::fs::read_to_string(csv).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let rows: Vec<(&str, i64)> = lines.map(|l| l.rsplit_once(',').map(|(rest, ts)| (rest, ts.parse().unwrap())).unwrap()).collect();
    let last = &rows[rows.len() - rows.len() / batches..];
    let (first_ts, last_ts) = (last[0].1, last[last.len() - 1].1);
    let mut out = String::with_capacity(text.len());
    out.push_str(header);
    out.push('\n');
    for copy in 0..batches as i64 {
        for (rest, ts) in last {
            out.push_str(&format!("{rest},{}\n", ts + copy * (last_ts - first_ts + 1)));
        }
    }
    std::fs::write(csv, out).unwrap();
}

fn main() {
    let n: u64 = std::env::var("LENSFLOW_BENCH_RATINGS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let batches: usize = std::env::var("LENSFLOW_BENCH_BATCHES").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let engines = std::env::var("LENSFLOW_BENCH_ENGINES").unwrap_or_else(|_| "local,standalone,cluster".into());
    let dir = tempfile::tempdir().unwrap();
    let csv = generate(dir.path(), n, 42);
    let steady = std::env::var("LENSFLOW_BENCH_POPULATION").is_ok_and(|v| v == "steady");
    if steady {
        repeat_last_batch(&csv, batches);
    }
    let lake = format!("file://{}", dir.path().join("lake").display());
    let partitions: usize = std::env::var("LENSFLOW_BENCH_PARTITIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    build_lake_in_partitions(&csv, &lake, "movielens", batches, partitions);
    std::fs::remove_file(&csv).unwrap();
    let population = if steady { ", each batch the same users and movies (the generated last batch, repeated later in time)" } else { "" };
    println!(
        "\n## lensflow training benchmark: {n} generated ratings in {batches} batches ({batches} cumulative rounds) from {partitions} partition(s){population}"
    );

    let window: u64 = std::env::var("LENSFLOW_BENCH_WINDOW").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let window_title = format!("DataFusion in-process, --window {window} (models fitted on the newest {window} batches)");
    let window_args = vec!["--window".to_string(), window.to_string()];
    let cluster_window = format!("scheduler + 2 executors, --window {window}");
    let runs: [(&str, &str, Vec<String>); 4] = [
        ("local", "DataFusion in-process (the default: state carried from round to round)", vec![]),
        ("full", "DataFusion in-process, --full (every round recomputes every event's state)", vec!["--full".into()]),
        ("window", &window_title, window_args.clone()),
        ("standalone", "Ballista standalone (in-process)", vec!["--scheduler".into(), "standalone".into()]),
    ];
    for (name, title, args) in runs {
        if !engines.split(',').any(|e| e == name) {
            continue;
        }
        let models = dir.path().join(format!("models-{name}"));
        let mut cmd = lensflow(["train", "--lake", &lake, "--json", "--models"]);
        cmd.arg(&models).args(&args);
        if let Ok(log) = std::env::var("LENSFLOW_BENCH_LOG") {
            cmd.env("LENSFLOW_LOG", log);
        }
        let (out, wall, peak, _) = run_measured(&mut cmd, &[]);
        report(title, &out, peak, &[], wall, (name == "window").then_some(window as usize + 1));
    }

    let cluster_runs = [("cluster", "scheduler + 2 executors (separate processes)", vec![]), ("cluster-window", &*cluster_window, window_args)];
    for (name, title, args) in cluster_runs {
        if !engines.split(',').any(|e| e == name) {
            continue;
        }
        let cluster = Cluster::start(dir.path(), 2);
        let pids: Vec<u32> = cluster.executors.iter().map(|e| e.id()).collect();
        let models = dir.path().join(format!("models-{name}"));
        let mut cmd = lensflow(["train", "--lake", &lake, "--scheduler", &cluster.url(), "--json", "--models"]);
        cmd.arg(&models).args(&args);
        if let Ok(log) = std::env::var("LENSFLOW_BENCH_LOG") {
            cmd.env("LENSFLOW_LOG", log);
        }
        let (out, wall, peak, executors) = run_measured(&mut cmd, &pids);
        report(title, &out, peak, &executors, wall, (name == "cluster-window").then_some(window as usize + 1));
    }
}
