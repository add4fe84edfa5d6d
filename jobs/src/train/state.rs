//! Carried state: what makes a round's cost follow its new events instead of all events.
//!
//! A feature SQL of the incremental form ([`Shape`]) computes, before its final SELECT, one
//! state row per event from strictly earlier events only, and no round's variables reach it.
//! So the state rows are kept in the model store from round to round (`_state/`), and a round:
//! 1. checks the carried state: its fingerprint (the state part of the SQL with its constants,
//!    and the event schema), that it holds only batches of this round, and every segment file's
//!    size and SHA-256. Anything off, or `train --full`, recomputes all state rows and says why;
//! 2. finds the stored rows the new events change: an entity's rows at or after its earliest
//!    new event, closed until every recomputed row's entities are cut at or before it (a late
//!    rating changes its movie's later ratings, whose residuals change their users' later
//!    ratings, …). On time-ordered input that is no stored row at all. When a few steps leave
//!    the closure holding most stored rows after the earliest cut, every entity is cut there;
//! 3. carries each entity's window aggregates over its kept rows (`SUM`, `COUNT`, `MIN`, `MAX`
//!    combine exactly) into the new and recomputed events, and runs the SQL's CTEs over those
//!    alone ([`Shape::batch_plan`]). An entity with no changed row keeps all its rows, whose
//!    aggregates the state keeps as per-entity totals; an entity with changed rows keeps those
//!    before its first changed row, whose aggregates that row holds (each window call's value
//!    is a hidden state column, `RAW`). So a round reads its changed rows and the totals, not
//!    the stored rows of its entities;
//! 4. writes the recomputed rows as a new segment, merges them into the totals and into the
//!    lookup tables' per-entity partial sums ([`lookup_plan`]; after late events, less the rows
//!    they replace), rewrites the segments they were taken from, then the state manifest (the
//!    commit point), then removes files no manifest names;
//! 5. evaluates the final SELECT, with this round's variables, over every state row: row by
//!    row, so the features equal a full recomputation's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use datafusion::common::tree_node::TreeNode;
use datafusion::config::TableParquetOptions;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{cast, ident, lit};
use futures::TryStreamExt;
use lensflow_core::BatchManifest;
use lensflow_core::model::sha256_hex;
use lensflow_core::pipeline::incremental::{BatchPlan, CARRIED, RAW, Shape, lookup_plan};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::Trainer;
use super::engine::engine_err;
use super::written::{checksum, read_back_write};
use crate::{JobError, Result};

/// The state folder, in a pipeline's model-store folder.
pub const STATE_DIR: &str = "_state";
/// The state manifest: written last, so it names only complete segment files.
pub const STATE_FILE: &str = "_state/STATE.json";
/// 2: state rows keep each window call's value (`RAW` columns).
const FORMAT: u32 = 2;
/// The column of a state row that names its segment.
const SEGMENT: &str = "__lensflow_segment";
/// Rows per segment file (about: the writer starts the next file once one passes it).
const FILE_ROWS: usize = 1_000_000;
/// Rows per row group of a segment file. The writer holds a row group's encoded pages, and a
/// zstd context per column sized to them, until the group is full: 128k rows cost 27 MiB more
/// than 16k do (1M ratings), for files 0.4% smaller.
const ROW_GROUP_ROWS: usize = 16 * 1024;
/// The closure of changed rows settles in a few steps on real data; a chain longer than this
/// means the late events reach nearly everything anyway.
const MAX_CLOSURE_STEPS: usize = 50;
/// Steps of the closure after which it may cut every entity at the earliest cut instead.
const WIDEN_AFTER: usize = 2;
const STATE: &str = "__lensflow_state";
/// The state files a fitting window can hold rows of.
const STATE_WINDOW: &str = "__lensflow_state_window";
const NEW: &str = "__lensflow_new";
const BATCH: &str = "__lensflow_batch";
const CHANGED: &str = "__lensflow_changed";
/// The stored rows a round recomputes, as they were before it.
const REPLACED: &str = "__lensflow_replaced";
/// The state rows a round wrote, as a table.
const WRITTEN: &str = "__lensflow_written";
/// The entity column of a cut, carried or totals table.
const KEY: &str = "__lensflow_key";

/// The carried state's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateManifest {
    /// Layout version.
    pub format: u32,
    /// What the rows were computed by: the state part of the feature SQL, its constants and
    /// the event schema.
    pub fingerprint: String,
    /// The batches whose events the rows are.
    pub batches: Vec<u64>,
    /// The segment files.
    pub files: Vec<SegmentFile>,
    /// Per entity column of the feature SQL's windows (in their first-use order), the files of
    /// each entity's carried aggregates over all its rows: what a round whose events change no
    /// stored row carries, instead of reading every stored row of its entities.
    #[serde(default)]
    pub totals: Vec<Vec<SegmentFile>>,
    /// The lookup tables carried as per-entity partial aggregates (those whose SQL allows it).
    #[serde(default)]
    pub lookups: Vec<CarriedLookup>,
}

/// A lookup table's per-entity partial aggregates over every state row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarriedLookup {
    /// The lookup's name.
    pub name: String,
    /// The SQL that computes the partial aggregates from state rows: a changed lookup SQL
    /// starts them again from every row.
    pub sql: String,
    /// Their files.
    pub files: Vec<SegmentFile>,
}

/// What [`features`] registered for the round.
pub struct Registered {
    /// How the round came by its state rows.
    pub report: StateReport,
    /// SQL giving every event's features, when `features` holds only the window's rows.
    pub all_rows: Option<String>,
    /// Per lookup carried in the state, the SQL of its table (from its registered partial
    /// aggregates).
    pub lookups: BTreeMap<String, String>,
}

/// One Parquet file of state rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentFile {
    /// The segment (the round that computed its rows).
    pub segment: u64,
    /// Path in the pipeline's model-store folder.
    pub path: String,
    /// Rows.
    pub rows: u64,
    /// Bytes.
    pub bytes: u64,
    /// SHA-256 of the bytes.
    pub sha256: String,
    /// The newest batch of the round that wrote the file: its rows are events of that batch or
    /// older ones, so a fitting window that starts after it needs none of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_batch: Option<u64>,
}

