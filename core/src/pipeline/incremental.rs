//! Whether a pipeline's feature SQL can be computed a batch at a time, and what that takes.
//!
//! A round recomputes every event's features from all events so far. Most of that work repeats
//! the last round's: an event's point-in-time features depend only on strictly earlier events.
//! [`shape`] reads the feature SQL and finds whether it has the form that makes carrying state
//! from round to round exact:
//! - a chain of CTEs, each reading the one before it (the first reads the events table), whose
//!   only work across rows is window aggregates (`SUM`, `COUNT`, `MIN`, `MAX`) over one entity's
//!   strictly earlier events: `OVER (PARTITION BY column ORDER BY time RANGE BETWEEN UNBOUNDED
//!   PRECEDING AND 1 PRECEDING)`;
//! - no per-round variable (`[features.variables]`) before the final SELECT's expressions, so
//!   the state rows the CTEs give are the same in every round and only the final SELECT, row by
//!   row, is evaluated again with the round's values.
//!
//! The answer names the entity keys and how many window passes are chained (a window over a
//! column another window computed is a second pass): late events of an entity change the later
//! events of every entity reached within that many hops. Otherwise it says what stands in the
//! way, and rounds recompute everything.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, Function, FunctionArguments, GroupByExpr, Ident, ObjectName, Query, Select, SelectItem, SetExpr, TableFactor, Value, Visit, VisitMut, Visitor,
    VisitorMut, WindowFrameBound, WindowFrameUnits, WindowType,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::expr::{identifiers, parse_query, placeholder};

/// How a window aggregate accumulates: what carried state and a batch combine by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulate {
    /// `SUM`.
    Sum,
    /// `COUNT`.
    Count,
    /// `MIN`.
    Min,
    /// `MAX`.
    Max,
}

/// One window aggregate of the feature SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowCall {
    /// The CTE it is in.
    pub relation: String,
    /// How it accumulates.
    pub function: Accumulate,
    /// Its argument, as SQL (`*` for `COUNT(*)`).
    pub argument: String,
    /// The entity column it partitions by.
    pub key: String,
    /// Its pass: 1 over event columns, 2 over a column a pass-1 window computed, ….
    pub pass: usize,
}

/// The form of an incremental feature SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The CTEs, in order.
    pub relations: Vec<String>,
    /// What the final SELECT reads: the per-event state rows (the events table itself when the
    /// SQL has no CTE).
    pub state: String,
    /// Every window aggregate, in order.
    pub windows: Vec<WindowCall>,
    /// The entity columns the windows partition by, in first-use order.
    pub keys: Vec<String>,
    /// The longest chain of window passes (0: every row's features are its own).
    pub passes: usize,
    /// The events table's columns the SQL reads; with windows, each reaches the state rows
    /// unchanged, so a stored state row can be turned back into its event.
    pub reads: Vec<String>,
    events: String,
}

