//! The feature SQL's final SELECT, compiled into DataFusion physical expressions.
//!
//! A feature is defined once, in the SQL. Training runs the whole query (windows and all) on the
//! cluster; serving cannot, since a request is one row and "now". So serving takes the final
//! SELECT's expression of each feature and evaluates it on a row it builds from the request and
//! the lookup tables, which hold the same state columns the query's windows compute. DataFusion
//! compiles each expression once per round ([`SessionContext::parse_sql_expr`] then
//! [`SessionContext::create_physical_expr`]); a request then costs an evaluation, no planning.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::datasource::MemTable;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Query, SelectItem, SetExpr, Statement};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::Pipeline;

/// An in-process session in lensflow's SQL dialect, for planning and compiling (never for the lake).
pub fn session() -> SessionContext {
    crate::dialect::session()
}

/// Plans `sql` over empty tables of the given schemas and returns its output schema.
pub async fn plan_schema(ctx: &SessionContext, tables: &[(&str, SchemaRef)], sql: &str) -> Result<SchemaRef, String> {
    for (name, schema) in tables {
        let table = MemTable::try_new(schema.clone(), vec![vec![]]).map_err(|e| e.to_string())?;
        ctx.deregister_table(*name).map_err(|e| e.to_string())?;
        ctx.register_table(*name, Arc::new(table)).map_err(|e| e.to_string())?;
    }
    let df = ctx.sql(sql).await.map_err(|e| clean(e.to_string()))?;
    Ok(Arc::new(df.schema().as_arrow().clone()))
}

/// Strips DataFusion's layers of "Error during planning:" prefixes down to the message.
fn clean(e: String) -> String {
    e.replace("Error during planning: ", "").replace("SQL error: ", "")
}

/// A placeholder for `${name}` that the SQL parser accepts as an identifier.
pub(crate) fn placeholder(name: &str) -> String {
    format!("lensflow_var__{name}")
}

/// `sql` parsed as one query, with each `${name}` parked as the identifier [`placeholder`]
/// gives it (`${x}` is Spark's substitution syntax, not SQL); also the names found.
pub(crate) fn parse_query(sql: &str) -> Result<(Box<Query>, Vec<String>), String> {
    let mut parsed = sql.to_string();
    let mut vars = Vec::new();
    while let Some(start) = parsed.find("${") {
        let end = parsed[start..].find('}').map(|e| start + e).ok_or("an unclosed `${`")?;
        let name = parsed[start + 2..end].to_string();
        parsed.replace_range(start..=end, &placeholder(&name));
        vars.push(name);
    }
    let statements = Parser::parse_sql(&GenericDialect {}, &parsed).map_err(|e| format!("does not parse: {e}"))?;
    match <[Statement; 1]>::try_from(statements) {
        Ok([Statement::Query(query)]) => Ok((query, vars)),
        Ok(_) => Err("must be a SELECT query".into()),
        Err(statements) => Err(format!("must be exactly one SELECT query, found {} statements", statements.len())),
    }
}

/// The final SELECT's items of `sql`: output column name → expression text, with `${…}`
/// variables kept as written.
pub fn final_select(sql: &str) -> Result<BTreeMap<String, String>, String> {
    let (query, vars) = parse_query(sql)?;
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err("the query's final part must be a plain SELECT (not a UNION or VALUES)".into());
    };
    let mut items = BTreeMap::new();
    for item in &select.projection {
        let (name, expr) = match item {
            SelectItem::ExprWithAlias { expr, alias } => (alias.value.to_lowercase(), expr.to_string()),
            SelectItem::UnnamedExpr(expr) => (expr.to_string().to_lowercase(), expr.to_string()),
            _ => continue,
        };
        let expr = vars.iter().fold(expr, |e, v| e.replace(&placeholder(v), &format!("${{{v}}}")));
        items.insert(name, expr);
    }
    Ok(items)
}

/// Compiles one SQL expression against `schema`, with `${…}` replaced by `vars`.
pub fn compile_text(text: &str, schema: SchemaRef, vars: &BTreeMap<String, f64>) -> Result<Arc<dyn PhysicalExpr>, String> {
    let ctx = session();
    compile_in(&ctx, text, &schema, vars).map(|(e, _)| e)
}