/// How a round came by its state rows, as its report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateReport {
    /// `incremental` or `full`.
    pub mode: &'static str,
    /// Why a round recomputed everything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Events of batches new to the state.
    pub new_events: u64,
    /// Stored rows the new events changed, computed again.
    pub recomputed: u64,
    /// State rows after the round.
    pub rows: u64,
    /// Whether no stored row changed, so that every carried aggregate came from the
    /// per-entity totals.
    pub from_totals: bool,
}

/// Registers `features` (and `features_round`) for this round from carried state, carrying
/// it forward with the lookups' partial aggregates; `sql` is the feature SQL with this round's
/// values substituted. With a `window`, `features` holds only the rows it keeps.
pub async fn features(
    t: &Trainer<'_>,
    shape: &Shape,
    manifests: &[BatchManifest],
    sql: &str,
    work_url: &str,
    window: Option<&super::Window>,
) -> Result<Registered> {
    let engine = t.engine;
    let round = manifests.len() as u64;
    let err = |e: String| JobError::Engine { what: "incremental feature SQL".into(), reason: e };
    let state_sql = shape.state_sql(sql).map_err(err)?;
    let planned = engine.context().sql(&state_sql).await.map_err(engine_err("state rows"))?;
    let columns: Vec<String> = planned.schema().fields().iter().map(|f| f.name().clone()).collect();
    let mut fields = nullable_fields(&planned);
    fields.push(Field::new(SEGMENT, DataType::Int64, false));
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let fingerprint = sha256_hex(format!("{FORMAT}\n{state_sql}\n{:?}", t.pipeline.lake_schema()).as_bytes());

    let plan = shape.batch_plan(sql, BATCH, &columns).map_err(err)?;
    let carried = match t.full {
        true => Err("train --full".to_string()),
        false => load(t, &fingerprint, manifests).await,
    };
    let old_lookups = carried.as_ref().map(|s| s.lookups.clone()).unwrap_or_default();
    let (mut files, totals, report) = match carried {
        Ok(state) => match advance(t, shape, &plan, manifests, &state, &schema).await? {
            Ok(advanced) => advanced,
            Err(reason) => recompute(t, &plan, &state_sql, round, &schema, reason).await?,
        },
        Err(reason) => recompute(t, &plan, &state_sql, round, &schema, reason).await?,
    };
    match &report.reason {
        // The first round, --full and widespread late events are normal; anything else is not.
        Some(reason) if reason == "no carried state yet" || reason == "train --full" || reason.starts_with("late events") => {
            tracing::info!(round, reason = reason.as_str(), rows = report.rows, "state: full recomputation")
        }
        Some(reason) => tracing::warn!(round, reason = reason.as_str(), rows = report.rows, "state: full recomputation"),
        None => tracing::info!(round, new = report.new_events, recomputed = report.recomputed, rows = report.rows, "state: carried forward"),
    }
    // Every file's rows are events of this round's batches; a file written before this field
    // existed gets the newest batch as its bound, which is true of it and prunes nothing.
    let newest = manifests.last().map(|m| m.batch);
    for f in &mut files {
        f.newest_batch = f.newest_batch.or(newest);
    }
    register_files(t, STATE, &files, &schema).await?;
    let (lookups, lookup_sql) = carry_lookups(t, shape, &old_lookups, &report, round).await?;
    // The work tables (cuts, replaced rows) were read for the last time.
    super::remove_prefix(t.store, "_work/state").await?;
    let manifest = StateManifest { format: FORMAT, fingerprint, batches: manifests.iter().map(|m| m.batch).collect(), files, totals, lookups };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| JobError::Internal(e.to_string()))?;
    t.store.put(STATE_FILE, Bytes::from(json)).await?;
    let named: BTreeSet<&str> =
        manifest.files.iter().chain(manifest.totals.iter().flatten()).chain(manifest.lookups.iter().flat_map(|l| &l.files)).map(|f| f.path.as_str()).collect();
    for path in t.store.list(STATE_DIR).await? {
        if path.as_ref() != STATE_FILE && !named.contains(path.as_ref()) {
            t.store.delete(path.as_ref()).await?;
        }
    }

    let final_sql = shape.final_sql(sql, STATE, &columns).map_err(err)?;
    let Some(window) = window else {
        engine.materialise("feature SQL", &final_sql, work_url, &["features", "features_round"]).await?;
        return Ok(Registered { report, all_rows: None, lookups: lookup_sql });
    };
    // Only the window's rows are materialised: the rest are read again only by the lookups
    // not carried in the state, which need few of their columns. Files written before the
    // window's first batch hold none of its events and are left out of the scan: as segments
    // pile up, the scan then opens the window's files only, not one more file every round.
    // The final SELECT is row by row (`Shape` refuses a window function there), so reading
    // fewer rows changes no row it keeps.
    let first = manifests.get(window.first_batch.saturating_sub(1) as usize).map_or(0, |m| m.batch);
    let in_window: Vec<SegmentFile> = files_in_window(&manifest.files, first);
    register_files(t, STATE_WINDOW, &in_window, &schema).await?;
    let windowed_sql = shape.final_sql(sql, STATE_WINDOW, &columns).map_err(err)?;
    let windowed = format!("SELECT * FROM ({windowed_sql}) w WHERE {}", window.filter);
    engine.materialise("feature SQL", &windowed, work_url, &["features", "features_round"]).await?;
    Ok(Registered { report, all_rows: Some(final_sql), lookups: lookup_sql })
}

