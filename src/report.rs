//! Summaries for people at a terminal (the `--json` flags print the structs instead).

use lensflow_jobs::compact::CompactSummary;
use lensflow_jobs::consume::ConsumeSummary;
use lensflow_jobs::produce::ProduceSummary;
use lensflow_jobs::train::RoundReport;

/// One line on what a producer run did.
pub fn produce(s: &ProduceSummary) -> String {
    format!(
        "produced {} of {} lines in {:.1}s ({:.0} msg/s); {} delivered, {} rejected{}{}{}",
        s.sent,
        s.lines,
        s.seconds,
        s.messages_per_sec,
        s.delivered,
        s.rejected,
        if s.skipped > 0 { format!(", {} already in the topic", s.skipped) } else { String::new() },
        s.rejects_file.as_ref().map(|p| format!(" (see {})", p.display())).unwrap_or_default(),
        if s.interrupted { "; interrupted" } else { "" }
    )
}

/// One line on what a compaction did.
pub fn compact(s: &CompactSummary) -> String {
    let removed = if s.removed > 0 { format!("; removed {} files replaced earlier", s.removed) } else { String::new() };
    match (s.record, s.batches, &s.skipped) {
        (Some(record), Some((first, last)), _) => format!(
            "compaction {record}: batches {first}..={last}, {} event files ({:.1} MiB) into {} ({:.1} MiB), {} events{removed}",
            s.files_in,
            s.bytes_in as f64 / 1048576.0,
            s.files_out,
            s.bytes_out as f64 / 1048576.0,
            s.rows
        ),
        (_, _, Some(why)) => format!("nothing to compact: {why}{removed}"),
        _ => format!("nothing to compact{removed}"),
    }
}

/// One line on what a consumer run landed.
pub fn consume(s: &ConsumeSummary) -> String {
    format!(
        "landed {} events in {} batches in {:.1}s ({:.0}/s); {} dead letters; {} dropped on rebalance; lake at batch {}",
        s.rows, s.batches, s.seconds, s.rows_per_sec, s.dead_letters, s.dropped_on_rebalance, s.last_batch
    )
}

/// A training round as a small table of metrics beside their baselines, then stage times.
/// The regression line says plainly when the model is no better than the mean.
pub fn round(r: &RoundReport) -> String {
    let m = &r.metrics;
    let mut out =
        format!("{} round {} (batches 1..={}): {} train / {} hold-out events -> {}\n", r.pipeline, r.round, r.round, m.train_rows, m.test_rows, r.path);
    out += &format!("  {:<16} {:>8} {:>10}\n", "metric", "model", "baseline");
    out += &format!("  {:<16} {:>8.4} {:>10.4}  (baseline: always the training mean)\n", "RMSE", m.rmse, m.rmse_baseline);
    out += &format!("  {:<16} {:>8.4} {:>10.4}  {}\n", "R²", m.r2, 0.0, skill(m.r2));
    out += &format!("  {:<16} {:>8.4} {:>10}\n", "MAE", m.mae, "");
    out += &format!("  {:<16} {:>8.4} {:>10.4}  (baseline: a constant score)\n", "AUC", m.auc, m.auc_baseline);
    out += &format!("  {:<16} {:>8.4} {:>10.4}  (baseline: always the majority class)\n", "accuracy", m.accuracy, m.accuracy_baseline);
    out += &format!("  {:<16} {:>8.4} {:>10.4}  (0: no structure; 1: tight, separate segments)\n", "silhouette", m.silhouette, 0.0);
    let stages: Vec<String> = r.seconds.iter().map(|(k, v)| format!("{k} {v:.2}s")).collect();
    out += &format!("  time: {}", stages.join(", "));
    match &r.state {
        Some(s) if s.mode == "full" => out += &format!("\n  state: {} rows recomputed in full ({})", s.rows, s.reason.as_deref().unwrap_or("")),
        Some(s) => out += &format!("\n  state: carried; {} new events, {} stored rows recomputed for late events, {} rows", s.new_events, s.recomputed, s.rows),
        None => {}
    }
    out
}

/// What an R² says about a regression, in words.
pub fn skill(r2: f64) -> &'static str {
    if r2 < 0.0 {
        "worse than predicting the mean: no skill"
    } else if r2 < 0.02 {
        "no better than predicting the mean: no skill"
    } else {
        "better than predicting the mean"
    }
}
