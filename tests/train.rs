//! End to end: the lake from a real broker, trained by `lensflow train` in-process (DataFusion)
//! and on a real cluster (a Ballista scheduler and two executors as separate processes).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use lensflow_core::model::{LatestPointer, ModelArtifact, sha256_hex};

/// The newest round of the pipeline whose folder in the model store is `models`.
fn load_latest(models: &Path) -> (LatestPointer, ModelArtifact) {
    let pointer: LatestPointer = serde_json::from_slice(&std::fs::read(models.join("LATEST")).unwrap()).unwrap();
    let bytes = std::fs::read(models.join(&pointer.path).join("model.json")).unwrap();
    assert_eq!(sha256_hex(&bytes), pointer.model_sha256, "LATEST's checksum matches the model it names");
    let artifact: ModelArtifact = serde_json::from_slice(&bytes).unwrap();
    for (file, sum) in &artifact.checksums {
        assert_eq!(&sha256_hex(&std::fs::read(models.join(&pointer.path).join(file)).unwrap()), sum, "{file}");
    }
    (pointer, artifact)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn three_cumulative_rounds_on_ratings_small_beat_the_bar_and_match_on_a_cluster() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let lake = land(&Broker::start(), dir.path(), &ratings_small(), "ratings", 33_335);
    assert_eq!(lake_batches(&lake, &[]), 3);
    let models = dir.path().join("models");
    let rounds = train_json(&lake, &models, &[]);
    assert_eq!(rounds.len(), 3, "{rounds:?}");
    for (i, r) in rounds.iter().enumerate() {
        eprintln!("round {}: {r}", i + 1);
        assert_eq!(r["round"], i as u64 + 1);
        for key in ["train_rows", "test_rows", "rmse", "mae", "rmse_baseline", "auc", "accuracy", "accuracy_baseline", "silhouette"] {
            assert!(r[key].is_number(), "round report lacks {key}: {r}");
        }
        assert!(r["rmse"].as_f64() < r["rmse_baseline"].as_f64(), "beats the global mean: {r}");
        assert!(r["accuracy"].as_f64() > r["accuracy_baseline"].as_f64(), "beats the majority class: {r}");
    }
    // The file is sorted by user, so each batch brings ratings older than what their movies have
    // seen: the late events reach most stored state rows, and the trainer recomputes all (and
    // says so) rather than carry.
    assert_eq!(rounds[0]["state"]["reason"], "no carried state yet");
    for r in &rounds[1..] {
        assert!(r["state"]["reason"].as_str().is_some_and(|s| s.starts_with("late events change")), "{}", r["state"]);
    }
    let last = &rounds[2];
    assert!(last["rmse"].as_f64().unwrap() <= 0.88, "round 3 RMSE {}", last["rmse"]);
    assert!(last["auc"].as_f64().unwrap() >= 0.81, "round 3 AUC {}", last["auc"]);
    assert_eq!(last["train_rows"].as_u64().unwrap() + last["test_rows"].as_u64().unwrap(), 100_004);

    let (pointer, local) = load_latest(&models.join("movielens"));
    assert_eq!(pointer.round, 3);
    assert_eq!(local.lineage.batches, vec![1, 2, 3]);
    assert_eq!(local.lineage.rows, 100_004);
    assert!(local.segmentation.segments.iter().all(|s| !s.description.is_empty() && s.size > 0));

    // Nothing new to train: a second run publishes nothing and leaves LATEST alone.
    assert!(train_json(&lake, &models, &[]).is_empty());

    // The same lake on a real cluster gives the same models, here carrying state through the
    // late events instead (every query of it a job on the executors).
    let cluster = Cluster::start(dir.path(), 2);
    let cluster_models = dir.path().join("cluster-models");
    let rounds = train_json(&lake, &cluster_models, &["--scheduler", &cluster.url(), "--full-above", "1"]);
    assert_eq!(rounds.len(), 3);
    for r in &rounds[1..] {
        assert_eq!(r["state"]["mode"], "incremental", "{}", r["state"]);
        assert!(r["state"]["recomputed"].as_u64() > Some(0), "{}", r["state"]);
    }
    let (_, remote) = load_latest(&cluster_models.join("movielens"));
    assert_eq!(remote.features, local.features);
    for (a, b) in [(&remote.regression, &local.regression), (&remote.classification, &local.classification)] {
        assert!(close(a.intercept, b.intercept, 1e-9));
        for (x, y) in a.coefficients.iter().zip(&b.coefficients) {
            assert!(close(*x, *y, 1e-9), "coefficients differ: {x} vs {y}");
        }
    }
    assert!(close(remote.metrics.rmse, local.metrics.rmse, 1e-9));
    assert!(close(remote.metrics.auc, local.metrics.auc, 1e-9));
    let sizes = |a: &ModelArtifact| {
        let mut s: Vec<u64> = a.segmentation.segments.iter().map(|s| s.size).collect();
        s.sort();
        s
    };
    assert_eq!(sizes(&remote), sizes(&local), "same segments up to relabelling");
    // Ad-hoc SQL on the same cluster: a job under its own name, the answer the trainer's own
    // process gives (integer sums, so no summation order can change a digit).
    let query = "SELECT COUNT(*) AS n, SUM(CAST(rating * 2 AS BIGINT)) AS halves FROM ratings";
    let count = |extra: &[&str]| run_ok(lensflow(["sql", "--lake", &lake, "--pipeline", "movielens", "--format", "csv", "-e", query]).args(extra));
    let (here, there) = (count(&[]), count(&["--scheduler", &cluster.url(), "--job-name", "ratings-count"]));
    assert!(here.starts_with("n,halves\n100004,"), "{here}");
    assert_eq!(here, there);
    let jobs = http_get(cluster.port, "/api/jobs").unwrap_or_default();
    assert!(jobs.contains("ratings-count"), "the query ran as a named job on the scheduler: {jobs}");
    // Spark's functions run on the executors too: Spark's substring (position 0 is 1), concat,
    // round, date_add, date_trunc and avg (its partial state is laid out unlike DataFusion's),
    // and what lensflow adds (the date parts, sign).
    let spark_sql = "SELECT year(d) AS y, dayofweek(d) AS dow, COUNT(*) AS n, MAX(date_add(d, CAST(1 AS INT))) AS after_last,
        SUM(CAST(round(rating * 2) AS BIGINT)) AS halves, MIN(substring(concat('user-', CAST(user_id AS STRING)), 0, 7)) AS first_tag,
        AVG(CAST(rating * 2 AS BIGINT)) AS mean_halves, MIN(date_trunc('MONTH', to_timestamp(ts))) AS first_month, SUM(sign(rating - 3)) AS lean
      FROM (SELECT *, CAST(to_timestamp(ts) AS DATE) AS d FROM ratings) GROUP BY 1, 2 ORDER BY 1, 2";
    let spark = |extra: &[&str]| run_ok(lensflow(["sql", "--lake", &lake, "--pipeline", "movielens", "--format", "csv", "-e", spark_sql]).args(extra));
    let (here, there, standalone) = (spark(&[]), spark(&["--scheduler", &cluster.url()]), spark(&["--scheduler", "standalone"]));
    assert_eq!(here, standalone);
    assert!(
        here.starts_with(
            "y,dow,n,after_last,halves,first_tag,mean_halves,first_month,lean\n1995,2,3,1995-01-10,22,user-38,7.333333333333333,1995-01-01T00:00:00,1.0\n"
        ),
        "{here}"
    );
    assert_eq!(here, there);
    // Ctrl-C during a long query exits 130 and leaves no job of it running on the cluster.
    let job_status = || -> Vec<String> {
        let url = format!("http://127.0.0.1:{}/api/jobs", cluster.port);
        let jobs: serde_json::Value = reqwest::blocking::get(url).and_then(|r| r.json()).unwrap_or_default();
        jobs.as_array().into_iter().flatten().filter(|j| j["job_name"] == "pairs").map(|j| j["status"].as_str().unwrap_or("").to_string()).collect()
    };
    let mut pairs = lensflow(["sql", "--lake", &lake, "--scheduler", &cluster.url(), "--job-name", "pairs", "--format", "csv", "-e"])
        .arg("SELECT SUM(a.rating * b.rating) AS s FROM ratings a CROSS JOIN ratings b WHERE a.ts > b.ts")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !job_status().iter().any(|s| s == "Running") {
        assert!(std::time::Instant::now() < deadline, "the long query never ran: {:?}", job_status());
        std::thread::sleep(Duration::from_millis(200));
    }
    interrupt(&pairs);
    let status = wait_exit(&mut pairs, Duration::from_secs(30), "lensflow sql");
    assert_eq!(status.code(), Some(130), "Ctrl-C exits 130");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while job_status().iter().any(|s| s == "Running" || s == "Queued") {
        assert!(std::time::Instant::now() < deadline, "the job was left running: {:?}", job_status());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!job_status().iter().any(|s| s == "Completed"), "cancelled, not run to the end: {:?}", job_status());
    assert_same_lookups(&cluster_models.join("movielens/round-000003"), &models.join("movielens/round-000003"));
}

