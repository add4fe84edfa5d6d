//! Helpers for the end-to-end tests: real services started as separate processes on loopback
//! (a tansu Kafka broker on sqlite storage, a moto S3 server), the `lensflow` binary driven as a
//! user drives it, and checks over what landed in the lake.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow_array::{Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use lensflow_core::pipeline::event::{Event, Value};
use lensflow_core::pipeline::{KAFKA_OFFSET, KAFKA_PARTITION};
use lensflow_core::{Lake, Pipeline, StorageOptions};

/// Tests that start brokers and move a million messages run one at a time on this 2-core
/// machine, so that their timing-sensitive parts (session timeouts, kill points) stay meaningful.
static HEAVY: Mutex<()> = Mutex::new(());

/// Holds the heavy-test lock for the duration of a test.
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening on {port}: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port} within 60s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Finds a tool on PATH (or at the path in `env_var`), failing the test with how to install it:
/// these tests exist to talk to real services, so a missing one is a failure, never a skip.
pub fn tool(name: &str, env_var: &str, install: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_var) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home_cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(home_cargo)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found on PATH (or ${env_var}); install it with: {install} (bash .ci/run does)"))
}

/// A tansu Kafka-protocol broker on sqlite storage, killed when dropped.
pub struct Broker {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Broker::spawn(dir.path(), port);
        Broker { child, port, _dir: dir }
    }

    fn spawn(dir: &Path, port: u16) -> Child {
        let bin = tool("tansu", "TANSU_BIN", "cargo install tansu --locked --features dynostore,libsql");
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("broker.log")).unwrap();
        let mut child = Command::new(bin)
            .current_dir(dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        wait_for_port(port, "tansu", &mut child);
        child
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id (for its memory figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Bytes the broker's storage takes on disk.
    pub fn disk_bytes(&self) -> u64 {
        disk_usage(self._dir.path()).0
    }

    /// Kills the broker process abruptly.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 10 s) and starts it again on the same
    /// storage and port after `down`.
    pub fn restart(&mut self, down: Duration) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        std::thread::sleep(down);
        self.child = Broker::spawn(self._dir.path(), self.port);
    }

    /// Messages in `topic` over all its partitions (the sum of their end offsets).
    pub fn messages(&self, topic: &str) -> i64 {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", self.addr()).create().unwrap();
        let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else { return 0 };
        let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        partitions.iter().filter_map(|p| consumer.fetch_watermarks(topic, *p, Duration::from_secs(5)).ok()).map(|(_, high)| high).sum()
    }
}

/// A TCP proxy in front of a server that can be taken down and brought back: while down it
/// cuts every open connection and refuses new ones at once, as a store that went away does.
pub struct FaultProxy {
    pub port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<Mutex<Vec<TcpStream>>>,
}

impl FaultProxy {
    pub fn start(target: u16) -> FaultProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (down2, open2) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if down2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let mut conns = open2.lock().unwrap();
                conns.retain(|c: &TcpStream| c.peer_addr().is_ok());
                conns.push(client.try_clone().unwrap());
                conns.push(server.try_clone().unwrap());
                drop(conns);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        FaultProxy { port, down, open }
    }

    /// Takes the server away (cutting open connections) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            for c in self.open.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Waits until `done`, failing the test with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The round `LATEST` names in the movielens folder of the model store root `models` (0: none).
pub fn latest_round(models: &str, storage: &[(String, String)]) -> u64 {
    let store = pipeline_lake(models, "movielens", storage);
    let latest = tokio::runtime::Runtime::new().unwrap().block_on(lensflow_jobs::train::latest(&store)).unwrap();
    latest.map(|l| l.round).unwrap_or(0)
}

/// A metric's value from a Prometheus endpoint (the sum over its label sets), or None when the
/// endpoint does not answer or has no such metric.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let body = http_get(port, "/metrics")?;
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A moto S3 server with one bucket, killed when dropped.
/// The S3 test server's access key id (moto accepts any).
pub const S3_ACCESS_KEY: &str = "LFTESTKEY7Q2W";
/// The S3 test server's secret key: it must never appear in a log, an answer or a `--help`.
pub const S3_SECRET: &str = "lf-secret-93kd0Zp1x7";

