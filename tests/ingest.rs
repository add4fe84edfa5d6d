//! End to end: CSV → a real Kafka-protocol broker (tansu) → the lake, with the `lensflow`
//! binary as a user runs it. Exactly once through crashes, rebalances, bad input and S3, for
//! the MovieLens pipeline and the smart-home one (no time column, a string category).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lensflow_core::DeadLetter;
use lensflow_core::pipeline::event::Value;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn produce(broker: &Broker, topic: &str, input: &std::path::Path, partitions: u32) -> serde_json::Value {
    produce_pipeline(broker, "movielens", Some(topic), input, partitions)
}

/// `lensflow produce --pipeline P` (to the pipeline's own topic unless one is given).
fn produce_pipeline(broker: &Broker, pipeline: &str, topic: Option<&str>, input: &std::path::Path, partitions: u32) -> serde_json::Value {
    let mut cmd = lensflow(["produce", "--pipeline", pipeline, "--brokers", &broker.addr(), "--partitions", &partitions.to_string(), "--json"]);
    if let Some(topic) = topic {
        cmd.args(["--topic", topic]);
    }
    let out = run_ok(cmd.arg("--input").arg(input));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("summary {out:?}: {e}"))
}

fn consumer(broker: &Broker, topic: &str, group: &str, lake: &str, extra: &[&str]) -> std::process::Command {
    let mut cmd = lensflow(["consume", "--brokers", &broker.addr(), "--topic", topic, "--group", group, "--lake", lake, "--json"]);
    cmd.args(extra);
    cmd
}

/// Every dead letter in a pipeline's lake folder.
fn dead_letters(pipeline_dir: &std::path::Path) -> Vec<DeadLetter> {
    std::fs::read_dir(pipeline_dir.join("_dead_letters"))
        .unwrap()
        .flat_map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect()
}

fn lake_url(dir: &std::path::Path) -> String {
    format!("file://{}", dir.join("lake").display())
}

#[test]
fn ratings_small_round_trips_exactly() {
    let _heavy = heavy();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let input = ratings_small();
    let summary = produce(&broker, "ratings", &input, 3);
    assert_eq!(summary["delivered"], 100_004, "{summary}");
    assert_eq!(summary["rejected"], 0);

    let lake = lake_url(dir.path());
    let out = run_ok(&mut consumer(&broker, "ratings", "g1", &lake, &["--batch-rows", "40000", "--exit-when-idle", "5s"]));
    let consumed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(consumed["rows"], 100_004, "{consumed}");

    let rows = lake_rows(&lake, &[]);
    assert_exactly_once(&rows, &csv_ratings(&input));
    assert_eq!(lake_batches(&lake, &[]), 3, "40,000-message batches over 100,004 ratings");

    // The group's committed offsets follow the manifests, so Kafka tools show no lag.
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for r in &rows {
        let n = next.entry(r.partition).or_default();
        *n = (*n).max(r.offset + 1);
    }
    let kafka: BaseConsumer = ClientConfig::new().set("bootstrap.servers", broker.addr()).set("group.id", "g1").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in next.keys() {
        tpl.add_partition("ratings", *p);
    }
    let committed = kafka.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let committed: BTreeMap<i32, Offset> = committed.elements().iter().map(|e| (e.partition(), e.offset())).collect();
    drop(kafka);
    for (p, n) in next {
        assert_eq!(committed[&p], Offset::Offset(n), "group offset of partition {p}");
    }
}