/// Brings each lookup's partial aggregates up to date and registers them; returns them and the
/// SQL of each lookup table over them. The last round's are merged with the rows just written,
/// less (after late events) the stored rows they replace, when that can be done exactly; else
/// they are computed from every state row. A lookup whose SQL cannot be carried (see
/// [`lookup_plan`]) is left out, and is computed from `features` as before.
async fn carry_lookups(
    t: &Trainer<'_>,
    shape: &Shape,
    old: &[CarriedLookup],
    report: &StateReport,
    round: u64,
) -> Result<(Vec<CarriedLookup>, BTreeMap<String, String>)> {
    let (mut carried, mut finishes) = (Vec::new(), BTreeMap::new());
    let carried_forward = report.mode == "incremental";
    for (i, l) in t.pipeline.definition.lookups.iter().enumerate() {
        let table = format!("__lensflow_lookup{i}");
        let plan = |rows: &str| lookup_plan(t.pipeline.sql_text(&l.sql), &l.key, rows, &table, &shape.reads);
        let Ok(from_state) = plan(STATE) else { continue };
        // Only a lookup over state columns can be carried: those stay the same in every round.
        let Ok(planned) = t.engine.context().sql(&from_state.partial).await else { continue };
        let schema: SchemaRef = Arc::new(Schema::new(nullable_fields(&planned)));
        // A SELECT list with another aggregate (AVG, …) would still aggregate the partial rows.
        register_files(t, &table, &[], &schema).await?;
        let Ok(finish) = t.engine.context().sql(&from_state.finish).await else { continue };
        if finish.logical_plan().exists(|p| Ok(matches!(p, LogicalPlan::Aggregate(_)))).unwrap_or(true) {
            continue;
        }
        let what = format!("lookup {}", l.name);
        let previous = old.iter().find(|o| o.name == l.name && o.sql == from_state.partial).filter(|_| carried_forward);
        let mut parts = Vec::new();
        if let Some(previous) = previous {
            let last = format!("__lensflow_lookup_last{i}");
            register_files(t, &last, &previous.files, &schema).await?;
            let engine_err = |reason| JobError::Engine { what: what.clone(), reason };
            parts.push(format!("SELECT * FROM {last}"));
            // A round tried again after its state was written wrote no rows.
            if report.from_totals || report.recomputed > 0 {
                parts.push(plan(WRITTEN).map_err(engine_err)?.partial);
            }
            if report.recomputed > 0 {
                match plan(REPLACED).map_err(engine_err)?.retracting() {
                    Some(retracting) => parts.push(retracting),
                    None => parts.clear(),
                }
            }
        }
        let sql = if parts.is_empty() { from_state.partial.clone() } else { from_state.merge_sql(&parts) };
        let what = format!("{what} partials");
        let files = write_files(t, &what, &sql, &format!("l{i}-{round:05}"), round, &schema).await?;
        register_files(t, &table, &files, &schema).await?;
        finishes.insert(l.name.clone(), from_state.finish.clone());
        carried.push(CarriedLookup { name: l.name.clone(), sql: from_state.partial, files });
    }
    Ok((carried, finishes))
}

/// The carried state, if it is there, whole, and made by this SQL from batches of this round.
async fn load(t: &Trainer<'_>, fingerprint: &str, manifests: &[BatchManifest]) -> Result<StateManifest, String> {
    let store = t.store;
    let bytes = match store.get(&Path::from(STATE_FILE)).await {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Err("no carried state yet".into()),
        Err(e) => return Err(format!("the carried state is unreadable: {e}")),
    };
    let state: StateManifest = serde_json::from_slice(&bytes).map_err(|e| format!("the carried state's {STATE_FILE} is damaged: {e}"))?;
    if state.format != FORMAT || state.fingerprint != fingerprint {
        return Err("the feature SQL, its constants or the event schema changed since the state was computed".into());
    }
    let round: BTreeSet<u64> = manifests.iter().map(|m| m.batch).collect();
    if let Some(b) = state.batches.iter().find(|b| !round.contains(b)) {
        return Err(format!("the carried state holds batch {b}, which this round does not"));
    }
    // Each file is read whole once per trainer: a watching trainer checks only what it did not
    // write or check itself, so a round's cost stays with its new rows.
    let verified = |f: &SegmentFile| t.verified.lock().is_ok_and(|v| v.contains(&f.sha256));
    let lookup_files = state.lookups.iter().flat_map(|l| &l.files);
    for f in state.files.iter().chain(state.totals.iter().flatten()).chain(lookup_files.clone()).filter(|f| !verified(f)) {
        let (bytes, sha256) = checksum(store, &f.path).await.map_err(|e| format!("state segment {} is missing: {e}", f.path))?;
        if bytes != f.bytes || sha256 != f.sha256 {
            return Err(format!("state segment {} is damaged: its bytes do not match the checksum in {STATE_FILE}", f.path));
        }
        remember(t, f);
    }
    // A file checked earlier must still be there, with its size.
    for f in state.files.iter().chain(state.totals.iter().flatten()).chain(lookup_files) {
        match store.store().head(&Path::from(f.path.as_str())).await {
            Ok(meta) if meta.size == f.bytes => {}
            Ok(meta) => return Err(format!("state segment {} is damaged: {} bytes, not {}", f.path, meta.size, f.bytes)),
            Err(e) => return Err(format!("state segment {} is missing: {e}", f.path)),
        }
    }
    Ok(state)
}

/// A round's segment files, per-entity totals and report.
type Advanced = (Vec<SegmentFile>, Vec<Vec<SegmentFile>>, StateReport);

/// Every state row computed again from all of the round's events, and the totals from them.
async fn recompute(t: &Trainer<'_>, plan: &BatchPlan, state_sql: &str, round: u64, schema: &SchemaRef, reason: String) -> Result<Advanced> {
    let files = write_segment(t, "state rows", state_sql, round, schema).await?;
    register_files(t, STATE, &files, schema).await?;
    let mut totals = Vec::new();
    for (j, (key, aggregates)) in plan.carried.iter().enumerate() {
        let schema = totals_schema(t, key, aggregates).await?;
        totals.push(write_totals(t, j, &totals_sql(key, aggregates), round, &schema).await?);
    }
    let rows = files.iter().map(|f| f.rows).sum();
    Ok((files, totals, StateReport { mode: "full", reason: Some(reason), new_events: rows, recomputed: 0, rows, from_totals: false }))
}

/// An entity column's totals over every registered state row.
fn totals_sql(key: &str, aggregates: &[String]) -> String {
    format!("SELECT {key} AS {KEY}, {} FROM {STATE} GROUP BY {key}", aggregates.join(", "))
}

/// The schema of an entity column's totals (planned over the registered state rows).
async fn totals_schema(t: &Trainer<'_>, key: &str, aggregates: &[String]) -> Result<SchemaRef> {
    let planned = t.engine.context().sql(&totals_sql(key, aggregates)).await.map_err(engine_err("entity totals"))?;
    Ok(Arc::new(Schema::new(nullable_fields(&planned))))
}