/// Requires the MovieLens lookup tables of two round folders to hold the same rows (1e-9).
fn assert_same_lookups(a: &Path, b: &Path) {
    for table in ["lookup-user.parquet", "lookup-movie.parquet"] {
        let (x, y) = (lookup_table(&a.join(table)), lookup_table(&b.join(table)));
        assert_eq!(x.len(), y.len(), "{table} rows");
        for (p, q) in x.iter().zip(&y) {
            assert!(p.iter().zip(q).all(|(u, v)| close(*u, *v, 1e-9)), "{table}: {p:?} vs {q:?}");
        }
    }
}

/// A lookup table's rows (id first), in file order.
fn lookup_table(path: &Path) -> Vec<Vec<f64>> {
    use arrow_array::{Array, Float64Array, Int64Array};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let mut rows = vec![];
    for batch in reader {
        let batch = batch.unwrap();
        let ids = batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        for r in 0..batch.num_rows() {
            let mut row = vec![ids.value(r) as f64];
            for c in 1..batch.num_columns() {
                row.push(batch.column(c).as_any().downcast_ref::<Float64Array>().unwrap().value(r));
            }
            rows.push(row);
        }
    }
    rows
}

#[test]
fn a_window_fits_on_the_newest_batches_while_features_and_lookups_keep_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let csv = generate(dir.path(), 40_000, 11);
    let lake = format!("file://{}", dir.path().join("lake").display());
    build_lake(&csv, &lake, 4);
    let (all_models, window_models) = (dir.path().join("all"), dir.path().join("window"));
    // The refit recomputes every state row each round; the window's rounds carry state.
    let all = train_json(&lake, &all_models, &["--full"]);
    let window = train_json(&lake, &window_models, &["--window", "2"]);
    assert_eq!((all.len(), window.len()), (4, 4));
    // While the window holds every batch, the rounds are the same.
    for (a, w) in all[..2].iter().zip(&window[..2]) {
        assert!(w.get("window_from").is_none(), "{w}");
        for key in ["train_rows", "test_rows", "rmse", "auc", "accuracy", "silhouette"] {
            assert!(close(a[key].as_f64().unwrap(), w[key].as_f64().unwrap(), 1e-9), "{key}: {} vs {}", a[key], w[key]);
        }
    }
    // Then the models see the events newer than every event of the batches before the window;
    // the generator's events come in time order, so those are exactly the window's.
    let p = pipeline("movielens");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let manifests = rt.block_on(pipeline_lake(&lake, "movielens", &[]).manifests()).unwrap();
    // (offset, time) of every event; build_lake puts them all in partition 0.
    let events: Vec<(i64, i64)> = lake_rows_of(&lake, "movielens", &[]).iter().map(|r| (r.offset, int(value(&p, &r.event, "ts")))).collect();
    for (round, w) in [(3u64, &window[2]), (4, &window[3])] {
        assert_eq!(w["window_from"], round - 1, "{w}");
        assert_eq!(w["events"], manifests[..round as usize].iter().map(|m| m.rows).sum::<u64>(), "every batch's events made the round");
        let before = manifests[..round as usize - 2].iter().filter_map(|m| m.max_ts).max().unwrap();
        let last = manifests[round as usize - 1].partitions[&0].last;
        let in_window = events.iter().filter(|(offset, t)| *offset <= last && *t > before).count() as u64;
        let window_rows: u64 = manifests[round as usize - 2..round as usize].iter().map(|m| m.rows).sum();
        assert_eq!(in_window, window_rows, "round {round}: time-ordered events, so the window is its batches");
        let (train, test) = (w["train_rows"].as_u64().unwrap(), w["test_rows"].as_u64().unwrap());
        assert_eq!(train + test, in_window, "round {round}: {w}");
        let share = test as f64 / in_window as f64;
        assert!((0.19..0.22).contains(&share), "round {round}: the hold-out is the window's newest 20%, not {share}");
        let whole = &all[round as usize - 1];
        assert!(whole["train_rows"].as_u64().unwrap() > train, "the full refit fits on more: {whole} vs {w}");
    }
    let (_, fitted) = load_latest(&window_models.join("movielens"));
    let (_, whole) = load_latest(&all_models.join("movielens"));
    assert_eq!(fitted.lineage.window_from, Some(3));
    assert_eq!(whole.lineage.window_from, None);
    assert_eq!(fitted.lineage.batches, vec![1, 2, 3, 4], "every batch still made the round");
    assert_ne!(fitted.variables["prior_mean"], whole.variables["prior_mean"], "the priors come from the window's training events");
    assert_ne!(fitted.regression.coefficients, whole.regression.coefficients);
    // Serving's state is every event's: the lookup tables equal the full refit's, though the
    // window's trainer carried them as per-entity partial sums from round to round.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(window_models.join("movielens/_state/STATE.json")).unwrap()).unwrap();
    let carried: Vec<&str> = state["lookups"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(carried, ["user", "movie"]);
    assert!(window[1..].iter().all(|w| w["state"]["from_totals"] == true), "time-ordered batches change no stored row");
    assert_same_lookups(&all_models.join("movielens/round-000004"), &window_models.join("movielens/round-000004"));

    // Without an event time (smart-home), the window is exactly its batches' offsets.
    let home_lake = format!("file://{}", dir.path().join("home-lake").display());
    build_lake_of(&smart_home_csv(), &home_lake, "smart-home", 3);
    let home = train_json(&home_lake, &dir.path().join("home-models"), &["--pipeline", "smart-home", "--window", "1"]);
    let manifests = rt.block_on(pipeline_lake(&home_lake, "smart-home", &[]).manifests()).unwrap();
    for (r, m) in home.iter().zip(&manifests).skip(1) {
        assert_eq!(r["window_from"], m.batch, "{r}");
        assert_eq!(r["train_rows"].as_u64().unwrap() + r["test_rows"].as_u64().unwrap(), m.rows, "{r}");
    }

    // A window of no batches is refused before anything runs.
    let refused = lensflow(["train", "--lake", &lake, "--window", "0", "--models"]).arg(dir.path().join("none")).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--window"), "{}", String::from_utf8_lossy(&refused.stderr));
}