/// The column names an SQL expression reads, found by its tokens (words that are neither
/// keywords nor function names), so it needs no schema.
pub fn identifiers(text: &str) -> BTreeSet<String> {
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&GenericDialect {}, text).tokenize().unwrap_or_default();
    let meaningful: Vec<&Token> = tokens.iter().filter(|t| !matches!(t, Token::Whitespace(_))).collect();
    let mut out = BTreeSet::new();
    for (i, t) in meaningful.iter().enumerate() {
        if let Token::Word(w) = t {
            let is_call = matches!(meaningful.get(i + 1), Some(Token::LParen));
            if w.keyword == Keyword::NoKeyword && !is_call && !w.value.starts_with(&placeholder("")) {
                out.insert(if w.quote_style.is_some() { w.value.clone() } else { w.value.to_lowercase() });
            }
        }
    }
    out
}

fn compile_in(ctx: &SessionContext, text: &str, schema: &SchemaRef, vars: &BTreeMap<String, f64>) -> Result<(Arc<dyn PhysicalExpr>, BTreeSet<String>), String> {
    let text = super::substitute(text, vars);
    if let Some(start) = text.find("${") {
        return Err(format!("unknown variable in `{}`", &text[start..text[start..].find('}').map(|e| start + e + 1).unwrap_or(text.len())]));
    }
    let df_schema = DFSchema::try_from(schema.as_ref().clone()).map_err(|e| e.to_string())?;
    let logical = ctx.parse_sql_expr(&text, &df_schema).map_err(|e| clean(e.to_string()))?;
    let used = logical.column_refs().into_iter().map(|c| c.name.clone()).collect();
    let physical = ctx.create_physical_expr(logical, &df_schema).map_err(|e| clean(e.to_string()))?;
    Ok((physical, used))
}

/// Every model feature's expression, compiled against one row schema.
#[derive(Debug, Clone)]
pub struct FeatureExprs {
    names: Vec<String>,
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    texts: Vec<String>,
    used: Vec<BTreeSet<String>>,
    schema: SchemaRef,
}

impl FeatureExprs {
    /// Compiles the final-SELECT expression of each of `pipeline`'s features against `schema`,
    /// with variables `vars`. An error names the feature at fault.
    pub fn compile(pipeline: &Pipeline, schema: SchemaRef, vars: &BTreeMap<String, f64>) -> Result<FeatureExprs, (String, String)> {
        let items = final_select(pipeline.features_sql()).map_err(|e| ("(query)".to_string(), e))?;
        FeatureExprs::compile_named(pipeline.features(), &items, schema, vars)
    }

    /// Compiles the expressions `items` gives for `names`.
    pub fn compile_named(
        names: &[String],
        items: &BTreeMap<String, String>,
        schema: SchemaRef,
        vars: &BTreeMap<String, f64>,
    ) -> Result<FeatureExprs, (String, String)> {
        let ctx = session();
        let mut out = FeatureExprs { names: names.to_vec(), exprs: vec![], texts: vec![], used: vec![], schema: schema.clone() };
        for name in names {
            let text = items.get(name).ok_or_else(|| {
                (name.clone(), format!("`{name}` must be computed in the query's final SELECT (`… AS {name}`): serving evaluates that expression"))
            })?;
            let (expr, used) = compile_in(&ctx, text, &schema, vars).map_err(|e| {
                let have = schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ");
                (name.clone(), format!("`{text}` cannot be computed from a serving row ({have}): {e}"))
            })?;
            let out_type = expr.data_type(&schema).map_err(|e| (name.clone(), e.to_string()))?;
            if !out_type.is_numeric() {
                return Err((name.clone(), format!("gives {out_type}, not a number")));
            }
            out.exprs.push(expr);
            out.texts.push(text.clone());
            out.used.push(used);
        }
        Ok(out)
    }

    /// The features, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The schema the expressions read.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The columns feature `i` reads.
    pub fn columns_used(&self, i: usize) -> &BTreeSet<String> {
        &self.used[i]
    }