/// A planned query's columns, each nullable: the files written from it may hold NULLs where
/// the plan says none (an outer join, an empty group), and are read back in this schema.
fn nullable_fields(planned: &datafusion::dataframe::DataFrame) -> Vec<Field> {
    planned.schema().fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect()
}

/// Writes entity column `j`'s totals, the rows of `sql`, as files of round `round`.
async fn write_totals(t: &Trainer<'_>, j: usize, sql: &str, round: u64, schema: &SchemaRef) -> Result<Vec<SegmentFile>> {
    let what = "entity totals";
    write_files(t, what, sql, &format!("t{j}-{round:05}"), round, schema).await
}

/// The totals table of entity column `j`.
fn totals_table(j: usize) -> String {
    format!("__lensflow_totals{j}")
}

/// The state carried forward over the new batches; `Err` says why recomputing everything is
/// the better way (late events reaching most stored rows).
async fn advance(
    t: &Trainer<'_>,
    shape: &Shape,
    plan: &BatchPlan,
    manifests: &[BatchManifest],
    state: &StateManifest,
    schema: &SchemaRef,
) -> Result<std::result::Result<Advanced, String>> {
    let (engine, round) = (t.engine, manifests.len() as u64);
    let stored_rows: u64 = state.files.iter().map(|f| f.rows).sum();
    let known: BTreeSet<u64> = state.batches.iter().copied().collect();
    let new_batches: Vec<BatchManifest> = manifests.iter().filter(|m| !known.contains(&m.batch)).cloned().collect();
    let new = t.lake.event_files(&new_batches).await?;
    if new.files.is_empty() {
        // A round tried again after its state was written: nothing to add.
        let report = StateReport { mode: "incremental", reason: None, new_events: 0, recomputed: 0, rows: stored_rows, from_totals: false };
        return Ok(Ok((state.files.clone(), state.totals.clone(), report)));
    }
    if state.totals.len() != plan.carried.len() {
        return Ok(Err("the carried state has no per-entity totals (an earlier lensflow wrote it)".into()));
    }
    register_files(t, STATE, &state.files, schema).await?;
    let mut totals_schemas = Vec::new();
    for (j, (key, aggregates)) in plan.carried.iter().enumerate() {
        let totals_schema = totals_schema(t, key, aggregates).await?;
        register_files(t, &totals_table(j), &state.totals[j], &totals_schema).await?;
        totals_schemas.push(totals_schema);
    }
    engine.register_events(NEW, t.lake, &new, t.pipeline.lake_schema()).await?;
    // Work tables of an earlier round (or a crashed attempt) must not be read as this round's.
    super::remove_prefix(t.store, "_work/state").await?;
    let time = t.pipeline.definition.events.time.as_deref().unwrap_or_default();
    let work = |name: &str| format!("{}/", t.store.url_of(&format!("_work/state/{name}")));

    // The stored rows the new events change: cut each entity at its earliest changed row,
    // until the cuts hold every changed row's entities.
    let mut cuts = Cuts::new(plan, time);
    let mut changed = 0u64;
    if !plan.carried.is_empty() {
        for (j, (key, _)) in plan.carried.iter().enumerate() {
            let sql = format!("SELECT {key} AS __lensflow_key, MIN({time}) AS __lensflow_cut FROM {NEW} GROUP BY {key}");
            engine.materialise("state cuts", &sql, &work(&format!("cut{j}")), &[&Cuts::table(j)]).await?;
        }
        cuts.settle(engine).await?;
        // Each step reads the stored rows once: the changed rows' keys and times, from which
        // every key's cuts are widened.
        let keys: Vec<String> = plan.carried.iter().map(|(key, _)| format!("s.{key}")).collect();
        let (mut steps, mut widened) = (0, false);
        loop {
            let sql = format!("SELECT {}, s.{time} FROM {STATE} s {} WHERE {}", keys.join(", "), cuts.joins, cuts.changed);
            engine.materialise("changed state rows", &sql, &work(&format!("changed-{steps}")), &[CHANGED]).await?;
            let count = engine.query_row("changed state rows", &format!("SELECT COUNT(*) FROM {CHANGED}")).await?[0] as u64;
            let settled = count == changed || widened;
            changed = count;
            if changed as f64 > t.full_above * stored_rows as f64 {
                return Ok(Err(format!("late events change {changed} of the {stored_rows} stored state rows")));
            }
            if settled {
                break;
            }
            steps += 1;
            if steps > MAX_CLOSURE_STEPS {
                return Ok(Err(format!("the rows that late events change still grow after {MAX_CLOSURE_STEPS} steps")));
            }
            // Each step costs a read of the stored rows after the earliest cut. Once the
            // closure holds most of them, cutting every entity there costs less than the steps
            // left (on well-connected entities, a movie's raters, it reaches nearly all of them).
            if steps > WIDEN_AFTER {
                let sql = format!("SELECT COUNT(*) FROM {STATE} WHERE {time} >= {}", cuts.floor);
                let after = engine.query_row("stored rows after the earliest cut", &sql).await?[0] as u64;
                widened = 2 * changed >= after;
            }
            for (j, (key, _)) in plan.carried.iter().enumerate() {
                // Every entity with a row at or after the earliest cut is cut there once the
                // closure widens: closed at once, since every stored row from then on is
                // recomputed.
                let floor = cuts.floor;
                let rows = match widened {
                    true => {
                        format!("SELECT {key} AS k, {floor} AS t FROM {NEW} UNION ALL SELECT {key} AS k, {floor} AS t FROM {STATE} WHERE {time} >= {floor}")
                    }
                    false => format!("SELECT {key} AS k, {time} AS t FROM {NEW} UNION ALL SELECT {key} AS k, {time} AS t FROM {CHANGED}"),
                };
                let sql = format!("SELECT k AS __lensflow_key, MIN(t) AS __lensflow_cut FROM ({rows}) u GROUP BY k");
                engine.materialise("state cuts", &sql, &work(&format!("cut{j}-{steps}")), &[&Cuts::table(j)]).await?;
            }
            cuts.settle(engine).await?;
        }
    }
    if changed > 0 {
        // The changed rows, read once more whole: what the batch recomputes, where each
        // entity's carried aggregates are, and (in the lookups) what leaves the partial sums.
        let sql = format!("SELECT s.* FROM {STATE} s {} WHERE {}", cuts.joins, cuts.changed);
        engine.materialise("replaced state rows", &sql, &work("replaced"), &[REPLACED]).await?;
    }

    // Carried aggregates over each entity's kept rows, joined onto the batch's events.
    let reads = shape.reads.join(", ");
    let mut batch = "SELECT e.*".to_string();
    let mut joins = String::new();
    for (j, (key, aggregates)) in plan.carried.iter().enumerate() {
        let table = format!("__lensflow_carried{j}");
        // An entity's rows before its cut are exactly its kept rows, and only entities with a
        // cut have events in the batch. When no stored row is at or after its cut, those are
        // all of its rows: its totals. Else they are the rows before its first changed row,
        // whose window values (the `RAW` columns; equal on rows of the same time) are their
        // aggregates.
        let (cut, totals) = (Cuts::table(j), totals_table(j));
        let from_totals = format!("SELECT t.* FROM {totals} t JOIN {cut} c ON t.{KEY} IS NOT DISTINCT FROM c.{KEY}");
        let sql = match changed {
            0 => from_totals,
            _ => {
                let raw = plan.calls[j].iter().map(|i| format!("MAX(r.{RAW}{i}) AS {CARRIED}{i}")).collect::<Vec<_>>().join(", ");
                let columns = plan.calls[j].iter().map(|i| format!("{CARRIED}{i}")).collect::<Vec<_>>().join(", ");
                format!(
                    "WITH f AS (SELECT r.{key} AS {KEY}, {raw}, 1 AS __lensflow_first FROM {REPLACED} r \
                     JOIN (SELECT {key} AS k, MIN({time}) AS t0 FROM {REPLACED} GROUP BY {key}) m \
                     ON (r.{key} IS NOT DISTINCT FROM m.k) AND r.{time} = m.t0 GROUP BY r.{key}) \
                     SELECT {KEY}, {columns} FROM f UNION ALL {from_totals} \
                     LEFT JOIN f ON t.{KEY} IS NOT DISTINCT FROM f.{KEY} WHERE f.__lensflow_first IS NULL"
                )
            }
        };
        engine.materialise("carried state", &sql, &work(&table), &[&table]).await?;
        for a in aggregates {
            let column = a.rsplit(" AS ").next().unwrap_or_default();
            batch += &format!(", a{j}.{column}");
        }
        joins += &format!(" LEFT JOIN {table} a{j} ON e.{key} IS NOT DISTINCT FROM a{j}.__lensflow_key");
    }
    let stored_part = if changed == 0 { String::new() } else { format!(" UNION ALL SELECT {reads} FROM {REPLACED}") };
    batch += &format!(" FROM (SELECT {reads} FROM {NEW}{stored_part}) e{joins}");
    engine.materialise("batch events", &batch, &work(BATCH), &[BATCH]).await?;

    let mut files: Vec<SegmentFile> = write_segment(t, "new state rows", &plan.sql, round, schema).await?;
    let new_rows: u64 = files.iter().map(|f| f.rows).sum();
    // Each entity's totals: unchanged without a cut; else its kept rows' (the carried table)
    // with the rows just written.
    register_files(t, WRITTEN, &files, schema).await?;
    let mut totals = Vec::new();
    for (j, (key, aggregates)) in plan.carried.iter().enumerate() {
        let (cut, merged) = (Cuts::table(j), plan.merged[j].join(", "));
        let sql = format!(
            "SELECT {KEY}, {merged} FROM (\
             SELECT t.* FROM {} t LEFT JOIN {cut} c ON t.{KEY} IS NOT DISTINCT FROM c.{KEY} WHERE c.__lensflow_cut IS NULL \
             UNION ALL SELECT * FROM __lensflow_carried{j} \
             UNION ALL SELECT {key} AS {KEY}, {} FROM {WRITTEN} GROUP BY {key}) u GROUP BY {KEY}",
            totals_table(j),
            aggregates.join(", ")
        );
        totals.push(write_totals(t, j, &sql, round, &totals_schemas[j]).await?);
    }
    // Segments that lost rows to the recomputation are written again without them.
    let mut touched = BTreeSet::new();
    if changed > 0 {
        let counts = engine.query("touched segments", &format!("SELECT DISTINCT {SEGMENT} FROM {REPLACED}")).await?;
        for b in &counts {
            touched.extend((0..b.num_rows()).map(|r| super::engine::number(b, 0, r).unwrap_or(0.0) as u64));
        }
        for segment in &touched {
            let kept = format!("SELECT s.* FROM {STATE} s {} WHERE s.{SEGMENT} = {segment} AND NOT {}", cuts.joins, cuts.changed);
            files.extend(write_segment(t, "kept state rows", &kept, *segment, schema).await?);
        }
    }
    files.extend(state.files.iter().filter(|f| !touched.contains(&f.segment)).cloned());
    files.sort_by(|a, b| (a.segment, &a.path).cmp(&(b.segment, &b.path)));
    let rows = files.iter().map(|f| f.rows).sum();
    let report =
        StateReport { mode: "incremental", reason: None, new_events: new_rows.saturating_sub(changed), recomputed: changed, rows, from_totals: changed == 0 };
    Ok(Ok((files, totals, report)))
}