/// Reads `sql` (a pipeline's feature SQL) over `events` (its table name, columns and time
/// column); `round_variables` are the `${…}` names whose values change from round to round.
pub fn shape(sql: &str, events: &str, columns: &[String], time: Option<&str>, round_variables: &[String]) -> Result<Shape, String> {
    let (query, _) = parse_query(sql)?;
    let Query { with, body, order_by, limit_clause, .. } = *query;
    if order_by.is_some() || limit_clause.is_some() {
        return Err("the query ends in ORDER BY or LIMIT".into());
    }
    let SetExpr::Select(last) = *body else {
        return Err("the final part is not a plain SELECT".into());
    };
    // Column → window passes behind it, per relation.
    let mut relations: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    relations.insert(events.to_lowercase(), columns.iter().map(|c| (c.to_lowercase(), 0)).collect());
    // Column → where its value comes from (relation, column): a plain pass-through keeps it.
    let mut origins: BTreeMap<String, BTreeMap<String, (String, String)>> = BTreeMap::new();
    let events_name = events.to_lowercase();
    origins.insert(events_name.clone(), columns.iter().map(|c| (c.to_lowercase(), (events_name.clone(), c.to_lowercase()))).collect());
    let mut order = Vec::new();
    let mut windows = Vec::new();
    let mut inputs: BTreeMap<String, String> = BTreeMap::new();
    let mut reads: Vec<String> = Vec::new();
    for cte in with.map(|w| w.cte_tables).unwrap_or_default() {
        let name = cte.alias.name.value.to_lowercase();
        let text = cte.query.to_string();
        if let Some(v) = round_variables.iter().find(|v| text.contains(&placeholder(v))) {
            return Err(format!("the round's ${{{v}}} is used in `{name}`, before the final SELECT"));
        }
        let Query { body, order_by, limit_clause, with, .. } = *cte.query;
        if with.is_some() || order_by.is_some() || limit_clause.is_some() {
            return Err(format!("`{name}` nests a WITH, or ends in ORDER BY or LIMIT"));
        }
        let SetExpr::Select(select) = *body else {
            return Err(format!("`{name}` is not a plain SELECT"));
        };
        let input = single_input(&select, &name, &relations)?;
        if let Some(filter) = &select.selection
            && identifiers(&filter.to_string()).iter().any(|c| relations[&input].get(c).is_some_and(|p| *p > 0))
        {
            return Err(format!("`{name}` filters on a window's result, which later events can change"));
        }
        let mut columns = BTreeMap::new();
        let mut column_origins = BTreeMap::new();
        let mut read = |text: &str| {
            if input == events_name {
                reads.extend(identifiers(text).into_iter().filter(|c| relations[&input].contains_key(c)));
            }
        };
        if let Some(filter) = &select.selection {
            read(&filter.to_string());
        }
        for item in &select.projection {
            let (output, expr) = match item {
                SelectItem::ExprWithAlias { expr, alias } => (alias.value.to_lowercase(), expr),
                SelectItem::UnnamedExpr(expr) => (expr.to_string().to_lowercase(), expr),
                SelectItem::Wildcard(_) => {
                    read(&relations[&input].keys().cloned().collect::<Vec<_>>().join(" "));
                    columns.extend(relations[&input].clone());
                    column_origins.extend(origins[&input].clone());
                    continue;
                }
                _ => return Err(format!("`{name}` selects `{item}`, which names no single column")),
            };
            read(&expr.to_string());
            let pass = pass_of(expr, &name, &relations[&input], time, &mut windows)?;
            let origin = match expr {
                Expr::Identifier(id) => origins[&input].get(&id.value.to_lowercase()).cloned(),
                _ => None,
            };
            column_origins.insert(output.clone(), origin.unwrap_or_else(|| (name.clone(), output.clone())));
            columns.insert(output, pass);
        }
        relations.insert(name.clone(), columns);
        origins.insert(name.clone(), column_origins);
        inputs.insert(name.clone(), input);
        order.push(name);
    }
    let state = single_input(&last, "the final SELECT", &relations)?;
    for item in &last.projection {
        if let SelectItem::ExprWithAlias { expr, .. } | SelectItem::UnnamedExpr(expr) = item
            && !collect_windows(expr).is_empty()
        {
            return Err("the final SELECT has a window function".into());
        }
    }
    let rest = Select { projection: vec![], ..(*last).clone() }.to_string();
    if let Some(v) = round_variables.iter().find(|v| rest.contains(&placeholder(v))) {
        return Err(format!("the round's ${{{v}}} is used outside the final SELECT's expressions"));
    }
    let mut keys: Vec<String> = Vec::new();
    for w in &windows {
        if !keys.contains(&w.key) {
            keys.push(w.key.clone());
        }
    }
    let passes = relations[&state].values().copied().max().unwrap_or(0);
    if state == events_name {
        // The final SELECT reads the events themselves.
        reads = columns.iter().map(|c| c.to_lowercase()).collect();
    }
    reads.sort();
    reads.dedup();
    if !windows.is_empty() {
        // A late event recomputes stored rows from their events, and carried sums are rebuilt
        // from the stored arguments: both must be readable, unchanged, on the state rows.
        let reaches = |column: &str, from: &str| origins[from].get(column).is_some_and(|o| origins[&state].get(column) == Some(o));
        if let Some(c) = reads.iter().find(|c| !reaches(c, &events_name)) {
            return Err(format!("the event column `{c}` does not reach `{state}` unchanged"));
        }
        for w in &windows {
            let from = &inputs[&w.relation];
            if let Some(c) = identifiers(&w.argument).into_iter().find(|c| !reaches(c, from)) {
                return Err(format!("`{c}`, summed by a window in `{}`, does not reach `{state}` unchanged", w.relation));
            }
        }
    }
    Ok(Shape { relations: order, state, windows, keys, passes, reads, events: events_name })
}

/// The prefix of the columns that bring carried state into a batch's rows: window call `i`'s
/// aggregate over an entity's stored rows is column `{CARRIED}{i}`.
pub const CARRIED: &str = "__lensflow_carried_";

/// The prefix of the hidden state columns that keep each window call's value on its row:
/// window call `i`'s aggregate over the entity's strictly earlier events is `{RAW}{i}`. After
/// late events, an entity's aggregates over its rows before its cut are these values on its
/// first changed row, so a round reads its changed rows and not all of the entity's.
pub const RAW: &str = "__lensflow_raw_";

/// A round's batch, computed against carried state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    /// The state rows of a batch's events: the feature SQL's CTEs, reading the batch table
    /// (whose rows carry the `CARRIED` columns of their entities) instead of the events table,
    /// with every window call combined with its carried value.
    pub sql: String,
    /// Per entity column, the aggregates (`SUM(arg) AS {CARRIED}i`, …) that carry its state:
    /// evaluated over an entity's stored state rows.
    pub carried: Vec<(String, Vec<String>)>,
    /// Per entity column, in `carried`'s order, how its carried columns from several sets of
    /// rows combine into those of their union (`SUM({CARRIED}i) AS {CARRIED}i` for a sum or a
    /// count, `MIN`, `MAX`).
    pub merged: Vec<Vec<String>>,
    /// Per entity column, in `carried`'s order, the numbers `i` of its window calls.
    pub calls: Vec<Vec<usize>>,
}

