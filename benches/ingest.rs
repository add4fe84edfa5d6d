//! Ingest benchmark: produce and consume throughput against a real broker (tansu on sqlite),
//! Parquet bytes per rating, and peak memory of producer and consumer.
//!
//! `cargo bench --bench ingest` (1M generated ratings; `LENSFLOW_BENCH_RATINGS=10000000` for more).
//! `LENSFLOW_BENCH_BROKERS=host:port` measures against a broker already running (the one a
//! deployment will use) instead of a tansu started here, in a topic of its own. Prints a report;
//! nothing here is asserted on time.
//!
//! Then backpressure: a second consumer lands the whole topic again as a backlog in small
//! batches (`LENSFLOW_BENCH_BACKLOG_BATCH`, default 5000) while its resident memory is sampled
//! every second; the report shows it per tenth of the run, which stays flat when nothing
//! buffers without bound.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn main() {
    let n: u64 = std::env::var("LENSFLOW_BENCH_RATINGS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    // A broker of the user's keeps what the bench writes: a fresh topic and group every run.
    let (tansu, brokers) = match std::env::var("LENSFLOW_BENCH_BROKERS") {
        Ok(brokers) if !brokers.is_empty() => (None, brokers),
        _ => {
            let tansu = Broker::start();
            let addr = tansu.addr();
            (Some(tansu), addr)
        }
    };
    let topic = format!("lensflow-bench-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();

    let started = Instant::now();
    let input = generate(dir.path(), n, 42);
    let gen_time = started.elapsed();
    let csv_bytes = std::fs::metadata(&input).unwrap().len();

    let (out, produce_time, produce_peak, _) =
        run_measured(lensflow(["produce", "--brokers", &brokers, "--topic", &topic, "--partitions", "3", "--json", "--input"]).arg(&input), &[]);
    let produced: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(produced["delivered"].as_u64(), Some(n));

    let lake = format!("file://{}", dir.path().join("lake").display());
    let consume_start_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let (out, consume_time, consume_peak, _) = run_measured(
        &mut lensflow([
            "consume",
            "--brokers",
            &brokers,
            "--topic",
            &topic,
            "--group",
            &topic,
            "--lake",
            &lake,
            "--batch-rows",
            "100000",
            "--exit-when-idle",
            "5s",
            "--json",
        ]),
        &[],
    );
    let consumed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(consumed["rows"].as_u64(), Some(n));

    let manifests = lake_manifests(&lake, &[]);
    let parquet_bytes: u64 = manifests.iter().flat_map(|m| &m.files).map(|f| f.bytes).sum();
    let last_commit_ms = manifests.iter().map(|m| m.created_at_ms).max().unwrap_or(consume_start_ms);
    let landing = Duration::from_millis((last_commit_ms - consume_start_ms).max(1) as u64);

    let broker = if tansu.is_some() { "tansu 0.6 (sqlite) on 127.0.0.1".to_string() } else { format!("the broker at {brokers}") };
    println!("\n## lensflow ingest benchmark: {n} generated ratings, {broker}\n");
    println!("| stage | time | throughput | peak RSS |");
    println!("|---|---|---|---|");
    println!("| generate | {:.2} s | {:.0} ratings/s | – |", gen_time.as_secs_f64(), n as f64 / gen_time.as_secs_f64());
    println!(
        "| produce (to all delivery reports) | {:.2} s | {:.0} msg/s | {:.0} MiB |",
        produce_time.as_secs_f64(),
        n as f64 / produce_time.as_secs_f64(),
        mib(produce_peak)
    );
    println!(
        "| consume (start to last manifest, group join included) | {:.2} s | {:.0} msg/s | {:.0} MiB |",
        landing.as_secs_f64(),
        n as f64 / landing.as_secs_f64(),
        mib(consume_peak)
    );
    println!("| consume (whole run, incl. 5 s idle exit) | {:.2} s | – | – |", consume_time.as_secs_f64());
    println!();
    println!(
        "lake: {} batches, {:.1} MiB of Parquet = {:.2} bytes/rating (CSV: {:.2} bytes/rating)",
        manifests.len(),
        mib(parquet_bytes),
        parquet_bytes as f64 / n as f64,
        csv_bytes as f64 / n as f64
    );
    backlog(&brokers, &topic, dir.path(), n);
}

/// Lands the topic's `n` messages again, as one backlog, in small batches; prints the
/// consumer's RSS over the run.
fn backlog(brokers: &str, topic: &str, dir: &std::path::Path, n: u64) {
    let batch: u64 = std::env::var("LENSFLOW_BENCH_BACKLOG_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let lake = format!("file://{}", dir.join("backlog").display());
    let started = Instant::now();
    let mut child = lensflow(["consume", "--brokers", brokers, "--topic", topic, "--all-partitions", "--until-end", "--metrics-bind", ""])
        .args(["--lake", &lake, "--batch-rows", &batch.to_string(), "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut samples = vec![];
    while child.try_wait().unwrap().is_none() {
        if let Some(rss) = proc_memory(child.id(), "VmRSS") {
            samples.push(rss);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let out = child.wait_with_output().unwrap();
    let landed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(landed["rows"].as_u64(), Some(n));
    let seconds = started.elapsed().as_secs_f64();
    println!("\n## Backpressure: a {n}-message backlog landed in batches of {batch}\n");
    println!("{} batches in {seconds:.1} s ({:.0} msg/s). Consumer RSS by tenth of the run (MiB):\n", landed["batches"], n as f64 / seconds);
    let tenths: Vec<String> = (0..10)
        .filter_map(|i| {
            let part = &samples[samples.len() * i / 10..(samples.len() * (i + 1) / 10).max(samples.len() * i / 10)];
            part.iter().max().map(|m| format!("{:.0}", mib(*m)))
        })
        .collect();
    println!("| {} |", tenths.join(" | "));
}