pub struct S3 {
    child: Child,
    pub port: u16,
}

impl S3 {
    pub fn start(bucket: &str) -> S3 {
        let python = tool("python3", "LENSFLOW_PYTHON", "your distribution's python3");
        let port = free_port();
        let mut child = Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        wait_for_port(port, "moto_server (pip install 'moto[server]')", &mut child);
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(conn, "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "create bucket: {answer}");
        S3 { child, port }
    }

    /// The `AWS_*` settings a client needs to reach this server. The key and secret are words
    /// no log line has by chance, so a test can look for them.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when dropped, so that a failing test leaves nothing running.
pub struct Running(pub Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `lensflow` binary, as a user would run it.
pub fn lensflow<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lensflow"));
    cmd.args(args).env("LENSFLOW_LOG", "warn");
    cmd
}

/// A memory figure of a running process from /proc, in bytes: `VmRSS` (now) or `VmHWM` (peak).
pub fn proc_memory(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.strip_prefix(key).is_some_and(|rest| rest.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Bytes in MiB, for reports.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs a command while sampling its peak resident memory (VmHWM) from /proc; returns its
/// stdout, wall time and peak bytes. Other processes' peaks can be sampled alongside.
pub fn run_measured(cmd: &mut Command, also: &[u32]) -> (String, Duration, u64, Vec<u64>) {
    let start = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn");
    let peak_of = |pid: u32| proc_memory(pid, "VmHWM");
    let (mut peak, mut others) = (0u64, vec![0u64; also.len()]);
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let mut stdout = stdout;
        let _ = stdout.read_to_string(&mut s);
        s
    });
    loop {
        peak = peak.max(peak_of(child.id()).unwrap_or(0));
        for (o, pid) in others.iter_mut().zip(also) {
            *o = (*o).max(peak_of(*pid).unwrap_or(0));
        }
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{cmd:?} failed: {status}");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (reader.join().unwrap_or_default(), start.elapsed(), peak, others)
}

/// Runs a command to completion, failing the test (with its output) unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out: Output = cmd.output().expect("run lensflow");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{cmd:?} failed: {}\nstdout: {stdout}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Waits for a spawned command to exit, killing it and failing the test after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends SIGINT (what Ctrl-C sends) to a child.
pub fn interrupt(child: &Child) {
    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -INT failed");
}

/// Generates `n` ratings with the binary and returns the file.
pub fn generate(dir: &Path, n: u64, seed: u64) -> PathBuf {
    let out = dir.join(format!("gen-{n}-{seed}.csv"));
    run_ok(lensflow(["generate", "--ratings", &n.to_string(), "--seed", &seed.to_string(), "--out"]).arg(&out));
    out
}

/// Where the real data sets are kept, beside the repository (never inside it):
/// `$LENSFLOW_TEST_DATA`, or else `../shared/data` (the README's "Test data").
pub fn test_data_dir() -> PathBuf {
    std::env::var("LENSFLOW_TEST_DATA").map(PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

/// A real data set from [`test_data_dir`], which must be there.
pub fn test_data(file: &str) -> PathBuf {
    let path = test_data_dir().join(file);
    assert!(path.is_file(), "{} not found: put {file} there or set LENSFLOW_TEST_DATA to its folder", path.display());
    path
}

/// The real MovieLens ratings_small.csv.
pub fn ratings_small() -> PathBuf {
    test_data("ratings_small.csv")
}

/// The smart-home devices file.
pub fn smart_home_csv() -> PathBuf {
    test_data("smart_home_device_usage_data.csv")
}

/// A built-in pipeline by name.
pub fn pipeline(name: &str) -> Pipeline {
    Pipeline::builtin(name).unwrap_or_else(|| panic!("no built-in pipeline {name}")).unwrap()
}

/// The valid events of a CSV file of `pipeline_name`, in file order: split by the `csv` crate
/// (not the reader under test), typed by the pipeline's columns.
pub fn csv_events(path: &Path, pipeline_name: &str) -> Vec<Event> {
    let p = pipeline(pipeline_name);
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_path(path).unwrap();
    let layout = p.csv_layout(reader.byte_headers().unwrap().iter()).unwrap();
    reader.byte_records().filter_map(|r| p.event_from_csv(&layout, r.unwrap().iter()).ok()).collect()
}

/// The valid ratings of a MovieLens CSV file, in file order.
pub fn csv_ratings(path: &Path) -> Vec<Event> {
    csv_events(path, "movielens")
}

/// One event in the lake, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LakeRow {
    /// The Kafka partition.
    pub partition: i32,
    /// The Kafka offset.
    pub offset: i64,
    /// The event's columns, in the pipeline's order.
    pub event: Event,
}

/// The value of column `name` of an event of `p`.
pub fn value<'a>(p: &Pipeline, event: &'a Event, name: &str) -> &'a Value {
    let i = p.definition.events.columns.iter().position(|c| c.name == name).unwrap_or_else(|| panic!("no column {name}"));
    &event.0[i]
}

/// An integer value (panics on another type: a test's expectation).
pub fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => panic!("{other:?} is not an integer"),
    }
}