impl Shape {
    /// The SQL of every state row: `sql`'s CTEs, then all of the state relation's columns,
    /// with each window call's value kept as `{RAW}i`. `sql` is the feature SQL with its `${…}`
    /// values substituted.
    pub fn state_sql(&self, sql: &str) -> Result<String, String> {
        let (mut query, _) = parse_query(sql)?;
        self.rewrite_ctes(&mut query, None)?;
        query.body = body_of(&format!("SELECT * FROM {}", self.state))?;
        Ok(query.to_string())
    }

    /// The features from stored state rows: `sql`'s final SELECT over `table`, whose
    /// `columns` are the state relation's.
    pub fn final_sql(&self, sql: &str, table: &str, columns: &[String]) -> Result<String, String> {
        let (mut query, _) = parse_query(sql)?;
        let (state, _) = parse_query(&format!("WITH {} AS (SELECT {} FROM {table}) SELECT 1", self.state, quoted(columns)))?;
        query.with = state.with;
        Ok(query.to_string())
    }

    /// The state rows of a batch's events, read from `batch`, against carried state: see
    /// [`BatchPlan`]. `columns` are the state relation's.
    pub fn batch_plan(&self, sql: &str, batch: &str, columns: &[String]) -> Result<BatchPlan, String> {
        let (mut query, _) = parse_query(sql)?;
        let combine = self.rewrite_ctes(&mut query, Some(batch))?;
        let from = if self.state == self.events { batch } else { &self.state };
        query.body = body_of(&format!("SELECT {} FROM {from}", quoted(columns)))?;
        let (mut carried, mut merged, mut calls) = (Vec::new(), Vec::new(), Vec::new());
        for key in &self.keys {
            let of_key = || combine.carried.iter().enumerate().filter(|(_, (k, _, _))| k == key);
            carried.push((key.clone(), of_key().map(|(_, (_, a, _))| a.clone()).collect()));
            merged.push(of_key().map(|(_, (_, _, m))| m.clone()).collect());
            calls.push(of_key().map(|(i, _)| i).collect());
        }
        Ok(BatchPlan { sql: query.to_string(), carried, merged, calls })
    }

    /// Adds each window call's value to its CTE as `{RAW}i`, carried through every later CTE.
    /// With a `batch` table, the CTEs read it instead of the events table and each window call
    /// is combined with its carried value, whose columns also ride along.
    fn rewrite_ctes(&self, query: &mut Query, batch: Option<&str>) -> Result<Combine<'_>, String> {
        let mut combine = Combine { windows: &self.windows, next: 0, combine: batch.is_some(), raw: Vec::new(), carried: Vec::new(), error: None };
        let named = |prefix: &'static str, range: std::ops::Range<usize>| {
            range.map(move |i| SelectItem::UnnamedExpr(Expr::Identifier(Ident::new(format!("{prefix}{i}")))))
        };
        if let Some(with) = query.with.as_mut() {
            for cte in &mut with.cte_tables {
                let SetExpr::Select(select) = cte.query.body.as_mut() else { continue };
                if let Some(batch) = batch
                    && let TableFactor::Table { name, .. } = &mut select.from[0].relation
                    && name.to_string().eq_ignore_ascii_case(&self.events)
                {
                    *name = ObjectName::from(vec![Ident::new(batch)]);
                }
                let before = combine.next;
                for item in &mut select.projection {
                    if let SelectItem::ExprWithAlias { expr, .. } | SelectItem::UnnamedExpr(expr) = item {
                        let _ = expr.visit(&mut combine);
                    }
                }
                // Earlier CTEs' hidden columns ride along to every later one.
                if !select.projection.iter().any(|i| matches!(i, SelectItem::Wildcard(_))) {
                    select.projection.extend(named(RAW, 0..before));
                    if batch.is_some() {
                        select.projection.extend(named(CARRIED, 0..self.windows.len()));
                    }
                }
                for i in before..combine.next {
                    select.projection.push(SelectItem::ExprWithAlias { expr: combine.raw[i].clone(), alias: Ident::new(format!("{RAW}{i}")) });
                }
            }
        }
        if let Some(e) = combine.error.take() {
            return Err(e);
        }
        if combine.next != self.windows.len() {
            return Err(format!("found {} of the {} window calls", combine.next, self.windows.len()));
        }
        Ok(combine)
    }
}