/// The joins and condition that pick the stored rows at or after their entities' cuts.
struct Cuts {
    joins: String,
    /// Whether a stored row is at or after one of its entities' cuts.
    any: String,
    time: String,
    keys: usize,
    /// `any`, behind the earliest cut as a constant, which skips the Parquet row groups of
    /// segments older than every cut.
    changed: String,
    /// The earliest cut.
    floor: i64,
}

impl Cuts {
    fn new(plan: &BatchPlan, time: &str) -> Cuts {
        let mut joins = String::new();
        let mut any = Vec::new();
        for (j, (key, _)) in plan.carried.iter().enumerate() {
            joins += &format!(" LEFT JOIN {} c{j} ON s.{key} IS NOT DISTINCT FROM c{j}.__lensflow_key", Cuts::table(j));
            any.push(format!("COALESCE(s.{time} >= c{j}.__lensflow_cut, FALSE)"));
        }
        let any = if any.is_empty() { "FALSE".to_string() } else { format!("({})", any.join(" OR ")) };
        Cuts { joins, changed: any.clone(), any, time: time.to_string(), keys: plan.carried.len(), floor: i64::MIN }
    }

    /// Reads the earliest cut once the cut tables are (re)made.
    async fn settle(&mut self, engine: &super::engine::Engine) -> Result<()> {
        if self.keys == 0 {
            return Ok(());
        }
        let all = (0..self.keys).map(|j| format!("SELECT MIN(__lensflow_cut) AS c FROM {}", Cuts::table(j))).collect::<Vec<_>>().join(" UNION ALL ");
        self.floor = engine.query_row("earliest cut", &format!("SELECT MIN(c) FROM ({all}) u")).await?[0] as i64;
        self.changed = format!("(s.{} >= {} AND {})", self.time, self.floor, self.any);
        Ok(())
    }

