//! `lensflow sql`: ad-hoc SQL and SQL job files over the lake, as spark-sql is over a warehouse.
//!
//! The tables:
//! - each pipeline's events under its `events.table` name (`ratings`, `devices`), as of the
//!   lake's committed manifests only: a batch still being written is invisible;
//! - `batches`: one row per committed batch of every pipeline (files, events, dead letters,
//!   offsets, time span);
//! - with a model store, `lookup_<name>`: each lookup table of each pipeline's served round.
//!
//! The statements run on the same engines as training: DataFusion in-process by default,
//! Ballista standalone or a cluster with `--scheduler` (where the job shows under its name).
//! Every statement but the last is run for its effect (`CREATE VIEW …`); the last one's rows
//! stream: to stdout as a table (the first rows), CSV or JSON lines, or to `--out` (a local
//! folder or `s3://…`) as Parquet, CSV or JSON files written by the engine itself.
//!
//! Variables work as in spark-sql: `SET name=value;` defines `${name}` for the statements after
//! it (`--define name=value` before them all), so a pipeline's feature SQL runs as a job as is.

use std::io::Write;
use std::time::Instant;

use arrow_array::RecordBatch;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::sql::parser::DFParser;
use futures::StreamExt;
use lensflow_core::model::{MODEL_FILE, ModelArtifact};
use lensflow_core::{BatchManifest, Lake, Pipeline, StorageOptions};
use object_store::path::Path;
use tokio_util::sync::CancellationToken;

use crate::train::engine::{Engine, EngineChoice, engine_err, number};
use crate::train::latest;
use crate::{JobError, Result};

/// How the result is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A text table of the first rows (stdout only).
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per row.
    Json,
    /// Parquet files (`--out` only).
    Parquet,
}