/// Notes each window call `W` (in order) and, for a batch, rewrites it into `W` combined with
/// its carried value.
struct Combine<'a> {
    windows: &'a [WindowCall],
    next: usize,
    /// Whether window calls are combined with their carried values.
    combine: bool,
    /// Per window call, its value on the row (combined, for a batch).
    raw: Vec<Expr>,
    /// (entity column, carrying aggregate, merging aggregate) per window call.
    carried: Vec<(String, String, String)>,
    error: Option<String>,
}

impl VisitorMut for Combine<'_> {
    type Break = ();
    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let Expr::Function(f) = expr else { return ControlFlow::Continue(()) };
        if f.over.is_none() {
            return ControlFlow::Continue(());
        }
        let i = self.next;
        let Some(call) = self.windows.get(i) else {
            self.error = Some("more window calls than the SQL's shape has".into());
            return ControlFlow::Break(());
        };
        self.next += 1;
        let (w, c) = (f.to_string(), format!("{CARRIED}{i}"));
        let FunctionArguments::List(list) = &f.args else { return ControlFlow::Break(()) };
        let argument = list.args.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
        // Null-aware, as the aggregates are: an empty side leaves the other unchanged.
        let (name, text) = match call.function {
            Accumulate::Sum => ("SUM", format!("COALESCE(({w}) + {c}, {w}, {c})")),
            Accumulate::Count => ("COUNT", format!("({w}) + COALESCE({c}, 0)")),
            Accumulate::Min => ("MIN", format!("CASE WHEN {c} IS NULL OR ({w}) <= {c} THEN {w} ELSE {c} END")),
            Accumulate::Max => ("MAX", format!("CASE WHEN {c} IS NULL OR ({w}) >= {c} THEN {w} ELSE {c} END")),
        };
        // Counts add up, so sets of rows merge theirs by SUM.
        let merge = if call.function == Accumulate::Count { "SUM" } else { name };
        self.carried.push((call.key.clone(), format!("{name}({argument}) AS {c}"), format!("{merge}({c}) AS {c}")));
        if self.combine {
            match Parser::new(&GenericDialect {}).try_with_sql(&text).and_then(|mut p| p.parse_expr()) {
                Ok(e) => *expr = e,
                Err(e) => {
                    self.error = Some(format!("combining `{w}`: {e}"));
                    return ControlFlow::Break(());
                }
            }
        }
        self.raw.push(expr.clone());
        ControlFlow::Continue(())
    }
}

/// A lookup table's SQL split so that it can be carried from round to round: each entity's
/// partial aggregates, which merge batch by batch, and the lookup's own expressions over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupPlan {
    /// The lookup's key.
    pub key: String,
    /// Each entity's partial aggregates (`{PART}i`) over the rows of the table it was built
    /// for, with the hidden counts that merging needs: rows (`{PART}rows`) and, per `SUM`,
    /// non-NULL arguments (`{PART}i_n`).
    pub partial: String,
    /// How the partial rows of several sets of rows merge into those of their union.
    pub merged: Vec<String>,
    /// The partial columns negated, so that merging them in takes rows out again: `None` when a
    /// `MIN` or `MAX` reads a column that late events change (a minimum cannot be taken back).
    pub retract: Option<Vec<String>>,
    /// The lookup table, from the partial rows of the table it was built for.
    pub finish: String,
}

impl LookupPlan {
    /// The partial rows of the union of `parts` (each a query of partial rows).
    pub fn merge_sql(&self, parts: &[String]) -> String {
        format!(
            "SELECT {0}, {1} FROM ({2}) u GROUP BY {0} HAVING SUM({PART}rows) > 0",
            self.key,
            self.merged.join(", "),
            parts.iter().map(|p| format!("SELECT * FROM ({p}) p")).collect::<Vec<_>>().join(" UNION ALL ")
        )
    }

    /// Partial rows that, merged in, take this plan's rows out, if it can be done.
    pub fn retracting(&self) -> Option<String> {
        let list = self.retract.as_ref()?;
        Some(format!("SELECT {}, {} FROM ({}) r", self.key, list.join(", "), self.partial))
    }
}

/// The prefix of a carried lookup's partial aggregate columns.
pub const PART: &str = "__lensflow_part_";

