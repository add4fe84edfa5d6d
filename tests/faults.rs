//! The fault suite: one run on 127.0.0.1 of a million generated ratings through a real broker
//! (tansu on sqlite), a real S3 server (moto) behind a fault-injecting TCP proxy, a scheduler
//! with two executors, the consumer writing to an `s3://` lake, the trainer watching it and the
//! API serving its rounds, while every fault of issue 13 strikes in turn:
//!
//! 1. the producer is killed with `kill -9` a third of the way through its file, and resumed;
//! 2. the broker is stopped and started again on its storage while the resumed producer sends;
//! 3. the object store goes away for 10 s while the consumer writes batches;
//! 4. the broker is stopped and started again while the consumer reads;
//! 5. the trainer is killed with `kill -9` in the middle of its first round;
//! 6. the object store goes away while a round is being written, until the round fails;
//! 7. the object store goes away for good: the consumer gives up with a clear error, and a
//!    restart after the store is back lands what it could not.
//!
//! Then: every rating is in the lake exactly once, every round's lineage matches the lake's
//! manifests, and the API answered every request throughout, never with a 5xx, never from a
//! round that was not completely published. The consumer's and trainer's metrics show each
//! fault as it happened.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lensflow_core::model::ModelArtifact;
use lensflow_core::{BatchManifest, OffsetRange};

const BUCKET: &str = "lensflow";
const LAKE: &str = "s3://lensflow/lake";
const MODELS: &str = "s3://lensflow/models";
const TOPIC: &str = "ratings";

fn spawn(args: &[&str], env: &[(String, String)], log: &Path) -> Running {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Running(lensflow(args).env("LENSFLOW_LOG", "info").envs(env.iter().cloned()).stdout(Stdio::piped()).stderr(log).spawn().unwrap())
}

fn log_count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches(needle).count()
}

/// The round the model store's `LATEST` names, read past the proxy (0: none).
fn latest_round(s3: &S3) -> u64 {
    common::latest_round(MODELS, &s3.env())
}

/// Writes the header and `lines` of `csv` to `out`.
fn slice_csv(csv: &Path, out: &Path, lines: std::ops::Range<usize>) {
    let text = std::fs::read_to_string(csv).unwrap();
    let mut rows = text.lines();
    let header = rows.next().unwrap();
    let body: Vec<&str> = rows.skip(lines.start).take(lines.len()).collect();
    std::fs::write(out, format!("{header}\n{}\n", body.join("\n"))).unwrap();
}

/// What the API answered while the faults struck.
#[derive(Default)]
struct Answers {
    requests: u64,
    by_status: BTreeMap<u16, u64>,
    failures: Vec<String>,
    rounds: Vec<u64>,
}