#[test]
fn a_missing_batch_file_is_named_and_latest_is_untouched() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let input = generate(dir.path(), 20_000, 9);
    let broker = Broker::start();
    let lake = land(&broker, dir.path(), &input, "r", 12_000);
    let models = dir.path().join("models");
    assert_eq!(train_json(&lake, &models, &[]).len(), 2);
    // Round 3's batch loses a file.
    land(&broker, dir.path(), &input, "r", 50_000);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("lake/movielens/_batches/0000000003.json")).unwrap()).unwrap();
    let victim = manifest["files"][0]["path"].as_str().unwrap().to_string();
    std::fs::remove_file(dir.path().join("lake/movielens").join(&victim)).unwrap();
    let out = lensflow(["train", "--lake", &lake, "--models"]).arg(&models).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&victim), "the error names the file: {stderr}");
    assert_eq!(load_latest(&models.join("movielens")).0.round, 2, "LATEST still points at the last complete round");

    // A file that is there but is not the Parquet its manifest promises.
    std::fs::write(dir.path().join("lake/movielens").join(&victim), b"not parquet at all").unwrap();
    let out = lensflow(["train", "--lake", &lake, "--models"]).arg(&models).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&victim) && stderr.contains("unreadable"), "the error names the file: {stderr}");
    assert_eq!(load_latest(&models.join("movielens")).0.round, 2);
}