fn rows_of(p: &Pipeline, batch: &RecordBatch) -> Vec<LakeRow> {
    assert_eq!(batch.schema(), p.lake_schema(), "a batch file of another schema");
    let col = |name: &str| batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
    let partitions = col(KAFKA_PARTITION).as_any().downcast_ref::<Int32Array>().unwrap();
    let offsets = col(KAFKA_OFFSET).as_any().downcast_ref::<Int64Array>().unwrap();
    let columns: Vec<&dyn Array> = p.definition.events.columns.iter().map(|c| col(&c.name).as_ref()).collect();
    (0..batch.num_rows())
        .map(|i| {
            let values = columns
                .iter()
                .map(|a| {
                    assert!(a.is_valid(i), "a null in the lake");
                    if let Some(a) = a.as_any().downcast_ref::<Int64Array>() {
                        Value::Int(a.value(i))
                    } else if let Some(a) = a.as_any().downcast_ref::<Float64Array>() {
                        Value::Float(a.value(i))
                    } else if let Some(a) = a.as_any().downcast_ref::<StringArray>() {
                        Value::Text(a.value(i).to_string())
                    } else {
                        panic!("unexpected column type {:?}", a.data_type())
                    }
                })
                .collect();
            LakeRow { partition: partitions.value(i), offset: offsets.value(i), event: Event(values) }
        })
        .collect()
}

/// The lake of pipeline `pipeline_name` inside the lake root `url`.
pub fn pipeline_lake(url: &str, pipeline_name: &str, storage: &[(String, String)]) -> Lake {
    Lake::open(url, &StorageOptions(storage.to_vec())).unwrap().child(pipeline_name)
}

/// Every event the manifests of `pipeline_name`'s lake commit, read back through the library's
/// own reader.
pub fn lake_rows_of(url: &str, pipeline_name: &str, storage: &[(String, String)]) -> Vec<LakeRow> {
    let p = pipeline(pipeline_name);
    let lake = pipeline_lake(url, pipeline_name, storage);
    let batches = tokio::runtime::Runtime::new().unwrap().block_on(lake.read_all()).unwrap();
    batches.iter().flat_map(|b| rows_of(&p, b)).collect()
}

/// Every rating the MovieLens lake inside the lake root `url` commits.
pub fn lake_rows(url: &str, storage: &[(String, String)]) -> Vec<LakeRow> {
    lake_rows_of(url, "movielens", storage)
}