    fn table(j: usize) -> String {
        format!("__lensflow_cut{j}")
    }
}

/// Registers `files` of the model store as table `name` (empty, in `schema`, without files).
async fn register_files(t: &Trainer<'_>, name: &str, files: &[SegmentFile], schema: &SchemaRef) -> Result<()> {
    if files.is_empty() {
        let empty = datafusion::datasource::MemTable::try_new(schema.clone(), vec![vec![]]).map_err(engine_err(name))?;
        let ctx = t.engine.context();
        ctx.deregister_table(name).map_err(engine_err(name))?;
        ctx.register_table(name, Arc::new(empty)).map_err(engine_err(name))?;
        return Ok(());
    }
    let urls: Vec<String> = files.iter().map(|f| t.store.url_of(&f.path)).collect();
    t.engine.register_parquet(name, &urls, Some(schema.clone())).await
}

/// Runs `sql` and writes its rows as segment `segment`'s files, in the state schema.
async fn write_segment(t: &Trainer<'_>, what: &str, sql: &str, segment: u64, schema: &SchemaRef) -> Result<Vec<SegmentFile>> {
    write_files(t, what, sql, &format!("s{segment:05}"), segment, schema).await
}

/// Writes `sql`'s rows, in `schema`, as segment `segment`'s files in the folder
/// `_state/{name}-…/`. The engine writes them (on a cluster, the executors), and the trainer
/// reads each back once to checksum it: no state row is held here, whatever the lake's size.
async fn write_files(t: &Trainer<'_>, what: &str, sql: &str, name: &str, segment: u64, schema: &SchemaRef) -> Result<Vec<SegmentFile>> {
    let folder = format!("{STATE_DIR}/{name}-{}", lensflow_core::now_ms());
    let select = schema
        .fields()
        .iter()
        .map(|f| match f.name() == SEGMENT {
            true => lit(segment as i64).alias(SEGMENT),
            false => cast(ident(f.name()), f.data_type().clone()).alias(f.name()),
        })
        .collect();
    // State columns are mostly distinct doubles: dictionary pages would be tried and thrown
    // away for each. Small row groups give the pruning by time that late events rely on
    // finer steps, and bound what the writer holds.
    let mut options = TableParquetOptions::default();
    options.global.compression = Some("zstd(1)".into());
    options.global.dictionary_enabled = Some(false);
    options.global.max_row_group_size = ROW_GROUP_ROWS;
    let url = format!("{}/", t.store.url_of(&folder));
    let written = t.engine.write_parquet(what, sql, Some(select), &url, Some(FILE_ROWS), options).await?;

    let listed: Vec<object_store::ObjectMeta> =
        t.store.store().list(Some(&Path::from(folder.as_str()))).try_collect().await.map_err(|e| JobError::Internal(format!("listing {url}: {e}")))?;
    let mut paths: Vec<String> = listed.into_iter().map(|meta| meta.location.to_string()).collect();
    paths.sort();
    let mut files = Vec::new();
    for done in read_back_write(t.store, what, &url, written, &paths).await? {
        let file = SegmentFile { segment, path: done.path, rows: done.rows, bytes: done.bytes, sha256: done.sha256, newest_batch: None };
        remember(t, &file);
        files.push(file);
    }
    // An empty result may leave an empty file, which no reader needs.
    files.retain(|f| f.rows > 0);
    Ok(files)
}

/// The files that may hold events of batch `first` or newer: those written by a round whose
/// newest batch was `first` or later, and those of unknown age.
fn files_in_window(files: &[SegmentFile], first: u64) -> Vec<SegmentFile> {
    files.iter().filter(|f| f.newest_batch.is_none_or(|b| b >= first)).cloned().collect()
}