/// `sql`, a lookup table's SQL (`SELECT key, … FROM features [WHERE …] GROUP BY key [ORDER BY
/// …]`, whose values are expressions over `COUNT`, `SUM`, `MIN` and `MAX` of row expressions),
/// as partial aggregates read from `rows` and its SELECT list read from `partials`;
/// `unchanging` names the columns whose values late events never change (the events' own).
/// `Err` says why it cannot be carried.
pub fn lookup_plan(sql: &str, key: &str, rows: &str, partials: &str, unchanging: &[String]) -> Result<LookupPlan, String> {
    let (mut query, vars) = parse_query(sql)?;
    if !vars.is_empty() {
        return Err(format!("it reads the round's values ${{{}}}", vars.join("}, ${")));
    }
    if query.with.is_some() || query.limit_clause.is_some() {
        return Err("it has a WITH or LIMIT clause".into());
    }
    let SetExpr::Select(select) = query.body.as_mut() else { return Err("it is not one SELECT".into()) };
    if select.from.len() != 1 || !select.from[0].joins.is_empty() || select.distinct.is_some() || select.having.is_some() {
        return Err("it must read one table, without joins, DISTINCT or HAVING".into());
    }
    let grouped = match &select.group_by {
        GroupByExpr::Expressions(e, modifiers) => modifiers.is_empty() && e.len() == 1 && e[0].to_string().eq_ignore_ascii_case(key),
        GroupByExpr::All(_) => false,
    };
    if !grouped {
        return Err(format!("it must be grouped by its key `{key}` alone"));
    }
    let mut parts = Parts { calls: Vec::new(), error: None };
    for item in &mut select.projection {
        match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                let _ = e.visit(&mut parts);
            }
            _ => return Err("its SELECT list has a wildcard".into()),
        }
    }
    if let Some(e) = parts.error {
        return Err(e);
    }
    let TableFactor::Table { name, .. } = &mut select.from[0].relation else { return Err("it must read a table".into()) };
    *name = ObjectName::from(vec![Ident::new(rows)]);
    let from_rows = select.from[0].to_string();
    if let TableFactor::Table { name, .. } = &mut select.from[0].relation {
        *name = ObjectName::from(vec![Ident::new(partials)]);
    }
    let filter = select.selection.take().map(|w| format!(" WHERE {w}")).unwrap_or_default();
    // Which rows a group holds, and a MIN or MAX over them, stay put only if late events
    // change none of the columns they read.
    let fixed = |text: &str| identifiers(text).iter().all(|c| unchanging.iter().any(|u| u.eq_ignore_ascii_case(c)));
    let settled = fixed(&filter) && fixed(key);
    let (mut aggregates, mut merged, mut retract) = (Vec::new(), Vec::new(), Some(Vec::new()));
    for (i, (f, a)) in parts.calls.iter().enumerate() {
        let p = format!("{PART}{i}");
        aggregates.push(format!("{f}({a}) AS {p}"));
        let negated = match f.as_str() {
            "COUNT" => {
                merged.push(format!("SUM({p}) AS {p}"));
                vec![format!("-{p} AS {p}")]
            }
            // The count of non-NULL arguments tells a sum of none (NULL) from a sum of 0.
            "SUM" => {
                aggregates.push(format!("COUNT({a}) AS {p}_n"));
                merged.push(format!("CASE WHEN SUM({p}_n) > 0 THEN SUM({p}) END AS {p}"));
                merged.push(format!("SUM({p}_n) AS {p}_n"));
                vec![format!("-{p} AS {p}"), format!("-{p}_n AS {p}_n")]
            }
            // Rows taken out come back with the same values: merging them again changes nothing.
            _ => {
                merged.push(format!("{f}({p}) AS {p}"));
                if !(settled && fixed(a)) {
                    retract = None;
                }
                vec![p.clone()]
            }
        };
        if let Some(r) = retract.as_mut() {
            r.extend(negated);
        }
    }
    aggregates.push(format!("COUNT(*) AS {PART}rows"));
    merged.push(format!("SUM({PART}rows) AS {PART}rows"));
    if let Some(r) = retract.as_mut() {
        r.push(format!("-{PART}rows AS {PART}rows"));
    }
    let partial = format!("SELECT {key}, {} FROM {from_rows}{filter} GROUP BY {key}", aggregates.join(", "));
    select.group_by = GroupByExpr::Expressions(vec![], vec![]);
    Ok(LookupPlan { key: key.to_string(), partial, merged, retract, finish: query.to_string() })
}

/// Replaces each aggregate call of a lookup's SELECT list with its partial column.
struct Parts {
    /// (function, arguments) per partial column.
    calls: Vec<(String, String)>,
    error: Option<String>,
}

impl VisitorMut for Parts {
    type Break = ();
    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let Expr::Function(f) = expr else { return ControlFlow::Continue(()) };
        let name = f.name.to_string().to_uppercase();
        if !["COUNT", "SUM", "MIN", "MAX"].contains(&name.as_str()) {
            return ControlFlow::Continue(());
        }
        let FunctionArguments::List(list) = &f.args else { return ControlFlow::Continue(()) };
        if f.over.is_some() || f.filter.is_some() || list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
            self.error = Some(format!("`{f}` cannot be merged batch by batch"));
            return ControlFlow::Break(());
        }
        let arguments = list.args.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
        *expr = Expr::Identifier(Ident::new(format!("{PART}{}", self.calls.len())));
        self.calls.push((name, arguments));
        ControlFlow::Continue(())
    }
}

/// The body of the one query `text`.
fn body_of(text: &str) -> Result<Box<SetExpr>, String> {
    Ok(parse_query(text)?.0.body)
}