    /// Fails unless `feature` reads only columns of `schema`.
    pub fn uses_only(&self, feature: &str, schema: &SchemaRef) -> Result<(), String> {
        let i = self.names.iter().position(|n| n == feature).ok_or_else(|| format!("`{feature}` is not a feature"))?;
        match self.used[i].iter().find(|c| schema.field_with_name(c).is_err()) {
            Some(c) => Err(format!("reads `{c}`, which the entity's lookup does not hold")),
            None => Ok(()),
        }
    }

    /// Evaluates every feature on `batch` (whose schema is [`Self::schema`]): one column of
    /// values per feature.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<Vec<Float64Array>, String> {
        self.exprs.iter().zip(&self.names).map(|(e, name)| evaluate_f64(e, batch).map_err(|err| format!("feature {name}: {err}"))).collect()
    }

    /// Evaluates only the features named in `which`, in that order.
    pub fn evaluate_some(&self, batch: &RecordBatch, which: &[String]) -> Result<Vec<Float64Array>, String> {
        which
            .iter()
            .map(|name| {
                let i = self.names.iter().position(|n| n == name).ok_or_else(|| format!("`{name}` is not a feature"))?;
                evaluate_f64(&self.exprs[i], batch).map_err(|err| format!("feature {name}: {err}"))
            })
            .collect()
    }
}

/// Evaluates `expr` on `batch` as Float64 values.
pub fn evaluate_f64(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<Float64Array, String> {
    let array = evaluate(expr, batch)?;
    let array = if array.data_type() == &DataType::Float64 { array } else { arrow_cast(&array, &DataType::Float64)? };
    array.as_any().downcast_ref::<Float64Array>().cloned().ok_or_else(|| "not a number".to_string())
}

/// Evaluates `expr` on `batch`.
pub fn evaluate(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<ArrayRef, String> {
    expr.evaluate(batch).and_then(|v| v.into_array(batch.num_rows())).map_err(|e| e.to_string())
}

fn arrow_cast(array: &ArrayRef, to: &DataType) -> Result<ArrayRef, String> {
    datafusion::arrow::compute::cast(array, to).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::{Field, Schema};

    #[test]
    fn the_final_select_keeps_variables_and_names() {
        let items = final_select("WITH a AS (SELECT x FROM t) SELECT x, LN(1.0 + x) * ${k} AS f, x + 1 AS \"G\" FROM a").unwrap();
        assert_eq!(items["x"], "x");
        assert_eq!(items["f"], "LN(1.0 + x) * ${k}");
        assert!(items.contains_key("g"));
        assert!(final_select("SELEC x FROM t").unwrap_err().contains("does not parse"));
    }

    #[test]
    fn identifiers_are_the_columns_an_expression_reads() {
        let ids = identifiers("CASE WHEN rentals >= 20 THEN LN(1.0 + s_n) ELSE CAST(x AS DOUBLE) END");
        assert_eq!(ids, BTreeSet::from(["rentals".to_string(), "s_n".to_string(), "x".to_string()]));
    }

    #[test]
    fn compiled_expressions_evaluate_on_rows() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Float64, false), Field::new("ts", DataType::Int64, false)]));
        let vars = BTreeMap::from([("k".to_string(), 2.0)]);
        let names = vec!["f".to_string(), "g".to_string()];
        let items = BTreeMap::from([("f".to_string(), "LN(1.0 + n) * ${k}".to_string()), ("g".to_string(), "CAST(ts AS DOUBLE) / 2.0".to_string())]);
        let exprs = FeatureExprs::compile_named(&names, &items, schema.clone(), &vars).unwrap();
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Float64Array::from(vec![0.0, 1.0])), Arc::new(arrow_array::Int64Array::from(vec![4, 6]))])
                .unwrap();
        let out = exprs.evaluate(&batch).unwrap();
        assert_eq!(out[0].values().to_vec(), vec![0.0, 2.0 * 2f64.ln()]);
        assert_eq!(out[1].values().to_vec(), vec![2.0, 3.0]);
        assert_eq!(exprs.columns_used(0), &BTreeSet::from(["n".to_string()]));
        let (name, err) =
            FeatureExprs::compile_named(&["h".to_string()], &BTreeMap::from([("h".to_string(), "zz + 1".to_string())]), schema, &vars).unwrap_err();
        assert_eq!(name, "h");
        assert!(err.contains("zz"), "{err}");
    }
}