/// Asks the API for a prediction and its status every few milliseconds until `stop`.
fn watch_api(port: u16, stop: Arc<AtomicBool>, answers: Arc<Mutex<Answers>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        while !stop.load(Ordering::SeqCst) {
            for (path, post) in [("/predict", true), ("/status", false)] {
                let request = if post {
                    client.post(format!("{base}{path}")).json(&serde_json::json!({"userId": 1, "movieId": 31}))
                } else {
                    client.get(format!("{base}{path}"))
                };
                let mut a = answers.lock().unwrap();
                a.requests += 1;
                match request.send() {
                    Ok(res) => {
                        let status = res.status().as_u16();
                        *a.by_status.entry(status).or_default() += 1;
                        let body: serde_json::Value = res.json().unwrap_or_default();
                        if status != 200 {
                            a.failures.push(format!("{path}: {status} {body}"));
                        } else if let Some(round) = body["round"].as_u64() {
                            a.rounds.push(round);
                        }
                    }
                    Err(e) => a.failures.push(format!("{path}: {e}")),
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

fn metric_or_zero(port: u16, name: &str) -> f64 {
    metric(port, name).unwrap_or(0.0)
}

#[test]
fn every_fault_in_one_run_loses_nothing_and_duplicates_nothing() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let mut broker = Broker::start();
    let s3 = S3::start(BUCKET);
    let proxy = FaultProxy::start(s3.port);
    // Everything lensflow runs reaches the store through the proxy.
    let env: Vec<(String, String)> =
        s3.env().into_iter().map(|(k, v)| if k == "AWS_ENDPOINT_URL" { (k, format!("http://127.0.0.1:{}", proxy.port)) } else { (k, v) }).collect();
    let cluster = Cluster::start_with_env(dir.path(), 2, &env);

    let all = generate(dir.path(), 1_001_000, 13);
    let [first, second, third] = ["first", "second", "third"].map(|name| dir.path().join(format!("{name}.csv")));
    slice_csv(&all, &first, 0..900_000);
    slice_csv(&all, &second, 900_000..1_000_000);
    slice_csv(&all, &third, 1_000_000..1_001_000);
    let brokers = broker.addr();
    let produce = |input: &Path, extra: &[&str]| {
        let mut args = vec!["produce", "--brokers", &brokers, "--topic", TOPIC, "--json", "--input", input.to_str().unwrap()];
        args.extend_from_slice(extra);
        spawn(&args, &env, &log("producer"))
    };

    // 1. The producer, killed a third of the way through, then resumed.
    let mut producer = produce(&first, &[]);
    wait_until(Duration::from_secs(120), "300k messages in the topic", || broker.messages(TOPIC) >= 300_000);
    producer.kill().unwrap();
    producer.wait().unwrap();
    let at_kill = broker.messages(TOPIC);
    let mut resumed = produce(&first, &["--resume"]);

    // 2. The broker stopped and started on its storage while the resumed producer sends.
    wait_until(Duration::from_secs(120), "550k messages in the topic", || broker.messages(TOPIC) >= 550_000);
    let before_restart = broker.messages(TOPIC);
    broker.restart(Duration::from_secs(3));
    let status = wait_exit(&mut resumed, Duration::from_secs(300), "resumed producer");
    let mut out = String::new();
    std::io::Read::read_to_string(resumed.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.success(), "the resumed producer failed across the broker restart: {out}\n{}", std::fs::read_to_string(log("producer")).unwrap());
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (sent, skipped, resumes) = (summary["sent"].as_u64().unwrap(), summary["skipped"].as_u64().unwrap(), summary["resumes"].as_u64().unwrap());
    assert_eq!(sent + skipped, 900_000, "{summary}");
    assert!(skipped as i64 >= at_kill, "resume skips at least what reached the topic before the kill: {summary}");
    let producer_log = std::fs::read_to_string(log("producer")).unwrap();
    let held = producer_log.lines().find(|l| l.contains("read the topic to resume")).unwrap_or_default();
    assert!(held.contains(&format!("held={at_kill}")), "the first resume found exactly the lines landed before the kill ({at_kill}): {held}");
    assert_eq!(broker.messages(TOPIC), 900_000, "the topic holds every line once");
    eprintln!(
        "producer: killed at {at_kill} messages; resumed; broker restarted at {before_restart}; {resumes} automatic resumes; last pass skipped {skipped}, sent {sent}"
    );

    // 3. The consumer, on the 900k backlog, loses the object store for 10 s.
    let consumer_metrics = free_port();
    let consumer_bind = format!("127.0.0.1:{consumer_metrics}");
    let consume_args = [
        "consume",
        "--brokers",
        &brokers,
        "--topic",
        TOPIC,
        "--lake",
        LAKE,
        "--all-partitions",
        // Few, large batches: a trainer that is behind trains every round in turn.
        "--batch-rows",
        "300000",
        "--batch-interval",
        "5s",
        "--store-retry-for",
        "20s",
        "--metrics-bind",
        &consumer_bind,
    ];
    let mut consumer = spawn(&consume_args, &env, &log("consumer"));
    let messages = || metric_or_zero(consumer_metrics, "lensflow_consumer_messages_total");
    let landed = || metric_or_zero(consumer_metrics, "lensflow_consumer_events_landed_total");
    wait_until(Duration::from_secs(120), "200k messages read", || messages() >= 200_000.0);
    proxy.set_down(true);
    std::thread::sleep(Duration::from_secs(10));
    proxy.set_down(false);
    let store_retries = metric_or_zero(consumer_metrics, "lensflow_consumer_store_retries_total");
    assert!(store_retries >= 1.0, "the consumer retried its batch through the outage");
    assert!(consumer.try_wait().unwrap().is_none(), "the consumer exited on a 10 s outage");

    // 4. The broker stopped and started while the consumer reads.
    wait_until(Duration::from_secs(120), "600k messages read", || messages() >= 600_000.0);
    broker.restart(Duration::from_secs(3));
    wait_until(Duration::from_secs(300), "900k events landed", || landed() >= 900_000.0);
    assert!(consumer.try_wait().unwrap().is_none(), "the consumer exited on a broker restart");
    wait_until(Duration::from_secs(10), "no lag once all landed", || metric(consumer_metrics, "lensflow_consumer_lag") == Some(0.0));
    eprintln!("consumer: {store_retries} store retries in the 10 s outage; broker restart at 600k read; 900k landed");

    // 5. The trainer, killed in the middle of its first round; the next one completes it.
    let train = |metrics_port: u16| {
        let bind = format!("127.0.0.1:{metrics_port}");
        let args = ["train", "--watch", "--poll-interval", "1s", "--lake", LAKE, "--models", MODELS, "--scheduler", &cluster.url(), "--metrics-bind", &bind];
        spawn(&args, &env, &log("trainer"))
    };
    let mut trainer = train(free_port());
    wait_until(Duration::from_secs(120), "the first round to start", || log_count(&log("trainer"), "training round") >= 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(log_count(&log("trainer"), "round published"), 0, "the round ended before the kill");
    trainer.kill().unwrap();
    trainer.wait().unwrap();
    assert_eq!(latest_round(&s3), 0, "LATEST was written by a killed round");
    let trainer_metrics = free_port();
    let mut trainer = train(trainer_metrics);
    wait_until(Duration::from_secs(600), "the first round after the kill", || latest_round(&s3) > 0);
    let first_round = latest_round(&s3);
    eprintln!("trainer: killed mid-round; the restarted trainer published round {first_round}");

    // The API from here on, asked continuously.
    let api = Server::start_logged(MODELS.as_ref(), &["--lake", LAKE, "--poll-interval", "500ms"], &env, std::fs::File::create(log("api")).unwrap());
    api.wait_round(first_round, Duration::from_secs(60));
    let (stop, answers) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Answers::default())));
    let poller = watch_api(api.port, stop.clone(), answers.clone());

    // 6. More ratings; the object store goes away while their round is written.
    let mut more = produce(&second, &[]);
    assert!(wait_exit(&mut more, Duration::from_secs(120), "producer of the second file").success());
    let writes = log_count(&log("trainer"), "writing the round");
    wait_until(Duration::from_secs(600), "the next round to be written", || log_count(&log("trainer"), "writing the round") > writes);
    // Down until the trainer has failed: the round fails at its next request of its own. A
    // fixed outage can pass entirely inside one cluster query, whose executors retry through
    // it, and the round then publishes as if nothing happened.
    proxy.set_down(true);
    wait_until(Duration::from_secs(300), "a failed round counted", || metric_or_zero(trainer_metrics, "lensflow_trainer_round_failures_total") >= 1.0);
    proxy.set_down(false);
    wait_until(Duration::from_secs(600), "the round after the outage", || latest_round(&s3) > first_round);
    let second_round = latest_round(&s3);
    api.wait_round(second_round, Duration::from_secs(60));
    let failures = metric_or_zero(trainer_metrics, "lensflow_trainer_round_failures_total");
    eprintln!("trainer: the store went away while a round was written; {failures} failed looks, then round {second_round} published");

    // 7. A long outage: the consumer gives up with a clear error instead of hanging.
    proxy.set_down(true);
    let mut last = produce(&third, &[]);
    assert!(wait_exit(&mut last, Duration::from_secs(120), "producer of the third file").success());
    let status = wait_exit(&mut consumer, Duration::from_secs(90), "consumer in a long outage");
    assert!(!status.success(), "the consumer ended a long outage without an error");
    let consumer_log = std::fs::read_to_string(log("consumer")).unwrap();
    assert!(consumer_log.contains("gave up committing a batch of 1000 messages"), "{consumer_log}");
    proxy.set_down(false);
    let mut again = spawn(&consume_args.iter().copied().chain(["--until-end"]).collect::<Vec<_>>(), &env, &log("consumer"));
    assert!(wait_exit(&mut again, Duration::from_secs(120), "consumer after the outage").success());
    let batches = lake_manifests_of(LAKE, "movielens", &s3.env()).len() as u64;
    wait_until(Duration::from_secs(600), "the round of every batch", || latest_round(&s3) == batches);
    api.wait_round(batches, Duration::from_secs(60));

    stop.store(true, Ordering::SeqCst);
    poller.join().unwrap();
    interrupt(&trainer);
    assert!(wait_exit(&mut trainer, Duration::from_secs(60), "trainer").success());

    // Every rating exactly once.
    let rows = lake_rows_of(LAKE, "movielens", &s3.env());
    let mut expected = csv_ratings(&first);
    expected.extend(csv_ratings(&second));
    expected.extend(csv_ratings(&third));
    assert_eq!(rows.len(), 1_001_000);
    assert_exactly_once(&rows, &expected);

    // Every round's lineage matches the manifests it names.
    let manifests = lake_manifests_of(LAKE, "movielens", &s3.env());
    let rounds = published_rounds(&s3);
    assert!(rounds.len() >= 3, "{:?}", rounds.keys());
    for (round, artifact) in &rounds {
        let used: Vec<&BatchManifest> = manifests.iter().filter(|m| m.batch <= *round).collect();
        let lineage = &artifact.lineage;
        assert_eq!(lineage.batches, used.iter().map(|m| m.batch).collect::<Vec<_>>(), "round {round}");
        assert_eq!(lineage.rows, used.iter().map(|m| m.rows).sum::<u64>(), "round {round}");
        let mut partitions: BTreeMap<i32, OffsetRange> = BTreeMap::new();
        for m in &used {
            for (p, r) in &m.partitions {
                let e = partitions.entry(*p).or_insert(*r);
                e.first = e.first.min(r.first);
                e.last = e.last.max(r.last);
            }
        }
        assert_eq!(lineage.partitions, partitions, "round {round}");
    }

    // The API answered throughout, never with a 5xx, and only from published rounds.
    let answers = answers.lock().unwrap();
    assert!(
        answers.failures.is_empty(),
        "{} of {} requests failed: {:?}",
        answers.failures.len(),
        answers.requests,
        &answers.failures[..answers.failures.len().min(5)]
    );
    assert!(answers.rounds.windows(2).all(|w| w[0] <= w[1]), "the served round went backwards");
    assert!(answers.rounds.iter().all(|r| rounds.contains_key(r)), "a round was served that was never completely published");
    eprintln!("api: {} requests, by status {:?}, rounds served {:?}", answers.requests, answers.by_status, {
        let mut r = answers.rounds.clone();
        r.dedup();
        r
    });
    drop(cluster);
}

/// Every round with a `model.json` in the model store, read past the proxy.
fn published_rounds(s3: &S3) -> BTreeMap<u64, ModelArtifact> {
    let store = pipeline_lake(MODELS, "movielens", &s3.env());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut rounds = BTreeMap::new();
        for path in store.list("").await.unwrap() {
            if path.as_ref().ends_with("/model.json") {
                let bytes = store.get(&path).await.unwrap();
                let artifact: ModelArtifact = serde_json::from_slice(&bytes).unwrap();
                rounds.insert(artifact.round, artifact);
            }
        }
        rounds
    })
}