#[test]
fn watch_trains_each_batch_as_it_lands_and_stops_on_ctrl_c() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let land_batch = |seed: u64| land(&broker, dir.path(), &generate(dir.path(), 15_000, seed), "w", 100_000);
    let lake = land_batch(1);
    let models = dir.path().join("models");
    let metrics_port = free_port();
    let mut train = lensflow(["train", "--lake", &lake, "--watch", "--poll-interval", "1s", "--json", "--metrics-bind", &format!("127.0.0.1:{metrics_port}")])
        .arg("--models")
        .arg(&models)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let round_published = |n: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::fs::read(models.join("movielens/LATEST")).ok().and_then(|b| serde_json::from_slice::<LatestPointer>(&b).ok()).map(|p| p.round) != Some(n) {
            assert!(std::time::Instant::now() < deadline, "round {n} was not published");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    round_published(1);
    land_batch(2);
    round_published(2);
    // The trainer's Prometheus endpoint shows both rounds, how long each stage took, and how
    // the second found its state rows.
    let metrics = http_get(metrics_port, "/metrics").unwrap_or_default();
    for line in ["lensflow_trainer_rounds_total{pipeline=\"movielens\"} 2", "lensflow_trainer_last_round{pipeline=\"movielens\"} 2"] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in:\n{metrics}");
    }
    assert!(metrics.contains("lensflow_trainer_round_stage_seconds{pipeline=\"movielens\",stage=\"features\"}"), "{metrics}");
    assert!(metrics.contains("lensflow_trainer_state_rounds_total{pipeline=\"movielens\",mode="), "{metrics}");
    interrupt(&train);
    assert!(wait_exit(&mut train, Duration::from_secs(60), "trainer").success(), "Ctrl-C ends --watch cleanly");
    let out = train.wait_with_output().unwrap();
    let rounds: Vec<u64> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, vec![1, 2]);
    assert_eq!(load_latest(&models.join("movielens")).1.lineage.batches, vec![1, 2]);
}