/// The committed batch manifests of `pipeline_name`'s lake, in order.
pub fn lake_manifests_of(url: &str, pipeline_name: &str, storage: &[(String, String)]) -> Vec<lensflow_core::BatchManifest> {
    let lake = pipeline_lake(url, pipeline_name, storage);
    tokio::runtime::Runtime::new().unwrap().block_on(lake.manifests()).unwrap()
}

/// The MovieLens lake's committed batch manifests, in order.
pub fn lake_manifests(url: &str, storage: &[(String, String)]) -> Vec<lensflow_core::BatchManifest> {
    lake_manifests_of(url, "movielens", storage)
}

/// Number of batches committed in the MovieLens lake.
pub fn lake_batches(url: &str, storage: &[(String, String)]) -> usize {
    lake_manifests(url, storage).len()
}

/// An event as one sortable string: compares values exactly (floats by their bits).
fn sort_key(e: &Event) -> String {
    let parts: Vec<String> =
        e.0.iter()
            .map(|v| match v {
                Value::Int(i) => format!("i{i}"),
                Value::Float(f) => format!("f{:016x}", f.to_bits()),
                Value::Text(t) => format!("t{t}"),
            })
            .collect();
    parts.join("\u{1f}")
}

/// Asserts that the lake holds each expected event exactly once: the same multiset of events,
/// every (partition, offset) once, and per partition the offsets `0..n` without a hole.
pub fn assert_exactly_once(rows: &[LakeRow], expected: &[Event]) {
    let mut seen = HashSet::new();
    let dupes: Vec<_> = rows.iter().filter(|r| !seen.insert((r.partition, r.offset))).take(5).collect();
    assert!(dupes.is_empty(), "duplicated (partition, offset): {dupes:?}");
    let mut per_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in rows {
        per_partition.entry(r.partition).or_default().push(r.offset);
    }
    for (p, offsets) in &mut per_partition {
        offsets.sort_unstable();
        let holes = offsets.iter().enumerate().find(|(i, o)| **o != *i as i64);
        assert!(holes.is_none(), "partition {p}: offset {:?} is missing", holes.map(|(i, _)| i));
    }
    assert_eq!(rows.len(), expected.len(), "lake holds {} events, expected {}", rows.len(), expected.len());
    let mut got: Vec<_> = rows.iter().map(|r| sort_key(&r.event)).collect();
    let mut want: Vec<_> = expected.iter().map(sort_key).collect();
    got.sort_unstable();
    want.sort_unstable();
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("lake content differs from the CSV at sorted row {i}:\n lake: {}\n  csv: {}", got[i], want[i]);
    }
}

/// A scheduler and executors as separate `lensflow` processes on loopback.
pub struct Cluster {
    pub scheduler: Child,
    pub executors: Vec<Child>,
    pub port: u16,
}

impl Cluster {
    pub fn start(dir: &Path, executors: usize) -> Cluster {
        Cluster::start_with_env(dir, executors, &[])
    }