#[test]
fn kill_nine_at_any_point_loses_and_duplicates_nothing() {
    let _heavy = heavy();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let input = generate(dir.path(), 1_000_000, 7);
    let summary = produce(&broker, "ratings", &input, 3);
    assert_eq!(summary["delivered"], 1_000_000, "{summary}");
    let lake = lake_url(dir.path());

    // Each run is killed a varying moment after it committed a batch, so kill points fall
    // while files are written, between files and manifest, and while polling.
    let args = ["--batch-rows", "30000", "--batch-interval", "2s"];
    let mut landed = vec![0];
    for (i, jitter_ms) in [0u64, 350, 120, 610, 40].into_iter().enumerate() {
        let mut child = consumer(&broker, "ratings", "g-kill", &lake, &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let before = *landed.last().unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        while lake_batches(&lake, &[]) <= before {
            assert!(Instant::now() < deadline, "run {i} committed nothing in 90 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(jitter_ms));
        child.kill().unwrap(); // SIGKILL: no flush, no goodbye to the group
        child.wait().unwrap();
        landed.push(lake_batches(&lake, &[]));
    }
    eprintln!("batches committed after each kill: {landed:?}");
    let partial = lake_rows(&lake, &[]).len();
    assert!(partial < 1_000_000, "kills must land mid-stream, lake held {partial}");

    run_ok(&mut consumer(&broker, "ratings", "g-kill", &lake, &["--batch-rows", "100000", "--exit-when-idle", "8s"]));
    assert_exactly_once(&lake_rows(&lake, &[]), &csv_ratings(&input));
}

#[test]
fn consumers_joining_and_leaving_split_the_work_exactly_once() {
    let _heavy = heavy();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let input = generate(dir.path(), 240_000, 11);
    let lake = lake_url(dir.path());
    // Production runs for ~20 s, so every change of membership happens mid-stream.
    let mut producer = lensflow(["produce", "--brokers", &broker.addr(), "--topic", "ratings", "--partitions", "6", "--rate", "12000", "--input"])
        .arg(&input)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let args = ["--batch-rows", "5000", "--batch-interval", "1s", "--exit-when-idle", "12s"];
    let spawn = || -> Child { consumer(&broker, "ratings", "g-split", &lake, &args).stdout(Stdio::null()).spawn().unwrap() };
    let mut a = spawn();
    let mut b = spawn();
    std::thread::sleep(Duration::from_secs(6));
    let mut c = spawn();
    std::thread::sleep(Duration::from_secs(6));
    interrupt(&a); // A leaves cleanly: it commits what it holds, then leaves the group
    assert!(wait_exit(&mut a, Duration::from_secs(60), "consumer a").success());
    assert!(wait_exit(&mut producer, Duration::from_secs(120), "producer").success());
    assert!(wait_exit(&mut b, Duration::from_secs(120), "consumer b").success());
    assert!(wait_exit(&mut c, Duration::from_secs(120), "consumer c").success());

    assert_exactly_once(&lake_rows(&lake, &[]), &csv_ratings(&input));
    let writers: BTreeSet<String> = lake_manifests(&lake, &[]).into_iter().map(|m| m.writer).collect();
    assert_eq!(writers.len(), 3, "all three consumers committed batches: {writers:?}");
}

#[test]
fn produce_exits_non_zero_when_messages_are_not_delivered() {
    let _heavy = heavy();
    let mut broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let input = generate(dir.path(), 400_000, 5);
    let mut producer = lensflow(["produce", "--brokers", &broker.addr(), "--topic", "doomed", "-X", "message.timeout.ms=4000", "--input"])
        .arg(&input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    broker.kill();
    let status = wait_exit(&mut producer, Duration::from_secs(120), "producer");
    let out = producer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "a produce that lost its broker must fail");
    assert!(stderr.contains("messages were not delivered; first failure: line "), "{stderr}");
}

#[test]
fn malformed_lines_and_messages_are_reported_and_good_data_lands() {
    let _heavy = heavy();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mixed.csv");
    std::fs::write(
        &input,
        "userId,movieId,rating,timestamp\n\
         1,31,2.5,1260759144\n\
         1,1029,3.0\n\
         1,abc,3.0,1260759179\n\
         2,10,7.0,835355493\n\
         2,17,5.0,835355681\n\
         3,60,3.3,1298861675\n\
         4,10,4.0,949810645\n",
    )
    .unwrap();
    let summary = produce(&broker, "mixed", &input, 2);
    assert_eq!((summary["delivered"].as_u64(), summary["rejected"].as_u64()), (Some(3), Some(4)), "{summary}");
    let rejects = std::fs::read_to_string(dir.path().join("mixed.csv.rejects.csv")).unwrap();
    for expected in [
        "3,\"expected 4 columns",
        "4,\"field `movieId`: expected an integer, found \"\"abc\"\"\"",
        "5,field `rating`: 7 is out of range",
        "7,field `rating`: 3.3 is out of range",
    ] {
        assert!(rejects.contains(expected), "rejects file lacks {expected:?}:\n{rejects}");
    }

    // Bad messages straight onto the topic, as a foreign producer might send them.
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", broker.addr()).create().unwrap();
    let bad: [(&str, &str, Option<&str>); 5] = [
        ("not json at all", "not a JSON object", None),
        (r#"{"movieId":1,"rating":4.0,"timestamp":1}"#, "missing field `userId`", Some("userId")),
        (r#"{"userId":5,"movieId":[1],"rating":4.0,"timestamp":1}"#, "field `movieId`: expected an integer, found an array", Some("movieId")),
        (r#"{"userId":5,"movieId":1,"rating":0.0,"timestamp":1}"#, "field `rating`: 0 is out of range", Some("rating")),
        (r#"{"userId":5,"movieId":2,"rating":4.5,"timestamp":-3}"#, "field `timestamp`: -3 is out of range", Some("timestamp")),
    ];
    for (payload, _, _) in &bad {
        producer.send(BaseRecord::<str, str>::to("mixed").payload(*payload)).unwrap();
    }
    // The seed's own producer wrote every value as a string: that is a good rating.
    let seed_format = r#"{"userId":"9","movieId":"99","rating":"4.5","timestamp":"1000"}"#;
    producer.send(BaseRecord::to("mixed").key("9").payload(seed_format)).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    drop(producer);

    let lake = lake_url(dir.path());
    let out = run_ok(&mut consumer(&broker, "mixed", "g-bad", &lake, &["--exit-when-idle", "5s"]));
    let consumed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((consumed["rows"].as_u64(), consumed["dead_letters"].as_u64()), (Some(4), Some(5)), "{consumed}");

    let rows = lake_rows(&lake, &[]);
    let mut users: Vec<i64> = rows.iter().map(|r| int(&r.event.0[0])).collect();
    users.sort_unstable();
    assert_eq!(users, vec![1, 2, 4, 9]);
    let dead = dead_letters(&dir.path().join("lake/movielens"));
    assert_eq!(dead.len(), bad.len());
    for (payload, reason, field) in bad {
        let d = dead.iter().find(|d| d.raw == payload).unwrap_or_else(|| panic!("no dead letter for {payload}"));
        assert!(d.reason.starts_with(reason), "{} should start with {reason}", d.reason);
        assert_eq!(d.field.as_deref(), field, "{d:?}");
        assert!(!rows.iter().any(|r| (r.partition, r.offset) == (d.partition, d.offset)), "a dead letter's offset is not a rating");
    }
    let counted: u64 = lake_manifests(&lake, &[]).iter().map(|m| m.dead_letter_count).sum();
    assert_eq!(counted, 5);
}

#[test]
fn s3_lake_on_a_real_s3_server() {
    let _heavy = heavy();
    let broker = Broker::start();
    let s3 = S3::start("lake");
    let dir = tempfile::tempdir().unwrap();
    let input = generate(dir.path(), 50_000, 3);
    produce(&broker, "ratings", &input, 3);
    let lake = "s3://lake/movielens/v1";
    let started = Instant::now();
    run_ok(consumer(&broker, "ratings", "g-s3", lake, &["--batch-rows", "20000", "--exit-when-idle", "5s"]).envs(s3.env()));
    eprintln!("s3 ingest took {:?}", started.elapsed());
    assert_exactly_once(&lake_rows(lake, &s3.env()), &csv_ratings(&input));
    assert_eq!(lake_batches(lake, &s3.env()), 3);

    // The commit point's conditional create holds on S3 too: a second writer of batch 1 loses.
    let store = pipeline_lake(lake, "movielens", &s3.env());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let first = rt.block_on(store.manifests()).unwrap().remove(0);
    assert!(!rt.block_on(store.try_commit(&first)).unwrap(), "batch 1 must not be committed twice");
}

#[test]
fn smart_home_devices_land_exactly_once_with_typed_columns() {
    let _heavy = heavy();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let input = smart_home_csv();
    // No --topic: the pipeline's own (smart-home-devices).
    let summary = produce_pipeline(&broker, "smart-home", None, &input, 3);
    assert_eq!((summary["delivered"].as_u64(), summary["rejected"].as_u64()), (Some(5_403), Some(0)), "{summary}");

    let lake = lake_url(dir.path());
    let consume = |group: &str, until: &[&str]| -> serde_json::Value {
        let out = run_ok(
            lensflow(["consume", "--pipeline", "smart-home", "--brokers", &broker.addr(), "--group", group, "--lake", &lake, "--batch-rows", "2000", "--json"])
                .args(until),
        );
        serde_json::from_str(out.trim()).unwrap()
    };
    let consumed = consume("g-home", &["--exit-when-idle", "5s"]);
    assert_eq!((consumed["rows"].as_u64(), consumed["dead_letters"].as_u64()), (Some(5_403), Some(0)), "{consumed}");

    let expected = csv_events(&input, "smart-home");
    assert_eq!(expected.len(), 5_403);
    let rows = lake_rows_of(&lake, "smart-home", &[]);
    assert_exactly_once(&rows, &expected);
    // The events sit in the pipeline's own folder, typed as its columns say.
    assert!(dir.path().join("lake/smart-home/events").is_dir());
    assert!(!dir.path().join("lake/movielens").exists());
    let home = pipeline("smart-home");
    let first = rows.iter().find(|r| int(value(&home, &r.event, "user_id")) == 1).expect("user 1 landed");
    assert_eq!(
        first.event.0,
        vec![
            Value::Int(1),
            Value::Text("Smart Speaker".into()),
            Value::Float(15.30718848124909),
            Value::Float(1.9616068166289793),
            Value::Int(1),
            Value::Int(4),
            Value::Int(36),
            Value::Int(1),
        ]
    );
    let manifests = lake_manifests_of(&lake, "smart-home", &[]);
    assert!(manifests.len() >= 3, "2,000-message batches: {}", manifests.len());
    for m in &manifests {
        assert_eq!((m.topic.as_str(), m.min_ts, m.max_ts), ("smart-home-devices", None, None), "no time column, no time span");
    }

    // Bad messages from a foreign producer: dead-lettered naming the field, nothing else lands.
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", broker.addr()).create().unwrap();
    let good = r#"{"UserID":9001,"DeviceType":"Thermostat","UsageHoursPerDay":"2.5","EnergyConsumption":3,"UserPreferences":0,"MalfunctionIncidents":1,"DeviceAgeMonths":7,"SmartHomeEfficiency":1}"#;
    let bad: [(String, &str, &str); 3] = [
        (good.replace("Thermostat", "Toaster"), "DeviceType", "field `DeviceType`: Toaster is out of range (one of Camera, Lights"),
        (good.replace(r#""UsageHoursPerDay":"2.5""#, r#""UsageHoursPerDay":25"#), "UsageHoursPerDay", "field `UsageHoursPerDay`: 25 is out of range"),
        (good.replace(r#""SmartHomeEfficiency":1"#, r#""SmartHomeEfficiency":null"#), "SmartHomeEfficiency", "missing field `SmartHomeEfficiency`"),
    ];
    for (payload, _, _) in &bad {
        producer.send(BaseRecord::to("smart-home-devices").key("9001").payload(payload.as_str())).unwrap();
    }
    producer.send(BaseRecord::to("smart-home-devices").key("9001").payload(good)).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    drop(producer);

    // A lone consumer that reads every partition without the group and stops at the end: it
    // resumes where the lake says and exits on its own, with exactly the new messages.
    let again = consume("g-home", &["--all-partitions", "--until-end"]);
    assert_eq!((again["rows"].as_u64(), again["dead_letters"].as_u64()), (Some(1), Some(3)), "resumes after the lake: {again}");
    let nothing_new = consume("g-home", &["--all-partitions", "--until-end"]);
    assert_eq!((nothing_new["rows"].as_u64(), nothing_new["batches"].as_u64()), (Some(0), Some(0)), "{nothing_new}");
    let rows = lake_rows_of(&lake, "smart-home", &[]);
    assert_eq!(rows.len(), 5_404);
    let added = rows.iter().find(|r| int(value(&home, &r.event, "user_id")) == 9001).expect("the good message landed");
    assert_eq!(value(&home, &added.event, "usage_hours_per_day"), &Value::Float(2.5), "a number sent as a string is still a number");
    let dead = dead_letters(&dir.path().join("lake/smart-home"));
    assert_eq!(dead.len(), 3);
    for (payload, field, reason) in &bad {
        let d = dead.iter().find(|d| &d.raw == payload).unwrap_or_else(|| panic!("no dead letter for {payload}"));
        assert_eq!(d.field.as_deref(), Some(*field), "{d:?}");
        assert!(d.reason.starts_with(reason), "{} should start with {reason}", d.reason);
        assert!(!rows.iter().any(|r| (r.partition, r.offset) == (d.partition, d.offset)), "a dead letter's offset is not an event");
    }
}

/// The largest time a batch reaches back to, in manifest order: how far its earliest event lies
/// before the newest event of the batches committed before it (0: batches never overlap).
fn reach_back(manifests: &[lensflow_core::BatchManifest]) -> i64 {
    let mut newest = i64::MIN;
    let mut reach = 0;
    for m in manifests {
        let (Some(min), Some(max)) = (m.min_ts, m.max_ts) else { continue };
        if newest > min {
            reach = reach.max(newest - min);
        }
        newest = newest.max(max);
    }
    reach
}

#[test]
fn partitions_drifting_apart_in_time_land_in_time_order_and_exactly_once() {
    let _heavy = heavy();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // A backlog on two partitions whose events are ten times sparser in time on partition 1:
    // read in fetch order, partition 1 runs ahead of partition 0 by hours.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", broker.addr()).create().unwrap();
    let topic = rdkafka::admin::NewTopic::new("drift", 2, rdkafka::admin::TopicReplication::Fixed(1));
    let created = rt.block_on(admin.create_topics([&topic], &rdkafka::admin::AdminOptions::new())).unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", broker.addr()).create().unwrap();
    let n = 6_000i64;
    let mut expected = vec![];
    for (partition, step, first_user) in [(0, 1, 1), (1, 10, 100)] {
        for i in 0..n {
            let line = format!("{},{},4.0,{}", first_user + i % 50, i + 1, 1_000 + step * i);
            let payload = format!(r#"{{"userId":{},"movieId":{},"rating":4.0,"timestamp":{}}}"#, first_user + i % 50, i + 1, 1_000 + step * i);
            expected.push(line);
            loop {
                match producer.send(BaseRecord::<str, str>::to("drift").partition(partition).payload(&payload)) {
                    Ok(()) => break,
                    Err((e, _)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                        producer.poll(Duration::from_millis(50));
                    }
                    Err((e, _)) => panic!("send: {e}"),
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    drop(producer);
    let csv = dir.path().join("drift.csv");
    std::fs::write(&csv, format!("userId,movieId,rating,timestamp\n{}\n", expected.join("\n"))).unwrap();

    let land = |name: &str, skew: &str| {
        let lake = format!("file://{}", dir.path().join(name).display());
        // A small hold, so the partition running ahead is paused at the broker and fetched again.
        let args = ["--batch-rows", "1000", "--all-partitions", "--until-end", "--max-skew", skew, "--max-held", "2000"];
        let out = consumer(&broker, "drift", name, &lake, &args).env("LENSFLOW_LOG", "warn,lensflow_jobs::consume=debug").output().unwrap();
        assert!(out.status.success(), "consume failed: {}", String::from_utf8_lossy(&out.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["rows"], 2 * n, "{summary}");
        assert_exactly_once(&lake_rows(&lake, &[]), &csv_ratings(&csv));
        let paused = String::from_utf8_lossy(&out.stderr).matches("pause=true").count();
        (reach_back(&lake_manifests(&lake, &[])), paused)
    };
    let (aligned, paused) = land("aligned", "0");
    let (within, _) = land("within", "600");
    let (arrival_order, never_paused) = land("arrival", "off");
    eprintln!("batches reach back: aligned {aligned} s ({paused} pauses), within 600 s: {within} s, in arrival order {arrival_order} s");
    assert!(paused > 0, "the partition running ahead filled its hold and was paused, then fetched again");
    assert_eq!(never_paused, 0);
    assert_eq!(aligned, 0, "with --max-skew 0 no batch holds an event older than an earlier batch's newest");
    assert!(within <= 600, "--max-skew 600 bounds how far a batch reaches back: {within}");
    assert!(arrival_order > 600, "in arrival order partition 1 runs ahead and later batches reach far back: {arrival_order}");
}

#[test]
fn pipelines_are_listed_and_checked_and_a_wrong_file_is_refused_before_connecting() {
    let listed = run_ok(&mut lensflow(["pipelines"]));
    for expected in ["movielens", "smart-home", "topic smart-home-devices", "device_type", "wire DeviceType", "label efficient", "entity user"] {
        assert!(listed.contains(expected), "`lensflow pipelines` lacks {expected:?}:\n{listed}");
    }
    let json: serde_json::Value = serde_json::from_str(&run_ok(&mut lensflow(["pipelines", "--json"]))).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(2));

    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smart-home");
    let ok = run_ok(lensflow(["pipelines", "check"]).arg(&shipped));
    assert!(ok.starts_with("ok: pipeline smart-home"), "{ok}");

    // A copy whose SQL reads a column the events do not have: exit 2, naming the file.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&shipped).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    let sql = std::fs::read_to_string(dir.path().join("features.sql")).unwrap();
    std::fs::write(dir.path().join("features.sql"), sql.replace("usage_hours_per_day", "usage_hours_per_week")).unwrap();
    let out = lensflow(["pipelines", "check"]).arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("features.sql: "), "{stderr}");

    // The smart-home file is not MovieLens: produce says which columns it wanted, with no broker.
    let out = lensflow(["produce", "--brokers", "127.0.0.1:1", "--input"]).arg(smart_home_csv()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("smart_home_device_usage_data.csv: line 1: bad header") && stderr.contains("userId,movieId,rating,timestamp"), "{stderr}");
}