#[test]
fn an_executor_killed_mid_round_never_leaves_latest_on_a_partial_round() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let input = generate(dir.path(), 300_000, 21);
    let lake = land(&Broker::start(), dir.path(), &input, "r", 300_000);
    let mut cluster = Cluster::start(dir.path(), 2);
    let models = dir.path().join("models");
    let mut train = lensflow(["train", "--lake", &lake, "--scheduler", &cluster.url(), "--query-timeout", "120s", "--json", "--models"])
        .arg(&models)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(train.try_wait().unwrap().is_none(), "the round must still be running when the executor dies");
    let victim = &mut cluster.executors[0];
    victim.kill().unwrap();
    victim.wait().unwrap();
    let status = wait_exit(&mut train, Duration::from_secs(400), "trainer");
    let out = train.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if status.success() {
        eprintln!("the round survived the lost executor");
        assert_eq!(load_latest(&models.join("movielens")).0.round, 1);
    } else {
        eprintln!("the round failed: {stderr}");
        assert!(stderr.contains("error: query") || stderr.contains("error: round 1"), "a clear error: {stderr}");
        assert!(!models.join("movielens/LATEST").exists(), "no round was published");
        assert!(!models.join("movielens/round-000001/model.json").exists());
    }
}

#[test]
fn the_smart_home_pipeline_trains_honestly_beside_its_baselines() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let lake = land_pipeline(&Broker::start(), dir.path(), &smart_home_csv(), "smart-home", "devices", 10_000);
    let models = dir.path().join("models");
    let rounds = train_json(&lake, &models, &["--pipeline", "smart-home"]);
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    let r = &rounds[0];
    eprintln!("smart-home round 1: {r}");
    assert_eq!(r["pipeline"], "smart-home");
    assert_eq!(r["train_rows"].as_u64().unwrap() + r["test_rows"].as_u64().unwrap(), 5_403);
    let f = |k: &str| r[k].as_f64().unwrap();
    assert!(f("auc") >= 0.72, "the classifier clears the bar on the newest 20% by arrival: {r}");
    assert!(f("accuracy") > f("accuracy_baseline") + 0.1, "and beats the majority class clearly: {r}");
    // Malfunction incidents carry almost no signal: the report must not claim skill.
    assert!(f("r2").abs() < 0.05, "R² is near zero, as the data allows: {r}");
    assert!((f("rmse") - f("rmse_baseline")).abs() < 0.05 * f("rmse_baseline"), "RMSE is the baseline's: {r}");
    assert_eq!(r["state"]["reason"], "no carried state yet");
    // `--full` recomputes, says why, and gives the same round.
    let full = train_json(&lake, &dir.path().join("full-models"), &["--pipeline", "smart-home", "--full"]);
    assert_eq!(full[0]["state"]["reason"], "train --full");
    for key in ["rmse", "auc", "accuracy", "r2", "silhouette"] {
        assert!(close(full[0][key].as_f64().unwrap(), f(key), 1e-9), "{key}: {} vs {}", full[0][key], r[key]);
    }
    let (_, artifact) = load_latest(&models.join("smart-home"));
    assert_eq!(artifact.pipeline.name(), "smart-home");
    assert_eq!(artifact.segmentation.segments.len(), 5);
    assert!(artifact.segmentation.segments.iter().all(|s| s.description.contains("h a day") && s.size > 0), "{:?}", artifact.segmentation.segments);
    assert!(artifact.lookups.is_empty(), "a request carries a device's own columns: nothing to look up");
    let regression_uses: Vec<&str> = artifact.regression.uses.iter().map(|&i| artifact.features[i].as_str()).collect();
    assert!(!regression_uses.iter().any(|f| f.contains("malfunction")), "the regression never reads its own target: {regression_uses:?}");
    // The movielens folder of the same model store is untouched.
    assert!(!models.join("movielens").exists());
}