    /// A cluster whose processes get `env` too (e.g. the `AWS_*` settings of an S3 lake).
    pub fn start_with_env(dir: &Path, executors: usize, env: &[(String, String)]) -> Cluster {
        let port = free_port();
        let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let scheduler = lensflow(["scheduler", "--bind", &format!("127.0.0.1:{port}"), "--external-host", "127.0.0.1"])
            .env("LENSFLOW_LOG", "info")
            .envs(env.iter().cloned())
            .stderr(log("scheduler"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut scheduler = scheduler;
        wait_for_port(port, "lensflow scheduler", &mut scheduler);
        let executors = (0..executors)
            .map(|i| {
                let (flight, grpc) = (free_port(), free_port());
                lensflow(["executor", "--scheduler", &format!("127.0.0.1:{port}"), "--bind", &format!("127.0.0.1:{flight}")])
                    .args(["--grpc-port", &grpc.to_string(), "--external-host", "127.0.0.1", "--concurrent-tasks", "2"])
                    .env("LENSFLOW_LOG", "info")
                    .envs(env.iter().cloned())
                    .stderr(log(&format!("executor-{i}")))
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let cluster = Cluster { scheduler, executors, port };
        cluster.wait_ready(cluster.executors.len());
        cluster
    }

    pub fn url(&self) -> String {
        format!("df://127.0.0.1:{}", self.port)
    }

    /// Waits until the scheduler's REST API lists every executor.
    fn wait_ready(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let listed = http_get(self.port, "/api/executors").map(|b| b.matches("\"id\"").count()).unwrap_or(0);
            if listed >= n {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "only {listed} of {n} executors registered");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).ok()?;
    Some(body)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.executors.iter_mut().chain(std::iter::once(&mut self.scheduler)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Produces `input` through a real broker and consumes it into `dir/lake` in batches of
/// `batch_rows` messages; returns the lake root's URL (the events are in `<root>/movielens/`).
pub fn land(broker: &Broker, dir: &Path, input: &Path, topic: &str, batch_rows: u64) -> String {
    land_pipeline(broker, dir, input, "movielens", topic, batch_rows)
}

/// [`land`] for any pipeline (a built-in name or a folder); the events land in
/// `<root>/<pipeline name>/`.
pub fn land_pipeline(broker: &Broker, dir: &Path, input: &Path, pipeline: &str, topic: &str, batch_rows: u64) -> String {
    run_ok(lensflow(["produce", "--pipeline", pipeline, "--brokers", &broker.addr(), "--topic", topic, "--input"]).arg(input));
    let lake = format!("file://{}", dir.join("lake").display());
    let rows = batch_rows.to_string();
    run_ok(&mut lensflow([
        "consume",
        "--pipeline",
        pipeline,
        "--brokers",
        &broker.addr(),
        "--topic",
        topic,
        "--group",
        "g",
        "--lake",
        &lake,
        "--batch-rows",
        &rows,
        "--exit-when-idle",
        "5s",
    ]));
    lake
}

pub fn train_json(lake: &str, models: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = run_ok(lensflow(["train", "--lake", lake, "--json", "--models"]).arg(models).args(extra));
    out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

/// `lensflow serve` on a free port, killed when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    /// Starts the API over `models` and waits until it answers `/healthz`.
    pub fn start(models: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(models.as_os_str(), extra, &[])
    }

    /// Starts the API over the model store at `models` (a path or URL), with `env` set.
    pub fn start_with_env(models: &std::ffi::OsStr, extra: &[&str], env: &[(String, String)]) -> Server {
        Server::start_logged(models, extra, env, Stdio::inherit())
    }

    /// As [`Server::start_with_env`], its log going to `log`.
    pub fn start_logged(models: &std::ffi::OsStr, extra: &[&str], env: &[(String, String)], log: impl Into<Stdio>) -> Server {
        let port = free_port();
        let bind = format!("127.0.0.1:{port}");
        let mut child = lensflow(["serve", "--bind", &bind, "--models"])
            .arg(models)
            .args(extra)
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lensflow serve");
        wait_for_port(port, "lensflow serve", &mut child);
        Server { child, port }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until the server serves `round` of its only pipeline (per `/readyz`).
    pub fn wait_round(&self, round: u64, limit: Duration) {
        self.wait_ready(&format!("ready: round {round}"), limit);
    }

    /// Waits until `/readyz` says exactly `want` (`ready: round 2, smart-home round 3`).
    pub fn wait_ready(&self, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = reqwest::blocking::get(self.url("/readyz")).and_then(|r| r.text()).unwrap_or_default();
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "not `{want}` within {limit:?}: {got}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lands the MovieLens CSV in the lake root `url` as `batches` batches of one partition,
/// straight through the library (for benchmarks of what comes after ingest).
pub fn build_lake(csv: &std::path::Path, url: &str, batches: usize) {
    build_lake_of(csv, url, "movielens", batches)
}

/// [`build_lake`] for any built-in pipeline.
pub fn build_lake_of(csv: &std::path::Path, url: &str, pipeline_name: &str, batches: usize) {
    build_lake_in_partitions(csv, url, pipeline_name, batches, 1)
}

/// [`build_lake_of`] with the events keyed into `partitions` partitions (by the pipeline's key,
/// as `produce` does), each batch taking an uneven share of each partition's next events, as a
/// consumer of a backlog does: with more than one partition, batches hold events older than
/// those of earlier batches (late events).
pub fn build_lake_in_partitions(csv: &std::path::Path, url: &str, pipeline_name: &str, batches: usize, partitions: usize) {
    let p = pipeline(pipeline_name);
    let events = csv_events(csv, pipeline_name);
    let lake = pipeline_lake(url, pipeline_name, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut offsets = lensflow_jobs::consume::offsets::LakeOffsets::new(p.topic());
    let mut queues: Vec<Vec<&Event>> = vec![Vec::new(); partitions];
    for e in &events {
        let key = p.event_key(e);
        let hash = key.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        queues[hash % partitions].push(e);
    }
    let per = events.len().div_ceil(batches);
    let mut next = vec![0usize; partitions];
    for b in 0..batches {
        // Each partition's share of the batch swings between 0.4 and 1.6 of an even one, out
        // of step with the others.
        let weights: Vec<f64> = (0..partitions).map(|q| 1.0 + 0.6 * ((b as f64 / 3.0) + q as f64 * 1.7).sin()).collect();
        let total: f64 = weights.iter().sum();
        let mut batch = lensflow_jobs::consume::writer::Batch::new(&p);
        for (q, queue) in queues.iter().enumerate() {
            let take = if b + 1 == batches { queue.len() - next[q] } else { ((per as f64 * weights[q] / total).round() as usize).min(queue.len() - next[q]) };
            for e in &queue[next[q]..next[q] + take] {
                batch.partition(q as i32).push_event(next[q] as i64, e);
                next[q] += 1;
            }
        }
        rt.block_on(lensflow_jobs::consume::commit::commit_batch(&lake, &mut offsets, &batch, p.topic(), "bench")).unwrap();
    }
}

/// A wrk script posting `batch` requests made by the Lua expression `item` per request to `path`.
pub fn wrk_script(path: &str, batch: usize, item: &str) -> String {
    format!(
        r#"wrk.method = "POST"
wrk.path = "{path}"
wrk.headers["Content-Type"] = "application/json"
local types = {{"Camera", "Lights", "Security System", "Smart Speaker", "Thermostat"}}
request = function()
  local items = {{}}
  for i = 1, {batch} do
    items[i] = {item}
  end
  return wrk.format(nil, nil, nil, "[" .. table.concat(items, ",") .. "]")
end
"#
    )
}

/// A figure of wrk's report by its label (`Requests/sec:`, `99%`), or `?`.
pub fn wrk_field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines().find_map(|l| l.trim().strip_prefix(label)).map(str::trim).unwrap_or("?")
}

/// Bytes and files under a folder (0, 0 when it is not there).
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return (0, 0) };
    entries.flatten().fold((0, 0), |(bytes, files), e| match e.metadata() {
        Ok(m) if m.is_dir() => {
            let (b, f) = disk_usage(&e.path());
            (bytes + b, files + f)
        }
        Ok(m) => (bytes + m.len(), files + 1),
        Err(_) => (bytes, files),
    })
}

/// A round's seconds over every stage (a `train --json` line).
pub fn round_seconds(round: &serde_json::Value) -> f64 {
    round["seconds"].as_object().map(|s| s.values().filter_map(serde_json::Value::as_f64).sum()).unwrap_or(0.0)
}

/// Least-squares slope of `y` on `x`.
pub fn slope(xy: &[(f64, f64)]) -> f64 {
    let n = xy.len() as f64;
    let (mx, my) = (xy.iter().map(|p| p.0).sum::<f64>() / n, xy.iter().map(|p| p.1).sum::<f64>() / n);
    xy.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / xy.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>()
}
