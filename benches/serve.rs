//! Serving benchmark: requests/s and latency percentiles of `lensflow serve` under `wrk`
//! (Debian's `wrk`) at 8 and 64 connections, single requests and batches of 100, for both shipped
//! pipelines in one model store, plus the server's memory. The rounds come from the real trainer
//! (`lensflow demo --exit-after-train`): MovieLens on generated ratings, smart-home on the
//! published device file when it is there.
//!
//! `cargo bench --bench serve` (1M generated ratings; `LENSFLOW_BENCH_RATINGS` for more,
//! `LENSFLOW_BENCH_SECONDS` per row). Prints a report; nothing here is asserted on time.
//! Last, a saturation run: 256 connections on `/predict` for `LENSFLOW_BENCH_SATURATE` seconds
//! (60) with the server's RSS sampled every 5 s; any failed request fails the benchmark.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn proc_mib(pid: u32, key: &str) -> f64 {
    proc_memory(pid, key).unwrap_or(0) as f64 / (1024.0 * 1024.0)
}

/// The smart-home device file among the test data, if it is there: without it the benchmark
/// measures MovieLens alone.
fn devices_csv() -> Option<PathBuf> {
    Some(test_data_dir().join("smart_home_device_usage_data.csv")).filter(|p| p.is_file())
}

fn main() {
    let n: u64 = std::env::var("LENSFLOW_BENCH_RATINGS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let seconds = std::env::var("LENSFLOW_BENCH_SECONDS").unwrap_or_else(|_| "10".into());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    run_ok(lensflow(["demo", "--exit-after-train", "--ratings", &n.to_string(), "--data-dir"]).arg(&data));
    let devices = devices_csv();
    if let Some(csv) = &devices {
        run_ok(lensflow(["demo", "--exit-after-train", "--pipeline", "smart-home", "--input"]).arg(csv).arg("--data-dir").arg(&data));
    }
    let models = data.join("models");

    let server = Server::start(&models, &[]);
    // Ready names every pipeline's round: `ready: round 3, smart-home round 3`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !reqwest::blocking::get(server.url("/readyz")).and_then(|r| r.text()).unwrap_or_default().starts_with("ready: round 3") {
        assert!(std::time::Instant::now() < deadline, "the server did not load round 3");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = server.child.id();
    let loaded = proc_mib(pid, "VmRSS");
    let (users, movies) = ((n / 150) as u32, ((n / 11).min(30_000)) as u32);
    let rating = format!("string.format('{{\"userId\":%d,\"movieId\":%d}}', math.random(1, {users}), math.random(1, {movies}))");
    let device = "string.format('{\"DeviceType\":\"%s\",\"UsageHoursPerDay\":%.2f,\"EnergyConsumption\":%.2f,\"UserPreferences\":%d,\"MalfunctionIncidents\":%d,\"DeviceAgeMonths\":%d}', types[math.random(1, 5)], math.random() * 24, math.random() * 10, math.random(0, 1), math.random(0, 4), math.random(1, 59))";
    println!("\n## lensflow serve benchmark: round 3 of {n} generated ratings ({users} users, {movies} movies), wrk {seconds} s per row, 2 threads");
    println!("\nServer RSS once the rounds are loaded: {loaded:.0} MiB\n");
    println!("| endpoint | batch | connections | requests/s | predictions/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|---|");
    let mut rows = vec![("/predict", 1, rating.as_str()), ("/predict", 100, rating.as_str()), ("/predict_regression", 1, rating.as_str())];
    if devices.is_some() {
        rows.extend([("/pipelines/smart-home/predict", 1, device), ("/pipelines/smart-home/predict", 100, device)]);
    }
    for (i, (path, batch, item)) in rows.into_iter().enumerate() {
        let lua = dir.path().join(format!("bench-{i}.lua"));
        std::fs::write(&lua, wrk_script(path, batch, item)).unwrap();
        for connections in [8, 64] {
            let out = Command::new("wrk")
                .args(["-t2", "-c", &connections.to_string(), "-d", &format!("{seconds}s"), "--latency", "-s"])
                .arg(&lua)
                .arg(server.url(""))
                .output()
                .expect("wrk (apt-get install wrk)");
            let out = String::from_utf8_lossy(&out.stdout);
            assert!(!out.contains("Non-2xx"), "failed requests under load:\n{out}");
            let rps: f64 = wrk_field(&out, "Requests/sec:").parse().unwrap_or(0.0);
            println!("| {path} | {batch} | {connections} | {rps:.0} | {:.0} | {} | {} |", rps * batch as f64, wrk_field(&out, "50%"), wrk_field(&out, "99%"));
        }
    }
    println!("\nServer peak RSS over the whole run: {:.0} MiB", proc_mib(pid, "VmHWM"));
    saturate(&server, &dir.path().join("bench-0.lua"));
}

/// `/predict` at saturation (256 connections) for `LENSFLOW_BENCH_SATURATE` seconds (60),
/// sampling the server's RSS every 5 s: zero errors, and memory flat after warm-up.
fn saturate(server: &Server, lua: &std::path::Path) {
    let seconds: u64 = std::env::var("LENSFLOW_BENCH_SATURATE").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let pid = server.child.id();
    let wrk = Command::new("wrk")
        .args(["-t2", "-c256", "-d", &format!("{seconds}s"), "--latency", "-s"])
        .arg(lua)
        .arg(server.url(""))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wrk (apt-get install wrk)");
    let mut samples = vec![];
    for _ in 0..seconds / 5 {
        std::thread::sleep(std::time::Duration::from_secs(5));
        samples.push(proc_mib(pid, "VmRSS"));
    }
    let out = wrk.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(!out.contains("Non-2xx") && !out.contains("Socket errors"), "errors at saturation:\n{out}");
    let rps: f64 = wrk_field(&out, "Requests/sec:").parse().unwrap_or(0.0);
    println!("\n## /predict at saturation: 256 connections for {seconds} s\n");
    println!("{rps:.0} requests/s, p50 {}, p99 {}, zero errors. Server RSS every 5 s (MiB):\n", wrk_field(&out, "50%"), wrk_field(&out, "99%"));
    println!("| {} |", samples.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" | "));
}