/// `columns` as a SELECT list of quoted names.
fn quoted(columns: &[String]) -> String {
    columns.iter().map(|c| format!("\"{}\"", c.replace('"', "\"\""))).collect::<Vec<_>>().join(", ")
}

/// The one relation `select` reads, which must be known already; no joins, grouping or
/// DISTINCT (they mix rows in ways a batch at a time cannot follow).
fn single_input(select: &Select, name: &str, relations: &BTreeMap<String, BTreeMap<String, usize>>) -> Result<String, String> {
    if select.from.len() != 1 || !select.from[0].joins.is_empty() {
        return Err(format!("{name} does not read exactly one relation"));
    }
    if select.distinct.is_some() || select.having.is_some() || !matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty()) {
        return Err(format!("{name} groups rows (GROUP BY, HAVING or DISTINCT)"));
    }
    let TableFactor::Table { name: table, .. } = &select.from[0].relation else {
        return Err(format!("{name} reads a subquery or a table function"));
    };
    let table = table.to_string().to_lowercase();
    if relations.contains_key(&table) { Ok(table) } else { Err(format!("{name} reads `{table}`, which is neither the events table nor an earlier CTE")) }
}

/// The window passes behind `expr` (over `input`'s columns), noting each window call in it.
fn pass_of(expr: &Expr, relation: &str, input: &BTreeMap<String, usize>, time: Option<&str>, windows: &mut Vec<WindowCall>) -> Result<usize, String> {
    let found = collect_windows(expr);
    let columns_pass = |text: &str| identifiers(text).iter().filter_map(|c| input.get(c)).copied().max().unwrap_or(0);
    let mut pass = columns_pass(&expr.to_string());
    for f in &found {
        let call = window_call(f, relation, time, &columns_pass)?;
        if !input.contains_key(&call.key) {
            return Err(format!("`{relation}` partitions by `{}`, not a column of what it reads", call.key));
        }
        pass = pass.max(call.pass);
        windows.push(call);
    }
    Ok(pass)
}

/// Every function call with an OVER clause in `expr`.
fn collect_windows(expr: &Expr) -> Vec<Function> {
    struct Windows(Vec<Function>);
    impl Visitor for Windows {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if let Expr::Function(f) = e
                && f.over.is_some()
            {
                self.0.push(f.clone());
            }
            ControlFlow::Continue(())
        }
    }
    let mut windows = Windows(Vec::new());
    let _ = expr.visit(&mut windows);
    windows.0
}

