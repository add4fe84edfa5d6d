//! Growth benchmark: the whole pipeline at several sizes on this machine, beside Spark, written
//! up as a report.
//!
//! ```text
//! cargo bench --bench growth -- --ratings 1M,10M,25M [--batches 10] [--executors 2] [--out docs/growth.md]
//! ```
//!
//! Each size runs every stage as its own process, as a deployment does: `lensflow generate` →
//! `lensflow produce` into tansu on sqlite → `lensflow consume` (one instance reading every
//! partition) into a file lake in `--batches` batches → `lensflow train` of every round on a scheduler and `--executors` executors →
//! the same round on pyspark `local[2]` over the same event files (benches/spark/round.py) →
//! `lensflow serve` of the last round under wrk. Per stage the report gives wall time,
//! throughput, each process's peak RSS (VmHWM from /proc, sampled every 100 ms) and bytes on disk;
//! per size the round times and their slope; over the sizes, each stage's growth exponent k
//! (time ∝ N^k, least squares on log–log). The report is rewritten after each size, so a size
//! that fails leaves the ones before it. Nothing is asserted on time.
//! `LENSFLOW_BENCH_LOG=lensflow_jobs=debug` logs the trainer's queries with their seconds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value as Json;

/// The growth benchmark's settings.
#[derive(Parser)]
struct Args {
    /// Sizes to run, in ratings, comma-separated; `k` and `M` suffixes allowed.
    #[arg(long, value_delimiter = ',', value_parser = count, default_value = "1M")]
    ratings: Vec<u64>,
    /// Batches (= training rounds) each size is consumed in.
    #[arg(long, default_value_t = 10)]
    batches: u64,
    /// Executors of the training cluster (separate processes).
    #[arg(long, default_value_t = 2)]
    executors: usize,
    /// Partitions of the Kafka topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Write the report here too (Markdown).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Leave Spark out.
    #[arg(long)]
    no_spark: bool,
    /// The Spark driver's heap.
    #[arg(long, default_value = "8g")]
    spark_driver_memory: String,
    /// Seconds of wrk load on `/predict`.
    #[arg(long, default_value_t = 10)]
    serve_seconds: u64,
    /// Train with `--window` (models fitted on the newest this many batches); needs
    /// `--no-spark`, since Spark's round refits on every batch.
    #[arg(long)]
    window: Option<u64>,
    /// The consumer's `--max-skew`: `0` lands each batch in event-time order across
    /// partitions, `off` in the order messages arrive.
    #[arg(long, default_value = "0")]
    max_skew: String,
    /// Where each size's data goes while it runs (a temporary folder by default).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// `25M`, `100k` or `1000000`.
fn count(s: &str) -> Result<u64, String> {
    let (digits, scale) = match s.trim().strip_suffix(['M', 'm']) {
        Some(d) => (d, 1_000_000.0),
        None => match s.trim().strip_suffix(['k', 'K']) {
            Some(d) => (d, 1_000.0),
            None => (s.trim(), 1.0),
        },
    };
    let n: f64 = digits.replace('_', "").parse().map_err(|_| format!("`{s}` is not a count like 1000000, 100k or 25M"))?;
    Ok((n * scale).round() as u64)
}

/// One stage of one size, as measured.
struct Stage {
    name: &'static str,
    wall: f64,
    /// Items per second and their unit, where the stage moves items.
    throughput: Option<(f64, &'static str)>,
    /// Peak RSS in bytes, per process.
    peaks: Vec<(String, u64)>,
    /// CPU seconds each process of `peaks` spent during the stage (none for Spark's JVM).
    cpu: Vec<f64>,
    /// What the stage leaves on disk: label, bytes, files.
    disk: Option<(&'static str, u64, u64)>,
}

/// Everything measured at one size.
struct SizeRun {
    ratings: u64,
    stages: Vec<Stage>,
    rounds: Vec<Json>,
    spark: Option<Json>,
    serve: Option<Serve>,
}

struct Serve {
    rps: f64,
    p50: String,
    p99: String,
    loaded_rss: u64,
}

/// A process's output and peaks, run with a progress line.
struct Measured {
    stdout: String,
    wall: f64,
    peaks: Vec<(String, u64)>,
    cpu: Vec<f64>,
}

/// CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count the fields after its parenthesis.
    let rest: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // utime and stime, fields 14 and 15, in clock ticks (100 per second on Linux).
    Some((rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?) / 100.0)
}

/// Runs `cmd` (the process `process`) to completion while a progress line shows its elapsed
/// time and `live` (given the output so far); samples the peak RSS of it and of the `others`.
fn run_stage(prefix: &str, name: &str, process: &str, cmd: &mut Command, others: &[(String, u32)], live: &dyn Fn(&str) -> String) -> Measured {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {prefix:.bold} {elapsed:>4} {msg}").expect("template"));
    bar.set_prefix(format!("{prefix} {name}"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let start = Instant::now();
    let mut child = Running(cmd.stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{name}: {e}")));
    let out = Arc::new(Mutex::new(String::new()));
    let reader = {
        let stdout = child.stdout.take().expect("stdout");
        let out = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                o.push_str(&line);
                o.push('\n');
            }
        })
    };
    let mut peaks: Vec<(String, u64)> = std::iter::once((process.to_string(), 0)).chain(others.iter().map(|(n, _)| (n.clone(), 0))).collect();
    let pids: Vec<u32> = std::iter::once(child.id()).chain(others.iter().map(|o| o.1)).collect();
    // The other processes were running before the stage: count only what they spend in it.
    let cpu_before: Vec<f64> = std::iter::once(0.0).chain(others.iter().map(|o| cpu_seconds(o.1).unwrap_or(0.0))).collect();
    let mut cpu = vec![0.0; pids.len()];
    let mut last_live = Instant::now() - Duration::from_secs(10);
    let status = loop {
        for (i, pid) in pids.iter().enumerate() {
            peaks[i].1 = peaks[i].1.max(proc_memory(*pid, "VmHWM").unwrap_or(0));
            cpu[i] = cpu_seconds(*pid).map(|c| c - cpu_before[i]).unwrap_or(cpu[i]);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if last_live.elapsed() >= Duration::from_secs(1) {
            let so_far = out.lock().unwrap_or_else(|p| p.into_inner()).clone();
            bar.set_message(live(&so_far));
            last_live = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall = start.elapsed().as_secs_f64();
    let _ = reader.join();
    let stdout = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
    assert!(status.success(), "{name} failed ({status}): {cmd:?}\n{stdout}");
    let done = format!("{wall:.1} s, peak {}", peaks.iter().map(|(n, b)| format!("{n} {:.0} MiB", mib(*b))).collect::<Vec<_>>().join(", "));
    if bar.is_hidden() {
        // Not a terminal (a log file): one line per stage instead of the progress line.
        eprintln!("{prefix} {name}: {done}");
    }
    bar.finish_with_message(done);
    Measured { stdout, wall, peaks, cpu }
}

/// The last line of a command's output as JSON (the `--json` summaries).
fn last_json(out: &str) -> Json {
    let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON summary in:\n{out}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn number(v: &Json, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

fn round_rows(round: &Json) -> f64 {
    number(round, "train_rows") + number(round, "test_rows")
}

/// Runs one size end to end.
fn run_size(args: &Args, root: &Path, n: u64) -> SizeRun {
    let dir = root.join(format!("ratings-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work folder");
    let prefix = format!("[{}]", human(n));
    let mut stages = vec![];
    let csv = dir.join("ratings.csv");

    let m = run_stage(&prefix, "generate", "generator", lensflow(["generate", "--ratings", &n.to_string(), "--out"]).arg(&csv), &[], &|_| String::new());
    let csv_bytes = std::fs::metadata(&csv).map(|m| m.len()).unwrap_or(0);
    stages.push(Stage {
        name: "generate",
        wall: m.wall,
        throughput: Some((n as f64 / m.wall, "ratings/s")),
        peaks: m.peaks,
        cpu: m.cpu,
        disk: Some(("CSV", csv_bytes, 1)),
    });

    let broker = Broker::start();
    let tansu = vec![("tansu".to_string(), broker.pid())];
    let topic = "ratings";
    let live_topic = |_: &str| format!("{} messages in the topic", broker.messages(topic));
    let m = run_stage(
        &prefix,
        "produce",
        "producer",
        lensflow(["produce", "--brokers", &broker.addr(), "--topic", topic, "--partitions", &args.partitions.to_string(), "--json", "--input"]).arg(&csv),
        &tansu,
        &live_topic,
    );
    let produced = last_json(&m.stdout);
    assert_eq!(produced["delivered"].as_u64(), Some(n), "produce delivered fewer than {n}: {produced}");
    stages.push(Stage {
        name: "produce",
        wall: m.wall,
        throughput: Some((n as f64 / m.wall, "msg/s")),
        peaks: m.peaks,
        cpu: m.cpu,
        disk: Some(("broker storage", broker.disk_bytes(), 1)),
    });

    let lake_dir = dir.join("lake");
    let lake = format!("file://{}", lake_dir.display());
    let metrics = free_port();
    let batch_rows = n.div_ceil(args.batches).to_string();
    let m = run_stage(
        &prefix,
        "consume",
        "consumer",
        lensflow(["consume", "--brokers", &broker.addr(), "--topic", topic, "--all-partitions", "--lake", &lake, "--until-end", "--json"]).args([
            "--batch-rows",
            &batch_rows,
            "--batch-interval",
            "1h",
            "--max-skew",
            &args.max_skew,
            "--metrics-bind",
            &format!("127.0.0.1:{metrics}"),
        ]),
        &tansu,
        &|_| format!("{:.0} events landed", metric(metrics, "lensflow_consumer_events_landed_total").unwrap_or(0.0)),
    );
    let consumed = last_json(&m.stdout);
    assert_eq!(consumed["rows"].as_u64(), Some(n), "the lake holds other than {n} events: {consumed}");
    let (lake_bytes, lake_files) = disk_usage(&lake_dir);
    stages.push(Stage {
        name: "consume",
        wall: m.wall,
        throughput: Some((n as f64 / m.wall, "msg/s")),
        peaks: m.peaks,
        cpu: m.cpu,
        disk: Some(("lake", lake_bytes, lake_files)),
    });
    drop(broker);
    std::fs::remove_file(&csv).expect("remove the CSV");

    let cluster = Cluster::start(&dir, args.executors);
    let cluster_procs: Vec<(String, u32)> = std::iter::once(("scheduler".to_string(), cluster.scheduler.id()))
        .chain(cluster.executors.iter().enumerate().map(|(i, e)| (format!("executor {}", i + 1), e.id())))
        .collect();
    let models = dir.join("models");
    let batches = args.batches;
    let m = run_stage(
        &prefix,
        "train",
        "trainer",
        lensflow(["train", "--lake", &lake, "--scheduler", &cluster.url(), "--json", "--metrics-bind", &format!("127.0.0.1:{}", free_port()), "--models"])
            .arg(&models)
            .args(args.window.iter().flat_map(|w| ["--window".to_string(), w.to_string()]))
            .envs(std::env::var("LENSFLOW_BENCH_LOG").map(|log| ("LENSFLOW_LOG", log))),
        &cluster_procs,
        &|out| format!("round {} of {batches} done", out.lines().filter(|l| l.starts_with('{')).count()),
    );
    drop(cluster);
    let rounds: Vec<Json> = m.stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("round JSON")).collect();
    let (model_bytes, model_files) = disk_usage(&models);
    let trained: f64 = rounds.iter().map(round_rows).sum();
    stages.push(Stage {
        name: "train (every round)",
        wall: m.wall,
        throughput: Some((trained / m.wall, "rows/s over all rounds")),
        peaks: m.peaks,
        cpu: m.cpu,
        disk: Some(("models", model_bytes, model_files)),
    });

    let spark = (!args.no_spark).then(|| {
        let out = dir.join("spark.json");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let events = format!("{}/movielens/events/*.parquet", lake_dir.display());
        let m = run_stage(
            &prefix,
            "spark round",
            "python",
            Command::new("python3")
                .arg(repo.join("benches/spark/round.py"))
                .arg("--pipeline")
                .arg(repo.join("pipelines/movielens"))
                .args(["--events", &events, "--master", "local[2]", "--driver-memory", &args.spark_driver_memory, "--out"])
                .arg(&out)
                .stderr(std::fs::File::create(dir.join("spark.log")).expect("spark log")),
            &[],
            &|_| String::new(),
        );
        let report: Json = serde_json::from_slice(&std::fs::read(&out).expect("spark report")).expect("spark JSON");
        // Python returns before the JVM it started has let go of its heap (seconds, at 8 GiB);
        // the serving load must not share the cores with that.
        if let Some(jvm) = report["memory"]["jvm_pid"].as_u64() {
            wait_until(Duration::from_secs(120), "Spark's JVM to exit", || !Path::new(&format!("/proc/{jvm}")).exists());
        }
        let jvm = (report["memory"]["jvm_peak_rss_mib"].as_f64().unwrap_or(0.0) * 1048576.0) as u64;
        let peaks = vec![("Spark JVM".to_string(), jvm), ("python".to_string(), m.peaks[0].1)];
        stages.push(Stage {
            name: "spark round (last round's data)",
            wall: m.wall,
            throughput: Some((n as f64 / m.wall, "rows/s")),
            peaks,
            cpu: vec![],
            disk: None,
        });
        report
    });

    let serve = serve(args, &dir, &models, rounds.len() as u64, n, &prefix, &mut stages);
    std::fs::remove_dir_all(&dir).expect("remove the size's data");
    SizeRun { ratings: n, stages, rounds, spark, serve: Some(serve) }
}

/// Serves the last round and loads `/predict` with wrk (64 connections, single requests).
fn serve(args: &Args, dir: &Path, models: &Path, round: u64, n: u64, prefix: &str, stages: &mut Vec<Stage>) -> Serve {
    let server = Server::start(models, &[]);
    server.wait_round(round, Duration::from_secs(120));
    let pid = server.child.id();
    let loaded_rss = proc_memory(pid, "VmRSS").unwrap_or(0);
    let lua = dir.join("predict.lua");
    let (users, movies) = (n / 150, (n / 11).min(30_000));
    let item = format!("string.format('{{\"userId\":%d,\"movieId\":%d}}', math.random(1, {users}), math.random(1, {movies}))");
    std::fs::write(&lua, wrk_script("/predict", 1, &item)).expect("wrk script");
    // The earlier stages left gigabytes of dirty pages (models, Spark's spills): written back
    // during the load, they would be measured as the server's tail latency. A short unreported
    // load first, as any load test warms up.
    run_ok(&mut Command::new("sync"));
    run_ok(Command::new("wrk").args(["-t2", "-c64", "-d2s", "-s"]).arg(&lua).arg(server.url("")));
    let seconds = args.serve_seconds.to_string();
    let m = run_stage(
        prefix,
        "serve load",
        "wrk",
        Command::new("wrk").args(["-t2", "-c64", "-d", &format!("{seconds}s"), "--latency", "-s"]).arg(&lua).arg(server.url("")),
        &[("lensflow serve".to_string(), pid)],
        &|_| String::new(),
    );
    assert!(!m.stdout.contains("Non-2xx") && !m.stdout.contains("Socket errors"), "failed requests under load:\n{}", m.stdout);
    let rps: f64 = wrk_field(&m.stdout, "Requests/sec:").parse().unwrap_or(0.0);
    // wrk's own memory is not lensflow's: only the server's peak is kept.
    stages.push(Stage {
        name: "serve (/predict, 64 connections)",
        wall: m.wall,
        throughput: Some((rps, "req/s")),
        peaks: m.peaks[1..].to_vec(),
        cpu: m.cpu[1..].to_vec(),
        disk: None,
    });
    Serve { rps, p50: wrk_field(&m.stdout, "50%").into(), p99: wrk_field(&m.stdout, "99%").into(), loaded_rss }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 100_000 == 0 => format!("{}M", n as f64 / 1e6),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// The machine, for the report's reader.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())).unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = proc_meminfo("MemTotal");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd).arg(arg).output().ok().map(|o| {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().next().unwrap_or("").trim().to_string()
        })
    };
    format!(
        "{cores} cores ({model}), {:.1} GiB RAM, Linux {}, one local disk; tansu `{}`; `{}`; pyspark {}",
        mem as f64 / 1073741824.0,
        kernel.trim(),
        version("tansu", "--version").unwrap_or_default(),
        version("java", "-version").unwrap_or_default(),
        Command::new("python3")
            .args(["-c", "import pyspark; print(pyspark.__version__)"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    )
}

fn proc_meminfo(key: &str) -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines().find_map(|l| l.strip_prefix(key)?.trim_start_matches(':').split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// The peak of the process named `name` in `stage` of `run`.
fn peak(run: &SizeRun, stage: &str, name: &str) -> u64 {
    run.stages.iter().filter(|s| s.name.starts_with(stage)).flat_map(|s| &s.peaks).filter(|p| p.0 == name).map(|p| p.1).max().unwrap_or(0)
}

/// Sum of the training cluster's peaks (trainer, scheduler, executors).
fn cluster_peak(run: &SizeRun) -> u64 {
    run.stages.iter().filter(|s| s.name.starts_with("train")).flat_map(|s| &s.peaks).map(|p| p.1).sum()
}

/// lensflow's stages that Spark's round also does (round.py's docs: everything but the lookup
/// tables and the serving check), of the last round.
fn comparable_seconds(round: &Json) -> f64 {
    let s = &round["seconds"];
    ["features", "regression", "classification", "evaluate", "segments"].iter().filter_map(|k| s[*k].as_f64()).sum()
}

fn report(args: &Args, runs: &[SizeRun], machine: &str) -> String {
    let sizes: Vec<String> = runs.iter().map(|r| human(r.ratings)).collect();
    let mut md = String::new();
    let _ = writeln!(md, "# lensflow at {}: the whole pipeline, beside Spark\n", sizes.join(", "));
    let _ = writeln!(
        md,
        "Measured by `cargo bench --bench growth -- --ratings {} --batches {} --executors {}{}`.\n",
        sizes.join(","),
        args.batches,
        args.executors,
        if args.no_spark { " --no-spark" } else { "" }.to_string()
            + &args.window.map(|w| format!(" --window {w}")).unwrap_or_default()
            + &if args.max_skew == "0" { String::new() } else { format!(" --max-skew {}", args.max_skew) }
    );
    let _ = writeln!(md, "Machine: {machine}.\n");
    let _ = writeln!(
        md,
        "Each size: generated MovieLens-like ratings (users = N/150, movies = N/11 up to 30,000) → `lensflow produce` into tansu (sqlite storage, {} partitions) → `lensflow consume` into a file lake in {} batches (partitions aligned in event time unless `--max-skew off`) → `lensflow train` of all {} rounds on a scheduler and {} executors (separate processes) → the last round's data on pyspark `local[2]` (driver heap {}) → `lensflow serve` under wrk (64 connections, after `sync`, Spark's JVM gone and a 2 s unreported warm-up). Every stage is its own process; peak RSS is VmHWM from /proc.\n",
        args.partitions, args.batches, args.batches, args.executors, args.spark_driver_memory
    );

    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "| ratings | pipeline s (generate→serve) | produce msg/s | consume msg/s | all rounds s | last round s | Spark round s | Spark ÷ lensflow time | trainer peak MiB | cluster peak MiB (trainer + scheduler + executors) | Spark JVM peak MiB | Spark ÷ lensflow memory | /predict req/s (p99) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let wall: f64 = r.stages.iter().filter(|s| !s.name.starts_with("spark")).map(|s| s.wall).sum();
        let tp = |name: &str| r.stages.iter().find(|s| s.name.starts_with(name)).and_then(|s| s.throughput).map(|t| format!("{:.0}", t.0)).unwrap_or_default();
        let train = r.stages.iter().find(|s| s.name.starts_with("train")).map(|s| s.wall).unwrap_or(0.0);
        let last = r.rounds.last().map(round_seconds).unwrap_or(0.0);
        let (spark_s, spark_mem, spark_cell, spark_mem_cell) = match &r.spark {
            Some(s) => {
                let (t, m) = (s["total_seconds"].as_f64().unwrap_or(0.0), s["memory"]["jvm_peak_rss_mib"].as_f64().unwrap_or(0.0));
                (t, m, format!("{t:.1}"), format!("{m:.0}"))
            }
            // A run without Spark (`--no-spark`) shows dashes, not zeros.
            None => (0.0, 0.0, "-".to_string(), "-".to_string()),
        };
        let cluster = mib(cluster_peak(r));
        let ratio = |a: f64, b: f64| if a > 0.0 && b > 0.0 { format!("{:.1}×", a / b) } else { "-".into() };
        let _ = writeln!(
            md,
            "| {} | {wall:.0} | {} | {} | {train:.0} | {last:.1} | {spark_cell} | {} | {:.0} | {cluster:.0} | {spark_mem_cell} | {} | {} |",
            human(r.ratings),
            tp("produce"),
            tp("consume"),
            ratio(spark_s, r.rounds.last().map(comparable_seconds).unwrap_or(0.0)),
            mib(peak(r, "train", "trainer")),
            ratio(spark_mem, cluster),
            r.serve.as_ref().map(|s| format!("{:.0} ({})", s.rps, s.p99)).unwrap_or_default()
        );
    }
    let _ = writeln!(
        md,
        "\n\"Spark ÷ lensflow time\" compares Spark's round with the same stages of lensflow's last round (features, the three models, evaluation and segments: lookup tables and the serving check have no Spark counterpart); memory compares Spark's one JVM with the sum of lensflow's trainer, scheduler and executors.\n"
    );

    if runs.len() >= 2 {
        let _ = writeln!(md, "## Growth: time ∝ N^k\n");
        let _ = writeln!(md, "k from least squares of ln(wall) on ln(N) over {}; k = 1 is linear.\n", sizes.join(", "));
        let _ = writeln!(md, "| stage | {} | k |", sizes.iter().map(|s| format!("{s} s")).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(md, "|---|{}---|", "---|".repeat(runs.len()));
        let names: Vec<&str> = runs[0].stages.iter().map(|s| s.name).filter(|n| !n.starts_with("serve")).collect();
        let mut rows: Vec<(String, Vec<f64>)> = names
            .iter()
            .map(|name| (name.to_string(), runs.iter().map(|r| r.stages.iter().find(|s| s.name == *name).map(|s| s.wall).unwrap_or(0.0)).collect()))
            .collect();
        rows.push(("last round".into(), runs.iter().map(|r| r.rounds.last().map(round_seconds).unwrap_or(0.0)).collect()));
        rows.push(("trainer peak RSS".into(), runs.iter().map(|r| mib(peak(r, "train", "trainer"))).collect()));
        rows.push(("cluster peak RSS".into(), runs.iter().map(|r| mib(cluster_peak(r))).collect()));
        for (name, values) in rows {
            let xy: Vec<(f64, f64)> = runs.iter().zip(&values).filter(|(_, v)| **v > 0.0).map(|(r, v)| ((r.ratings as f64).ln(), v.ln())).collect();
            let k = if xy.len() >= 2 { format!("{:.2}", slope(&xy)) } else { "-".into() };
            let unit = if name.contains("RSS") { " MiB" } else { "" };
            let _ = writeln!(md, "| {name}{unit} | {} | {k} |", values.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" | "));
        }
        let _ = writeln!(md);
    }

    for r in runs {
        let _ = writeln!(md, "## {} ratings\n", human(r.ratings));
        let _ = writeln!(md, "| stage | wall s | throughput | peak RSS (MiB) | CPU s in the stage | on disk |");
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for s in &r.stages {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {} | {} | {} | {} |",
                s.name,
                s.wall,
                s.throughput.map(|(v, unit)| format!("{v:.0} {unit}")).unwrap_or_default(),
                s.peaks.iter().map(|(n, b)| format!("{n} {:.0}", mib(*b))).collect::<Vec<_>>().join(", "),
                s.peaks.iter().zip(&s.cpu).map(|((n, _), c)| format!("{n} {c:.1}")).collect::<Vec<_>>().join(", "),
                s.disk.map(|(what, bytes, files)| format!("{what}: {:.1} MiB in {files} files", mib(bytes))).unwrap_or_default()
            );
        }
        if let Some(s) = &r.serve {
            let _ = writeln!(
                md,
                "\n`/predict`: {:.0} requests/s, p50 {}, p99 {}; server RSS {:.0} MiB once the round was loaded.",
                s.rps,
                s.p50,
                s.p99,
                mib(s.loaded_rss)
            );
        }
        if !r.rounds.is_empty() {
            let stages: Vec<String> = r.rounds[0]["seconds"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
            let _ = writeln!(
                md,
                "\n| round | rows | state rows computed (new + late-changed) | {} | total s | RMSE | AUC | accuracy |",
                stages.join(" s | ") + " s"
            );
            let _ = writeln!(md, "|---|---|---|{}---|---|---|---|", "---|".repeat(stages.len()));
            for round in &r.rounds {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {:.2} | {:.4} | {:.4} | {:.4} |",
                    round["round"],
                    round_rows(round),
                    match round["state"]["mode"].as_str() {
                        Some("incremental") => format!("{} + {}", round["state"]["new_events"], round["state"]["recomputed"]),
                        Some(_) => format!("all {} ({})", round["state"]["rows"], round["state"]["reason"].as_str().unwrap_or("")),
                        None => "-".into(),
                    },
                    stages.iter().map(|s| format!("{:.2}", round["seconds"][s].as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(" | "),
                    round_seconds(round),
                    round["rmse"].as_f64().unwrap_or(f64::NAN),
                    round["auc"].as_f64().unwrap_or(f64::NAN),
                    round["accuracy"].as_f64().unwrap_or(f64::NAN)
                );
            }
            if r.rounds.len() >= 3 {
                let by_round: Vec<(f64, f64)> = r.rounds.iter().enumerate().map(|(i, x)| (i as f64 + 1.0, round_seconds(x))).collect();
                let by_rows: Vec<(f64, f64)> = r.rounds.iter().map(|x| (number(x, "events"), round_seconds(x))).collect();
                let _ = writeln!(md, "\nRound time slope: {:.3} s per round, {:.3} s per 100k events in the lake.", slope(&by_round), slope(&by_rows) * 1e5);
                // With --window, rounds grow until the window is full: the steady slope is from
                // the round after it. What late events recompute follows the partitions' skew,
                // not the lake, so the slope is also given with it held fixed.
                if let Some(w) = args.window.map(|w| w as usize).filter(|w| r.rounds.len() >= w + 3) {
                    let steady = &r.rounds[w..];
                    let rows: Vec<(f64, f64)> = steady.iter().map(|x| (number(x, "events"), round_seconds(x))).collect();
                    let recomputed: Vec<f64> = steady.iter().map(|x| number(&x["state"], "recomputed")).collect();
                    let (per_event, per_recomputed) = slopes(&rows, &recomputed);
                    let _ = writeln!(
                        md,
                        "From round {} (a full window): {:.3} s per 100k events in the lake; with the stored rows late events recompute held fixed, {:.3} s per 100k events in the lake and {:.2} s per 100k recomputed rows (those went from {:.0} to {:.0} per round, first to last third).",
                        w + 1,
                        slope(&rows) * 1e5,
                        per_event * 1e5,
                        per_recomputed * 1e5,
                        mean(&recomputed[..recomputed.len() / 3]),
                        mean(&recomputed[recomputed.len() - recomputed.len() / 3..]),
                    );
                }
                for stage in &stages {
                    let xy: Vec<(f64, f64)> = r.rounds.iter().map(|x| (number(x, "events"), x["seconds"][stage].as_f64().unwrap_or(0.0))).collect();
                    let _ = write!(md, "{}{stage} {:.3}", if stage == &stages[0] { "Per stage, s per 100k events: " } else { ", " }, slope(&xy) * 1e5);
                }
                let _ = writeln!(md, ".");
            }
        }
        if let Some(s) = &r.spark {
            let _ = writeln!(
                md,
                "\nSpark, same events (the last round's), stage seconds: {}; total {:.1} s; RMSE {:.4}, AUC {:.4}, accuracy {:.4}.",
                s["seconds"],
                s["total_seconds"].as_f64().unwrap_or(0.0),
                s["metrics"]["rmse"].as_f64().unwrap_or(f64::NAN),
                s["metrics"]["auc"].as_f64().unwrap_or(f64::NAN),
                s["metrics"]["accuracy"].as_f64().unwrap_or(f64::NAN)
            );
        }
        let _ = writeln!(md);
    }
    md
}

fn main() {
    let args = Args::parse();
    assert!(args.batches >= 1, "--batches must be at least 1");
    assert!(args.window.is_none() || args.no_spark, "--window fits on the newest batches, Spark's round on every batch: add --no-spark");
    let temp = tempfile::tempdir().expect("temporary folder");
    let root = args.work_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let machine = machine();
    let mut runs = vec![];
    for &n in &args.ratings {
        runs.push(run_size(&args, &root, n));
        let md = report(&args, &runs, &machine);
        if let Some(out) = &args.out {
            std::fs::write(out, &md).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        }
        if runs.len() == args.ratings.len() {
            println!("\n{md}");
        }
    }
}

/// Least squares of y on x and z together: the slopes on x and on z.
fn slopes(xy: &[(f64, f64)], z: &[f64]) -> (f64, f64) {
    let n = xy.len() as f64;
    let (mx, my, mz) = (xy.iter().map(|p| p.0).sum::<f64>() / n, xy.iter().map(|p| p.1).sum::<f64>() / n, z.iter().sum::<f64>() / n);
    let (mut sxx, mut szz, mut sxz, mut sxy, mut szy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for ((x, y), z) in xy.iter().zip(z) {
        let (x, y, z) = (x - mx, y - my, z - mz);
        (sxx, szz, sxz, sxy, szy) = (sxx + x * x, szz + z * z, sxz + x * z, sxy + x * y, szy + z * y);
    }
    let det = sxx * szz - sxz * sxz;
    if det.abs() < f64::EPSILON {
        return (slope(xy), 0.0);
    }
    ((sxy * szz - szy * sxz) / det, (szy * sxx - sxy * sxz) / det)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
