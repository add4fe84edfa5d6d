//! Serving benchmark: requests/s and latency percentiles of `lensflow serve` under `wrk`
//! (Debian's `wrk`) at 8 and 64 connections, single requests and batches of 100, plus the
//! server's memory. The rounds come from the real trainer on generated ratings.
//!
//! `cargo bench --bench serve` (1M generated ratings; `LENSFLOW_BENCH_RATINGS` for more).
//! Prints a report; nothing here is asserted on time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::*;

/// A wrk script posting `batch` random (user, movie) pairs per request to `path`.
fn script(path: &str, batch: usize, users: u32, movies: u32) -> String {
    format!(
        r#"wrk.method = "POST"
wrk.path = "{path}"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local items = {{}}
  for i = 1, {batch} do
    items[i] = string.format('{{"userId":%d,"movieId":%d}}', math.random(1, {users}), math.random(1, {movies}))
  end
  return wrk.format(nil, nil, nil, "[" .. table.concat(items, ",") .. "]")
end
"#
    )
}

fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines().find_map(|l| l.trim().strip_prefix(label)).map(str::trim).unwrap_or("?")
}

fn mib(pid: u32, key: &str) -> f64 {
    proc_memory(pid, key).unwrap_or(0) as f64 / (1024.0 * 1024.0)
}

fn main() {
    let n: u64 = std::env::var("LENSFLOW_BENCH_RATINGS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let seconds = std::env::var("LENSFLOW_BENCH_SECONDS").unwrap_or_else(|_| "10".into());
    let dir = tempfile::tempdir().unwrap();
    let csv = generate(dir.path(), n, 42);
    let lake = format!("file://{}", dir.path().join("lake").display());
    build_lake(&csv, &lake, 3);
    std::fs::remove_file(&csv).unwrap();
    let models = dir.path().join("models");
    run_ok(lensflow(["train", "--lake", &lake, "--json", "--models"]).arg(&models));

    let server = Server::start(&models, &[]);
    server.wait_round(3, std::time::Duration::from_secs(60));
    let pid = server.child.id();
    let loaded = mib(pid, "VmRSS");
    let (users, movies) = ((n / 150) as u32, ((n / 11).min(30_000)) as u32);
    println!("\n## lensflow serve benchmark: round 3 of {n} generated ratings ({users} users, {movies} movies), wrk {seconds} s per row, 2 threads");
    println!("\nServer RSS once the round is loaded: {loaded:.0} MiB\n");
    println!("| endpoint | batch | connections | requests/s | predictions/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|---|");
    for (path, batch) in [("/predict", 1), ("/predict", 100), ("/predict_regression", 1)] {
        let lua = dir.path().join(format!("bench-{batch}.lua"));
        std::fs::write(&lua, script(path, batch, users, movies)).unwrap();
        for connections in [8, 64] {
            let out = Command::new("wrk")
                .args(["-t2", "-c", &connections.to_string(), "-d", &format!("{seconds}s"), "--latency", "-s"])
                .arg(&lua)
                .arg(server.url(""))
                .output()
                .expect("wrk (apt-get install wrk)");
            let out = String::from_utf8_lossy(&out.stdout);
            assert!(!out.contains("Non-2xx"), "failed requests under load:\n{out}");
            let rps: f64 = field(&out, "Requests/sec:").parse().unwrap_or(0.0);
            println!(
                "| {path} | {batch} | {connections} | {rps:.0} | {:.0} | {} | {} |",
                rps * batch as f64,
                field(&out, "50%"),
                field(&out, "99%")
            );
        }
    }
    println!("\nServer peak RSS over the whole run: {:.0} MiB", mib(pid, "VmHWM"));
}