/// `f` as a [`WindowCall`], or why it is not one a batch at a time can follow.
fn window_call(f: &Function, relation: &str, time: Option<&str>, columns_pass: &dyn Fn(&str) -> usize) -> Result<WindowCall, String> {
    let text = f.to_string();
    let bad = |why: &str| Err(format!("`{text}` in `{relation}` {why}"));
    let function = match f.name.to_string().to_uppercase().as_str() {
        "SUM" => Accumulate::Sum,
        "COUNT" => Accumulate::Count,
        "MIN" => Accumulate::Min,
        "MAX" => Accumulate::Max,
        _ => return bad("is not SUM, COUNT, MIN or MAX"),
    };
    let FunctionArguments::List(list) = &f.args else { return bad("has no argument list") };
    if list.duplicate_treatment.is_some() || !list.clauses.is_empty() || list.args.len() != 1 || f.filter.is_some() {
        return bad("has DISTINCT, a FILTER or more than one argument");
    }
    let argument = list.args[0].to_string();
    let Some(WindowType::WindowSpec(spec)) = &f.over else { return bad("uses a named window") };
    let [Expr::Identifier(key)] = spec.partition_by.as_slice() else { return bad("does not partition by one column") };
    let Some(time) = time else { return bad("needs the events' time column, and the pipeline has none") };
    let by_time = matches!(spec.order_by.as_slice(), [o] if o.expr.to_string().eq_ignore_ascii_case(time) && o.options.asc != Some(false));
    if !by_time {
        return bad(&format!("is not ordered by the event time `{time}` alone, ascending"));
    }
    let earlier_only = spec.window_frame.as_ref().is_some_and(|frame| {
        frame.units == WindowFrameUnits::Range
            && frame.start_bound == WindowFrameBound::Preceding(None)
            && matches!(&frame.end_bound, Some(WindowFrameBound::Preceding(Some(n))) if matches!(n.as_ref(), Expr::Value(v) if matches!(&v.value, Value::Number(n, _) if n == "1")))
    });
    if !earlier_only {
        return bad("does not look at strictly earlier events only (RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)");
    }
    Ok(WindowCall { relation: relation.to_string(), function, argument: argument.clone(), key: key.value.to_lowercase(), pass: 1 + columns_pass(&argument) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Pipeline;

    fn movielens_with(features_sql: &str) -> Result<Shape, String> {
        let p = Pipeline::builtin("movielens").unwrap().unwrap();
        let d = &p.definition;
        let columns: Vec<String> = p.lake_schema().fields().iter().map(|f| f.name().clone()).collect();
        shape(features_sql, &d.events.table, &columns, d.events.time.as_deref(), &d.features.variables.keys().cloned().collect::<Vec<_>>())
    }

    #[test]
    fn the_shipped_pipelines_can_carry_state() {
        let movielens = Pipeline::builtin("movielens").unwrap().unwrap().incremental_shape().unwrap();
        assert_eq!(movielens.keys, ["user_id", "movie_id"]);
        assert_eq!(movielens.passes, 2, "residual sums are windows over windows");
        assert_eq!(movielens.state, "stats");
        assert_eq!(movielens.windows.len(), 14);
        assert_eq!(movielens.windows.iter().filter(|w| w.pass == 2).count(), 4);
        let home = Pipeline::builtin("smart-home").unwrap().unwrap().incremental_shape().unwrap();
        assert_eq!((home.passes, home.windows.len(), home.state.as_str()), (0, 0, "devices"), "each row's features are its own");
        assert!(home.reads.contains(&"device_type".to_string()) && home.reads.contains(&"kafka_offset".to_string()), "{:?}", home.reads);
    }

    #[test]
    fn what_a_batch_at_a_time_cannot_follow_is_named() {
        let base = Pipeline::builtin("movielens").unwrap().unwrap().features_sql().to_string();
        let cases = [
            (
                "COALESCE(m_sum_raw, 0.0) / (m_count + ${shrink}) AS u_resid_one_a",
                "COALESCE(m_sum_raw, ${prior_mean}) / (m_count + ${shrink}) AS u_resid_one_a",
                "the round's ${prior_mean} is used in `residuals`",
            ),
            ("AND 1 PRECEDING) AS u_count", "AND 1 FOLLOWING) AS u_count", "strictly earlier events only"),
            (
                "COUNT(rating)       OVER (PARTITION BY user_id  ORDER BY ts",
                "COUNT(rating)       OVER (PARTITION BY user_id  ORDER BY rating",
                "not ordered by the event time `ts`",
            ),
            ("SUM(liked)          OVER (PARTITION BY user_id ", "AVG(liked)          OVER (PARTITION BY user_id ", "is not SUM, COUNT, MIN or MAX"),
            ("  FROM first_pass\n", "  FROM first_pass JOIN ratings USING (user_id)\n", "does not read exactly one relation"),
            ("  LN(1.0 + u_n) AS u_log_n,", "  SUM(u_n) OVER (PARTITION BY user_id) AS u_log_n,", "the final SELECT has a window function"),
            (
                "  SELECT user_id, movie_id, rating, liked, ts, u_resid_one_a,",
                "  SELECT user_id, movie_id, rating * 2.0 AS rating, liked, ts, u_resid_one_a,",
                "the event column `rating` does not reach `stats` unchanged",
            ),
            ("  FROM residuals\n", "  FROM residuals WHERE u_count > 2\n", "`second_pass` filters on a window's result"),
        ];
        for (from, to, why) in cases {
            assert!(base.contains(from), "{from}");
            let err = movielens_with(&base.replacen(from, to, 1)).unwrap_err();
            assert!(err.contains(why), "{to}: {err}");
        }
    }

    #[test]
    fn a_lookup_splits_into_partial_aggregates_and_its_own_expressions() {
        let p = Pipeline::builtin("movielens").unwrap().unwrap();
        let sql = p.sql_text(&p.definition.lookups[0].sql);
        let events: Vec<String> = p.lake_schema().fields().iter().map(|f| f.name().clone()).collect();
        let plan = lookup_plan(sql, "user_id", "rows", "parts", &events).unwrap();
        assert!(
            plan.partial.starts_with(&format!("SELECT user_id, COUNT(rating) AS {PART}0, SUM(rating) AS {PART}1, COUNT(rating) AS {PART}1_n")),
            "{}",
            plan.partial
        );
        assert!(plan.partial.ends_with(&format!("COUNT(*) AS {PART}rows FROM rows GROUP BY user_id")), "{}", plan.partial);
        assert_eq!(plan.merged[0], format!("SUM({PART}0) AS {PART}0"), "counts add up");
        assert_eq!(plan.merged[1], format!("CASE WHEN SUM({PART}1_n) > 0 THEN SUM({PART}1) END AS {PART}1"), "a sum of no value stays NULL");
        assert!(plan.merged.iter().any(|m| m.starts_with("MAX(")), "{:?}", plan.merged);
        assert!(plan.merge_sql(&["a".into(), "b".into()]).ends_with(&format!("GROUP BY user_id HAVING SUM({PART}rows) > 0")));
        // Sums and counts are taken back by negation; MAX(ts) needs nothing taken back, since
        // a recomputed row has its event's ts again.
        let retract = plan.retract.clone().unwrap();
        assert_eq!(retract.len(), plan.merged.len());
        assert_eq!((retract[0].as_str(), retract.last().unwrap().as_str()), (&*format!("-{PART}0 AS {PART}0"), &*format!("-{PART}rows AS {PART}rows")));
        assert!(plan.retracting().unwrap().ends_with("FROM rows GROUP BY user_id) r"));
        // A minimum of a column late events change cannot be taken back; nor one whose rows a
        // changing filter picks.
        for sql in [
            "SELECT user_id, MIN(u_resid_one_a) AS m FROM features GROUP BY user_id",
            "SELECT user_id, MIN(ts) AS m FROM features WHERE u_n > 3 GROUP BY user_id",
        ] {
            assert_eq!(lookup_plan(sql, "user_id", "rows", "parts", &events).unwrap().retract, None, "{sql}");
        }
        let sum = lookup_plan("SELECT user_id, SUM(u_resid_one_a) AS s FROM features WHERE u_n > 3 GROUP BY user_id", "user_id", "rows", "parts", &events);
        assert!(sum.unwrap().retract.is_some(), "sums of changing columns, even over changing rows, are taken back");
        assert!(plan.finish.contains(&format!("CAST({PART}0 AS DOUBLE) AS u_n")) && plan.finish.contains("FROM parts ORDER BY user_id"), "{}", plan.finish);
        assert!(!plan.finish.contains("GROUP BY"), "{}", plan.finish);
        for (sql, why) in [
            ("SELECT user_id, AVG(rating) AS m FROM features GROUP BY user_id", "ok"),
            ("SELECT user_id, COUNT(DISTINCT movie_id) AS n FROM features GROUP BY user_id", "cannot be merged"),
            ("SELECT user_id, SUM(rating) * ${shrink} AS s FROM features GROUP BY user_id", "round's values"),
            ("SELECT movie_id, SUM(rating) AS s FROM features GROUP BY movie_id", "grouped by its key"),
            ("SELECT user_id, SUM(rating) AS s FROM features f JOIN x ON f.a = x.a GROUP BY user_id", "one table"),
        ] {
            match lookup_plan(sql, "user_id", "rows", "parts", &events) {
                // AVG is not merged: it stays in the final SELECT, where planning it over the
                // partial rows fails (the trainer then computes the lookup from every row).
                Ok(plan) => assert_eq!(why, "ok", "{sql}: {plan:?}"),
                Err(e) => assert!(e.contains(why), "{sql}: {e}"),
            }
        }
    }

    #[test]
    fn a_batch_plan_combines_every_window_with_its_carried_value() {
        let p = Pipeline::builtin("movielens").unwrap().unwrap();
        let shape = p.incremental_shape().unwrap();
        let sql = crate::pipeline::substitute(p.features_sql(), &p.definition.features.constants);
        let columns = vec!["user_id".to_string(), "u_n".to_string()];
        let plan = shape.batch_plan(&sql, "batch_rows", &columns).unwrap();
        let keys: Vec<(&str, usize)> = plan.carried.iter().map(|(k, a)| (k.as_str(), a.len())).collect();
        assert_eq!(keys, [("user_id", 7), ("movie_id", 7)]);
        assert_eq!(plan.carried[0].1[0], format!("COUNT(rating) AS {CARRIED}0"));
        // Counts of two sets of rows add up; MAX(ts) of the user's rows is a MAX again.
        assert_eq!(plan.merged[0][0], format!("SUM({CARRIED}0) AS {CARRIED}0"));
        let last = plan.carried[0].1.iter().position(|a| a.starts_with("MAX(ts)")).unwrap();
        assert!(plan.merged[0][last].starts_with("MAX("), "{:?}", plan.merged[0]);
        assert_eq!(plan.merged.iter().map(Vec::len).collect::<Vec<_>>(), [7, 7]);
        assert!(plan.sql.contains("FROM batch_rows") && !plan.sql.contains("FROM ratings"), "{}", plan.sql);
        assert!(plan.sql.contains(&format!("+ COALESCE({CARRIED}0, 0)")), "{}", plan.sql);
        assert!(plan.sql.ends_with("SELECT \"user_id\", \"u_n\" FROM stats"), "{}", plan.sql);
        // Each window's value rides along as a hidden column: combined in a batch, as it is in
        // the state rows.
        assert_eq!(plan.calls, [vec![0, 1, 2, 3, 4, 10, 11], vec![5, 6, 7, 8, 9, 12, 13]]);
        assert!(plan.sql.contains(&format!("AS {RAW}0")) && plan.sql.contains(&format!("{RAW}13, {CARRIED}0")), "{}", plan.sql);
        let state = shape.state_sql(&sql).unwrap();
        assert!(state.contains(&format!("PRECEDING AND 1 PRECEDING) AS {RAW}13")) && !state.contains(CARRIED), "{state}");
        assert!(shape.final_sql(&sql, "stored", &columns).unwrap().starts_with("WITH stats AS (SELECT \"user_id\", \"u_n\" FROM stored) SELECT"));
    }
}