fn remember(t: &Trainer<'_>, file: &SegmentFile) {
    if let Ok(mut v) = t.verified.lock() {
        v.insert(file.sha256.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consume::{commit::commit_batch, offsets::LakeOffsets, writer::Batch};
    use crate::train::engine::{Engine, number};
    use lensflow_core::pipeline::substitute;
    use lensflow_core::{Lake, Pipeline, StorageOptions};
    use rand::SeedableRng;
    use rand::seq::SliceRandom;

    /// A lake of `lines` (MovieLens CSV, header first) committed as `batches` batches, in order.
    async fn lake_of(pipeline: &Pipeline, dir: &std::path::Path, lines: &[&str], batches: usize) -> Lake {
        let lake = Lake::open(dir.join("lake").to_str().unwrap(), &StorageOptions::default()).unwrap().child(pipeline.name());
        let layout = pipeline.csv_layout(lines[0].split(',').map(str::as_bytes)).unwrap();
        let rows = &lines[1..];
        let mut offsets = LakeOffsets::new("t");
        for (b, chunk) in rows.chunks(rows.len().div_ceil(batches)).enumerate() {
            let mut batch = Batch::new(pipeline);
            for (i, line) in chunk.iter().enumerate() {
                let fields: Vec<&[u8]> = line.split(',').map(str::as_bytes).collect();
                let event = pipeline.event_from_csv(&layout, fields.into_iter()).unwrap();
                batch.partition(0).push_event((b * rows.len() + i) as i64, &event);
            }
            commit_batch(&lake, &mut offsets, &batch, "t", "w").await.unwrap();
        }
        lake
    }

    /// Every numeric column of `relation` (a table, or a query in parentheses), rows in the
    /// order of their values.
    async fn table(engine: &Engine, relation: &str) -> Vec<Vec<f64>> {
        let schema = engine.query("columns", &format!("SELECT * FROM {relation} f LIMIT 1")).await.unwrap()[0].schema();
        let numeric: Vec<String> = schema.fields().iter().filter(|f| f.data_type().is_numeric()).map(|f| format!("\"{}\"", f.name())).collect::<Vec<_>>();
        let list = numeric.join(", ");
        let batches = engine.query("features", &format!("SELECT {list} FROM {relation} f ORDER BY {list}")).await.unwrap();
        batches.iter().flat_map(|b| (0..b.num_rows()).map(move |r| (0..b.num_columns()).map(|c| number(b, c, r).unwrap()).collect())).collect()
    }

    fn assert_close(what: &str, a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }

    struct Outcome {
        features: Vec<Vec<f64>>,
        /// The feature SQL's own answer, run as it is.
        direct: Vec<Vec<f64>>,
        fitted: Vec<f64>,
        report: Option<StateReport>,
    }

    /// One round's features, regression and classification coefficients and hold-out metrics.
    async fn round(pipeline: &Pipeline, engine: &Engine, lake: &Lake, store: &Lake, full: bool, manifests: &[BatchManifest]) -> Outcome {
        let serving = pipeline.check_sql().await.unwrap().serving;
        let t = Trainer {
            pipeline,
            engine,
            lake,
            store,
            serving,
            shape: Some(pipeline.incremental_shape().unwrap()),
            full,
            full_above: 1.0,
            window: None,
            verified: Default::default(),
        };
        let prep = t.prepare(manifests).await.unwrap();
        let regression = t.fit_regression(&prep).await.unwrap();
        let classification = t.fit_classification(&prep).await.unwrap();
        let m = t.evaluate(&prep, &regression, &classification).await.unwrap();
        let mut fitted = vec![regression.intercept, classification.intercept, m.rmse, m.mae, m.auc, m.accuracy, m.r2];
        fitted.extend(regression.coefficients.iter().chain(&classification.coefficients));
        fitted.extend(prep.scaling.mean.iter().chain(&prep.scaling.scale));
        // Every lookup is carried as partial sums, and gives what its SQL gives over `features`.
        assert_eq!(prep.lookups.len(), pipeline.definition.lookups.len());
        for l in &pipeline.definition.lookups {
            let carried = table(engine, &format!("({})", prep.lookups[&l.name])).await;
            let own = table(engine, &format!("({})", substitute(pipeline.sql_text(&l.sql), &prep.variables))).await;
            assert_eq!(carried.len(), own.len(), "lookup {}", l.name);
            for (i, (x, y)) in carried.iter().zip(&own).enumerate() {
                assert_close(&format!("lookup {} row {i}", l.name), x, y);
            }
        }
        let direct = format!("({})", substitute(pipeline.features_sql(), &prep.variables));
        Outcome { features: table(engine, "features").await, direct: table(engine, &direct).await, fitted, report: prep.state }
    }

    /// Trains every round of `lines` in `batches` batches twice, carrying state and recomputing
    /// everything, and requires the same features, models and metrics; the full path must give
    /// the feature SQL's own answer. Returns each carried round's report.
    async fn carried_equals_full(pipeline: &str, lines: &[&str], batches: usize) -> Vec<StateReport> {
        let pipeline = Pipeline::builtin(pipeline).unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let lake = lake_of(&pipeline, dir.path(), lines, batches).await;
        let models = |name: &str| Lake::open(dir.path().join(name).to_str().unwrap(), &StorageOptions::default()).unwrap().child(pipeline.name());
        let (carried_store, full_store) = (models("carried"), models("full"));
        let (carried, full) = (Engine::local(2).unwrap(), Engine::local(2).unwrap());
        let manifests = lake.manifests().await.unwrap();
        let mut reports = Vec::new();
        for r in 1..=manifests.len() {
            let a = round(&pipeline, &carried, &lake, &carried_store, false, &manifests[..r]).await;
            let b = round(&pipeline, &full, &lake, &full_store, true, &manifests[..r]).await;
            assert_eq!(b.report.as_ref().map(|s| s.mode), Some("full"));
            assert_eq!(a.features.len(), b.features.len(), "round {r}: feature rows");
            for (i, (x, y)) in a.features.iter().zip(&b.features).enumerate() {
                assert_close(&format!("round {r} feature row {i}"), x, y);
            }
            assert_close(&format!("round {r} models and metrics"), &a.fitted, &b.fitted);
            // Both are the feature SQL's own answer.
            for (i, (x, y)) in a.features.iter().zip(&b.direct).enumerate() {
                assert_close(&format!("round {r} feature SQL row {i}"), x, y);
            }
            reports.push(a.report.unwrap());
        }
        reports
    }

    fn generated(ratings: u64) -> String {
        let mut csv = Vec::new();
        crate::generate::generate(&crate::generate::GenerateOptions { ratings, seed: 11, ..Default::default() }, &mut csv).unwrap();
        String::from_utf8(csv).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn carried_rounds_equal_full_ones_on_time_ordered_events() {
        let text = generated(6_000);
        let lines: Vec<&str> = text.lines().collect();
        let reports = carried_equals_full("movielens", &lines, 4).await;
        assert_eq!(reports[0].mode, "full");
        for r in &reports[1..] {
            assert_eq!((r.mode, r.recomputed, r.from_totals), ("incremental", 0, true), "no stored row changes, so the totals carry: {r:?}");
        }
    }

    /// Late events in one batch: that round reads the stored rows and brings the totals up to
    /// date, and the next rounds carry from those totals, still equal to a full recomputation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn totals_brought_through_a_round_of_late_events_carry_the_next_ones() {
        let text = generated(6_000);
        let lines: Vec<&str> = text.lines().collect();
        let mut rows: Vec<&str> = lines[1..].to_vec();
        // 50 events of batch 1 arrive in batch 2 instead (batches of 1,500 rows each).
        let late: Vec<&str> = rows.drain(1000..1050).collect();
        for (i, l) in late.into_iter().enumerate() {
            rows.insert(2950 + i, l);
        }
        let input: Vec<&str> = std::iter::once(lines[0]).chain(rows).collect();
        let reports = carried_equals_full("movielens", &input, 4).await;
        assert!(reports[1].recomputed > 0 && !reports[1].from_totals, "{:?}", reports[1]);
        for r in &reports[2..] {
            assert_eq!((r.mode, r.recomputed, r.from_totals), ("incremental", 0, true), "{r:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn carried_rounds_equal_full_ones_on_shuffled_events() {
        let text = generated(6_000);
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1..].shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(5));
        let reports = carried_equals_full("movielens", &lines, 4).await;
        eprintln!("{reports:#?}");
    }

    /// Events whose features are their own (no windows): each round adds its batch's rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn carried_rounds_equal_full_ones_for_the_smart_home_pipeline() {
        let text = test_file("smart_home_device_usage_data.csv");
        let lines: Vec<&str> = text.lines().collect();
        let reports = carried_equals_full("smart-home", &lines, 3).await;
        for r in &reports[1..] {
            assert_eq!((r.mode, r.recomputed), ("incremental", 0), "{r:?}");
        }
    }

    /// A file of the test data (`$LENSFLOW_TEST_DATA`, or else `../shared/data`), whole.
    fn test_file(name: &str) -> String {
        let dir = std::env::var("LENSFLOW_TEST_DATA").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data").to_string());
        let path = std::path::Path::new(&dir).join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; set LENSFLOW_TEST_DATA to its folder", path.display()))
    }

    /// `ratings_small` arrives sorted by user, so every batch brings ratings older than what
    /// their movies have seen: the late-event path, exactly. Their users rated movies across
    /// the years, so the closure reaches nearly every stored row, and the round cuts every
    /// entity at the earliest cut.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn carried_rounds_equal_full_ones_on_ratings_small_in_file_order() {
        let text = test_file("ratings_small.csv");
        let lines: Vec<&str> = text.lines().collect();
        let reports = carried_equals_full("movielens", &lines, 3).await;
        eprintln!("{reports:#?}");
        for r in &reports[1..] {
            assert_eq!(r.mode, "incremental", "{r:?}");
            assert!(r.recomputed > 0, "late events recompute stored rows: {r:?}");
        }
    }

    /// A damaged segment, a missing state and a changed constant each make the next round
    /// recompute everything and say why; the features stay the feature SQL's own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damaged_or_missing_state_falls_back_to_a_full_recomputation() {
        let pipeline = Pipeline::builtin("movielens").unwrap().unwrap();
        let text = generated(4_000);
        let lines: Vec<&str> = text.lines().collect();
        let dir = tempfile::tempdir().unwrap();
        let lake = lake_of(&pipeline, dir.path(), &lines, 5).await;
        let store = Lake::open(dir.path().join("models").to_str().unwrap(), &StorageOptions::default()).unwrap().child("movielens");
        let engine = Engine::local(2).unwrap();
        let manifests = lake.manifests().await.unwrap();
        let check = |o: &Outcome, r: usize| {
            for (i, (x, y)) in o.features.iter().zip(&o.direct).enumerate() {
                assert_close(&format!("round {r} row {i}"), x, y);
            }
        };
        let first = round(&pipeline, &engine, &lake, &store, false, &manifests[..1]).await;
        assert_eq!(first.report.as_ref().and_then(|s| s.reason.as_deref()), Some("no carried state yet"));

        // A flipped byte in a segment.
        let state: StateManifest = serde_json::from_slice(&store.get(&Path::from(STATE_FILE)).await.unwrap()).unwrap();
        let mut bytes = store.get(&Path::from(state.files[0].path.as_str())).await.unwrap().to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        store.put(&state.files[0].path, Bytes::from(bytes)).await.unwrap();
        let o = round(&pipeline, &engine, &lake, &store, false, &manifests[..2]).await;
        let reason = o.report.as_ref().and_then(|s| s.reason.clone()).unwrap_or_default();
        assert!(reason.contains("is damaged") && reason.contains(&state.files[0].path), "{reason}");
        check(&o, 2);

        // The state carries again, then its manifest goes missing.
        let o = round(&pipeline, &engine, &lake, &store, false, &manifests[..3]).await;
        assert_eq!(o.report.as_ref().map(|s| s.mode), Some("incremental"));
        check(&o, 3);
        store.delete(STATE_FILE).await.unwrap();
        let o = round(&pipeline, &engine, &lake, &store, false, &manifests[..4]).await;
        assert_eq!(o.report.as_ref().and_then(|s| s.reason.as_deref()), Some("no carried state yet"));
        check(&o, 4);

        // A segment file gone, and a different constant: both named.
        let state: StateManifest = serde_json::from_slice(&store.get(&Path::from(STATE_FILE)).await.unwrap()).unwrap();
        store.delete(&state.files[0].path).await.unwrap();
        let o = round(&pipeline, &engine, &lake, &store, false, &manifests[..5]).await;
        let reason = o.report.as_ref().and_then(|s| s.reason.clone()).unwrap_or_default();
        assert!(reason.contains("is missing"), "{reason}");
        check(&o, 5);
        let mut changed = pipeline.clone();
        changed.definition.features.constants.insert("shrink".into(), 7.0);
        let o = round(&changed, &engine, &lake, &store, false, &manifests[..5]).await;
        let reason = o.report.as_ref().and_then(|s| s.reason.clone()).unwrap_or_default();
        assert!(reason.contains("changed since the state was computed"), "{reason}");
        check(&o, 5);
    }

    #[test]
    fn a_window_reads_only_files_written_from_its_first_batch_on() {
        let file = |segment: u64, newest_batch: Option<u64>| SegmentFile {
            segment,
            path: format!("s{segment}"),
            rows: 1,
            bytes: 1,
            sha256: String::new(),
            newest_batch,
        };
        let files = [file(1, Some(1)), file(2, Some(2)), file(3, Some(3)), file(2, None), file(9, Some(9))];
        let kept: Vec<(u64, Option<u64>)> = files_in_window(&files, 3).iter().map(|f| (f.segment, f.newest_batch)).collect();
        assert_eq!(kept, [(3, Some(3)), (2, None), (9, Some(9))]);
        assert_eq!(files_in_window(&files, 0).len(), files.len());
    }
}