/// What to run, over what.
#[derive(Debug, Clone)]
pub struct SqlOptions {
    /// The pipelines whose tables to register.
    pub pipelines: Vec<Pipeline>,
    /// The lake's root.
    pub lake: String,
    /// The model store's root, for the served rounds' lookup tables.
    pub models: Option<String>,
    /// Object-store settings for `s3://` URLs.
    pub storage: StorageOptions,
    /// `--scheduler`: absent (DataFusion in-process), `standalone`, or `df://HOST:PORT`.
    pub scheduler: Option<String>,
    /// Query partitions.
    pub partitions: usize,
    /// The statements.
    pub sql: String,
    /// `${name}` values set before the first statement (`--define`).
    pub variables: std::collections::BTreeMap<String, String>,
    /// The job's name on a Ballista scheduler.
    pub job_name: String,
    /// The output format.
    pub format: Format,
    /// A folder (local or `s3://`) to write the result to instead of stdout.
    pub out: Option<String>,
    /// Most rows a table shows (the rest are counted, not shown).
    pub table_rows: usize,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SqlSummary {
    /// The tables the statements could read.
    pub tables: Vec<String>,
    /// Rows the last statement gave (written to `--out`, or streamed to stdout).
    pub rows: u64,
    /// Wall time.
    pub seconds: f64,
    /// Whether Ctrl-C stopped it.
    pub cancelled: bool,
}

/// Runs `opts.sql`, writing the last statement's rows to `out` (or to `opts.out`).
pub async fn run(opts: SqlOptions, shutdown: CancellationToken, out: &mut (dyn Write + Send)) -> Result<SqlSummary> {
    let start = Instant::now();
    let statements = split(&opts.sql, &opts.variables)?;
    let Some((last, before)) = statements.split_last() else {
        return Err(JobError::Config { option: "sql", reason: "no statement to run".into() });
    };
    if opts.out.is_none() && opts.format == Format::Parquet {
        return Err(JobError::Config { option: "format", reason: "parquet needs --out FOLDER (stdout takes table, csv or json)".into() });
    }
    if opts.out.is_some() && opts.format == Format::Table {
        return Err(JobError::Config { option: "format", reason: "--out writes parquet, csv or json, not a table".into() });
    }
    let choice = EngineChoice::from_flag(opts.scheduler.as_deref());
    let engine = Engine::start_named(&choice, opts.partitions, &opts.job_name).await?;
    let tables = register(&engine, &opts).await?;
    tracing::info!(engine = engine.mode, tables = tables.join(", "), "tables registered");
    let mut summary = SqlSummary { tables, ..Default::default() };
    let ctx = engine.context();
    for statement in before {
        ctx.sql(statement).await.map_err(engine_err("statement"))?.collect().await.map_err(engine_err("statement"))?;
    }
    let df = ctx.sql(last).await.map_err(engine_err("query"))?;
    if let Some(url) = &opts.out {
        let write = async {
            let options = DataFrameWriteOptions::new();
            let written = match opts.format {
                Format::Csv => df.write_csv(url, options, None).await,
                Format::Json => df.write_json(url, options, None).await,
                _ => df.write_parquet(url, options, None).await,
            }
            .map_err(engine_err("write the result"))?;
            // The engine answers a write with one row: how many rows it wrote.
            Ok::<u64, JobError>(written.iter().filter(|b| b.num_rows() > 0).filter_map(|b| number(b, 0, 0)).sum::<f64>() as u64)
        };
        tokio::select! {
            rows = write => summary.rows = rows?,
            _ = shutdown.cancelled() => summary.cancelled = true,
        }
    } else {
        let mut stream = df.execute_stream().await.map_err(engine_err("query"))?;
        let schema = stream.schema();
        let mut sink = Sink::new(opts.format, opts.table_rows);
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = shutdown.cancelled() => {
                    summary.cancelled = true;
                    break;
                }
            };
            let Some(batch) = next else { break };
            let batch = batch.map_err(engine_err("query"))?;
            summary.rows += batch.num_rows() as u64;
            sink.write(&batch, out)?;
        }
        if summary.rows == 0 {
            // No rows still has columns: a CSV header, a table's header.
            sink.write(&RecordBatch::new_empty(schema), out)?;
        }
        sink.finish(summary.rows, out)?;
    }
    if summary.cancelled {
        // Ballista's client does not cancel its job when the stream is dropped: ask the
        // scheduler to, so Ctrl-C leaves no job running on the cluster.
        if let EngineChoice::Remote(url) = &choice {
            let cancelled = cancel_jobs(url, &opts.job_name).await?;
            tracing::info!(job = opts.job_name, cancelled, "asked the scheduler to cancel the job");
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Cancels the scheduler's queued or running jobs named `job` through its REST API (served on
/// the scheduler's own port); returns how many it cancelled.
async fn cancel_jobs(scheduler: &str, job: &str) -> Result<usize> {
    let fail = |e: reqwest::Error| JobError::Engine { what: format!("cancel job {job}"), reason: e.to_string() };
    let base = format!("http://{}", scheduler.trim_start_matches("df://"));
    let client = reqwest::Client::new();
    let mut cancelled = 0;
    // A job submitted a moment ago may not be listed yet: look twice.
    for attempt in 0..2 {
        let jobs: Vec<serde_json::Value> = client.get(format!("{base}/api/jobs")).send().await.map_err(fail)?.json().await.map_err(fail)?;
        for j in jobs.iter().filter(|j| j["job_name"] == job && matches!(j["status"].as_str(), Some("Queued" | "Running"))) {
            if let Some(id) = j["job_id"].as_str() {
                client.patch(format!("{base}/api/job/{id}")).send().await.map_err(fail)?.error_for_status().map_err(fail)?;
                cancelled += 1;
            }
        }
        if cancelled > 0 || attempt == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Ok(cancelled)
}

/// The statements of `sql`, each as text, with Spark's variables applied: `SET name=value` (a
/// plain name; a dotted one such as `datafusion.…` stays a setting) defines `${name}` for the
/// statements after it, over `defined`; comments are left as they are. A parse error names its
/// line and column, and so does a `${name}` never set.
fn split(sql: &str, defined: &std::collections::BTreeMap<String, String>) -> Result<Vec<String>> {
    let mut vars = defined.clone();
    let mut text = String::with_capacity(sql.len());
    let mut statement: Vec<(Piece, std::ops::Range<usize>)> = Vec::new();
    for (piece, range) in pieces(sql) {
        if piece != Piece::End {
            statement.push((piece, range));
            continue;
        }
        let code: String = statement.iter().map(|(p, r)| if *p == Piece::Comment { " " } else { &sql[r.clone()] }).collect();
        if let Some((name, value)) = spark_set(&code) {
            vars.insert(name.to_string(), value.to_string());
            // Blank, keeping its lines, so positions in errors stay those of the file.
            text.extend(statement.iter().flat_map(|(_, r)| sql[r.clone()].chars().filter(|c| *c == '\n')));
        } else {
            for (p, r) in &statement {
                let line = 1 + sql[..r.start].matches('\n').count();
                match p {
                    Piece::Text => text.push_str(&substitute_vars(&sql[r.clone()], &vars, line)?),
                    _ => text.push_str(&sql[r.clone()]),
                }
            }
        }
        text.push_str(&sql[range]);
        statement.clear();
    }
    let parsed = DFParser::parse_sql(&text).map_err(|e| JobError::Engine { what: "SQL".into(), reason: e.to_string() })?;
    Ok(parsed.into_iter().map(|s| s.to_string()).collect())
}

/// A piece of SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Code or a quoted string.
    Text,
    /// A `--` or `/* */` comment.
    Comment,
    /// A statement's end: its `;`, or the end of the text (empty).
    End,
}

/// `sql` cut into text, comments and statement ends, in order.
fn pieces(sql: &str) -> Vec<(Piece, std::ops::Range<usize>)> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut start) = (0, 0);
    let cut = |out: &mut Vec<_>, piece, from: usize, to: usize| {
        if from < to || piece == Piece::End {
            out.push((piece, from..to));
        }
    };
    while i < bytes.len() {
        match bytes[i] {
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < bytes.len() && bytes[i] != q {
                    i += 1 + usize::from(bytes[i] == b'\\');
                }
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                cut(&mut out, Piece::Text, start, i);
                start = i;
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                cut(&mut out, Piece::Comment, start, i);
                start = i;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                cut(&mut out, Piece::Text, start, i);
                start = i;
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i = (i + 2).min(bytes.len());
                cut(&mut out, Piece::Comment, start, i);
                start = i;
            }
            b';' => {
                cut(&mut out, Piece::Text, start, i);
                cut(&mut out, Piece::End, i, i + 1);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    let i = i.min(bytes.len());
    cut(&mut out, Piece::Text, start, i);
    cut(&mut out, Piece::End, i, i);
    out
}

/// `SET name=value` as Spark reads it: the name and the value (trimmed), for a plain name.
fn spark_set(statement: &str) -> Option<(&str, &str)> {
    let s = statement.trim();
    let rest = s.get(..4).filter(|k| k.eq_ignore_ascii_case("set ")).map(|_| s[4..].trim_start())?;
    let (name, value) = rest.split_once('=')?;
    let name = name.trim();
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    plain.then(|| (name, value.trim()))
}

/// `statement` with every `${name}` replaced by its value; `line` is where it starts.
fn substitute_vars(statement: &str, vars: &std::collections::BTreeMap<String, String>, line: usize) -> Result<String> {
    let mut out = String::with_capacity(statement.len());
    let mut rest = statement;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let close = rest[at..].find('}').map(|c| at + c);
        let name = close.map(|c| &rest[at + 2..c]).unwrap_or("");
        let line = line + statement[..statement.len() - rest.len() + at].matches('\n').count();
        let value = close.and(vars.get(name)).ok_or_else(|| JobError::Engine {
            what: "SQL".into(),
            reason: format!("`${{{name}}}` on line {line} is not set: put `SET {name}=…;` before it, or pass --define {name}=…"),
        })?;
        out.push_str(value);
        rest = &rest[close.map_or(rest.len(), |c| c + 1)..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Registers every table; returns their names.
async fn register(engine: &Engine, opts: &SqlOptions) -> Result<Vec<String>> {
    let root = Lake::open(&opts.lake, &opts.storage)?;
    let models = opts.models.as_deref().map(|m| Lake::open(m, &opts.storage)).transpose()?;
    let mut names = Vec::new();
    let mut all_batches = Vec::new();
    for p in &opts.pipelines {
        let lake = root.child(p.name());
        let manifests = lake.manifests().await?;
        let table = &p.definition.events.table;
        if names.contains(table) {
            return Err(JobError::Config { option: "pipeline", reason: format!("two pipelines name their events table `{table}`") });
        }
        let files = lake.event_files(&manifests).await?;
        if files.files.is_empty() {
            tracing::warn!(pipeline = p.name(), lake = lake.url(), "no committed batch yet: no `{table}` table");
            continue;
        }
        engine.register_events(table, &lake, &files, p.lake_schema()).await?;
        names.push(table.clone());
        all_batches.extend(manifests.into_iter().map(|m| (p.name().to_string(), m)));
        if let Some(models) = &models {
            let store = models.child(p.name());
            let Some(pointer) = latest(&store).await? else { continue };
            let bytes = store.get(&Path::from(format!("{}/{MODEL_FILE}", pointer.path))).await?;
            let artifact: ModelArtifact =
                serde_json::from_slice(&bytes).map_err(|e| JobError::Config { option: "models", reason: format!("{}: {e}", store.url_of(&pointer.path)) })?;
            for l in &artifact.lookups {
                let name = format!("lookup_{}", l.name);
                if names.contains(&name) {
                    tracing::warn!(pipeline = p.name(), table = name, "another pipeline's lookup has that name; skipped");
                    continue;
                }
                engine.register_parquet(&name, &[store.url_of(&format!("{}/{}", pointer.path, l.file))], None).await?;
                names.push(name);
            }
        }
    }
    // A view over literal rows, not an in-memory table: a cluster's scheduler can only be sent
    // plans it can serialise, and VALUES it can.
    let view = format!("CREATE VIEW batches AS {}", batches_sql(&all_batches));
    engine.context().sql(&view).await.map_err(engine_err("batches table"))?.collect().await.map_err(engine_err("batches table"))?;
    names.push("batches".into());
    Ok(names)
}

/// The committed batches of every pipeline as a query over literal rows.
fn batches_sql(batches: &[(String, BatchManifest)]) -> String {
    let text = |t: &str| format!("'{}'", t.replace('\'', "''"));
    let ts = |v: Option<i64>| v.map(|v| format!("CAST({v} AS BIGINT)")).unwrap_or_else(|| "CAST(NULL AS BIGINT)".into());
    let rows: Vec<String> = batches
        .iter()
        .map(|(p, m)| {
            let offsets = m.partitions.iter().map(|(p, r)| format!("{p}:{}-{}", r.first, r.last)).collect::<Vec<_>>().join(" ");
            format!(
                "({}, CAST({} AS BIGINT), {}, CAST({} AS BIGINT), CAST({} AS BIGINT), CAST({} AS BIGINT), {}, {}, {}, CAST({} AS BIGINT))",
                text(p),
                m.batch,
                text(&m.topic),
                m.files.len(),
                m.rows,
                m.dead_letter_count,
                text(&offsets),
                ts(m.min_ts),
                ts(m.max_ts),
                m.created_at_ms
            )
        })
        .collect();
    let columns = "pipeline, batch, topic, files, rows, dead_letters, offsets, min_ts, max_ts, created_at_ms";
    if rows.is_empty() {
        let none = "('', CAST(0 AS BIGINT), '', CAST(0 AS BIGINT), CAST(0 AS BIGINT), CAST(0 AS BIGINT), '', CAST(NULL AS BIGINT), CAST(NULL AS BIGINT), CAST(0 AS BIGINT))";
        return format!("SELECT * FROM (VALUES {none}) AS t({columns}) WHERE false");
    }
    format!("SELECT * FROM (VALUES {}) AS t({columns})", rows.join(", "))
}

/// Writes streamed batches to stdout in one format.
struct Sink {
    format: Format,
    table_rows: usize,
    shown: Vec<RecordBatch>,
    shown_rows: usize,
    csv_header: bool,
}

impl Sink {
    fn new(format: Format, table_rows: usize) -> Sink {
        Sink { format, table_rows, shown: Vec::new(), shown_rows: 0, csv_header: true }
    }

    fn write(&mut self, batch: &RecordBatch, out: &mut (dyn Write + Send)) -> Result<()> {
        let io = |e: std::io::Error| JobError::Internal(format!("write the result: {e}"));
        match self.format {
            Format::Csv => {
                let mut writer = datafusion::arrow::csv::WriterBuilder::new().with_header(self.csv_header).build(&mut *out);
                writer.write(batch).map_err(|e| JobError::Internal(format!("write CSV: {e}")))?;
                self.csv_header = false;
            }
            Format::Json => {
                let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(&mut *out);
                writer.write(batch).map_err(|e| JobError::Internal(format!("write JSON: {e}")))?;
                writer.finish().map_err(|e| JobError::Internal(format!("write JSON: {e}")))?;
            }
            Format::Table | Format::Parquet => {
                // Only the first rows are kept: a table is for reading, not for 10M rows.
                let room = self.table_rows.saturating_sub(self.shown_rows);
                if room > 0 {
                    let keep = batch.slice(0, room.min(batch.num_rows()));
                    self.shown_rows += keep.num_rows();
                    self.shown.push(keep);
                }
            }
        }
        out.flush().map_err(io)
    }

    fn finish(&mut self, rows: u64, out: &mut (dyn Write + Send)) -> Result<()> {
        if self.format != Format::Table {
            return Ok(());
        }
        let table = datafusion::arrow::util::pretty::pretty_format_batches(&self.shown).map_err(|e| JobError::Internal(format!("format the table: {e}")))?;
        let more = rows.saturating_sub(self.shown_rows as u64);
        let tail = if more > 0 { format!("\n{rows} rows ({more} not shown; --format csv|json or --out for all)") } else { format!("\n{rows} rows") };
        writeln!(out, "{table}{tail}").map_err(|e| JobError::Internal(format!("write the result: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_and_errors_name_the_position() {
        let none = std::collections::BTreeMap::new();
        let parts = split("CREATE VIEW v AS SELECT 1 AS x; SELECT x FROM v", &none).unwrap();
        assert_eq!(parts.len(), 2);
        let err = split("SELECT 1;\nSELEC x FROM t", &none).unwrap_err().to_string();
        assert!(err.contains("Line: 2, Column: 1"), "{err}");
    }

    #[test]
    fn variables_are_set_the_spark_way() {
        let defined = std::collections::BTreeMap::from([("floor".to_string(), "2".to_string())]);
        let sql = "SET prior = 3.5;\n-- a comment; with a semicolon and ${an unset name}\nSELECT ${prior} * x AS y, 'SET a=b; c' AS s FROM t WHERE x > ${floor};\nSET datafusion.execution.batch_size = 1024;\nSELECT 1";
        let parts = split(sql, &defined).unwrap();
        assert_eq!(parts.len(), 3, "{parts:?}");
        assert!(parts[0].contains("3.5 * x") && parts[0].contains("x > 2"), "{}", parts[0]);
        assert!(parts[0].contains("'SET a=b; c'"), "a `;` in a string splits nothing: {}", parts[0]);
        assert!(parts[1].to_lowercase().contains("datafusion.execution.batch_size"), "a dotted name stays a setting: {}", parts[1]);
        let err = split("SELECT 1;\nSELECT ${missing}", &defined).unwrap_err().to_string();
        assert!(err.contains("`${missing}` on line 2 is not set"), "{err}");
        // Positions in parse errors stay the file's, SET lines included.
        let err = split("SET a=1;\nSELECT ${a};\nSELEC 2", &defined).unwrap_err().to_string();
        assert!(err.contains("Line: 3, Column: 1"), "{err}");
    }
}
