//! The SQL lensflow speaks: DataFusion's engine with Spark's functions (the `datafusion-spark`
//! crate) and Spark's defaults, wherever lensflow plans SQL: training, `lensflow sql` and the
//! feature expressions serving compiles. SQL written for Spark then means the same thing here.
//! The scheduler and executors resolve the same functions ([`decoding_state`]), so a plan
//! planned here runs there.
//!
//! A few everyday Spark functions that datafusion-spark 55 lacks are added here: the date parts
//! (`year`, `month`, `dayofweek`, …) as rewrites to Spark's `date_part`, and `sign` and
//! `variance` as names of DataFusion's `signum` and `var_samp`.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, internal_err};
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, lit};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_spark::SessionStateBuilderSpark;

/// `config` with Spark's defaults where a query says nothing: ascending sorts put nulls first,
/// descending ones last (Spark's; DataFusion's own default is the reverse).
pub fn spark_config(mut config: SessionConfig) -> SessionConfig {
    config.options_mut().sql_parser.default_null_ordering = "nulls_min".into();
    config
}

/// `builder` with DataFusion's functions and, over them, Spark's (same name: Spark's wins) and
/// Spark's expression planner.
pub fn spark_state(builder: SessionStateBuilder) -> SessionStateBuilder {
    lensflow_functions(builder.with_default_features().with_spark_features())
}

/// A Ballista client's session with lensflow's functions put back: Ballista's upgrade of a
/// session to a client replaces its functions with Ballista's own list.
pub fn restore_functions(state: SessionState) -> SessionState {
    let id = state.session_id().to_string();
    lensflow_functions(SessionStateBuilder::new_from_existing(state).with_spark_features()).with_session_id(id).build()
}

/// The session of a process that runs plans planned elsewhere (the scheduler and executors of
/// a cluster): lensflow's functions, except the names where Spark's function only rewrites
/// itself, while planning, into DataFusion's function of the same name (`date_part`,
/// `date_trunc`). A plan that arrives was planned already and holds DataFusion's, so there the
/// name must mean DataFusion's.
pub fn decoding_state(builder: SessionStateBuilder) -> SessionStateBuilder {
    let mut builder = spark_state(builder);
    let planned = [datafusion::functions::datetime::date_part(), datafusion::functions::datetime::date_trunc()];
    builder.scalar_functions().get_or_insert_with(Vec::new).extend(planned);
    builder
}

/// The functions lensflow adds over Spark's, last so that they win.
fn lensflow_functions(mut builder: SessionStateBuilder) -> SessionStateBuilder {
    let scalars = builder.scalar_functions().get_or_insert_with(Vec::new);
    scalars.extend(DATE_PARTS.iter().map(|(name, part)| Arc::new(ScalarUDF::new_from_impl(DatePartOf::new(name, part)))));
    scalars.push(Arc::new(datafusion::functions::math::signum().as_ref().clone().with_aliases(["sign"])));
    let aggregates = builder.aggregate_functions().get_or_insert_with(Vec::new);
    aggregates.push(Arc::new(datafusion::functions_aggregate::variance::var_samp_udaf().as_ref().clone().with_aliases(["variance"])));
    // DataFusion's avg, not Spark's: the same answers (a DOUBLE mean, or a DECIMAL one for
    // DECIMAL input), but a cluster's planner lays out avg's partial state DataFusion's way.
    aggregates.push(datafusion::functions_aggregate::average::avg_udaf());
    builder
}

/// Spark's one-argument date-part functions: name and the part of Spark's `date_part` each is.
const DATE_PARTS: &[(&str, &str)] = &[
    ("year", "year"),
    ("quarter", "quarter"),
    ("month", "month"),
    ("day", "day"),
    ("dayofmonth", "day"),
    ("dayofweek", "dayofweek"),
    ("dayofyear", "doy"),
    ("weekofyear", "week"),
];

/// `name(d)`, Spark's shorthand for `date_part('part', d)`: an INT, like Spark's.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DatePartOf {
    name: &'static str,
    part: &'static str,
    signature: Signature,
}

impl DatePartOf {
    fn new(name: &'static str, part: &'static str) -> DatePartOf {
        DatePartOf { name, part, signature: Signature::any(1, Volatility::Immutable) }
    }
}

impl ScalarUDFImpl for DatePartOf {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int32)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        internal_err!("{}() is rewritten to date_part before it runs", self.name)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        let [date] = <[Expr; 1]>::try_from(args).or_else(|_| internal_err!("{}() takes one argument", self.name))?;
        // Spark's date_part maps Spark's part names and numbering onto DataFusion's.
        let date_part = datafusion_spark::function::datetime::date_part();
        match date_part.simplify(vec![lit(self.part), date.clone()], info)? {
            ExprSimplifyResult::Simplified(e) => Ok(ExprSimplifyResult::Simplified(e)),
            ExprSimplifyResult::Original(_) => Ok(ExprSimplifyResult::Simplified(date_part.call(vec![lit(self.part), date]))),
        }
    }
}

/// An in-process session that speaks lensflow's SQL, for planning and compiling.
pub fn session() -> SessionContext {
    let state = spark_state(SessionStateBuilder::new().with_config(spark_config(SessionConfig::new()))).build();
    SessionContext::new_with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, Int64Array, StringArray};

    async fn column(sql: &str) -> arrow_array::ArrayRef {
        let batches = session().sql(sql).await.unwrap().collect().await.unwrap();
        datafusion::arrow::compute::concat(&batches.iter().map(|b| b.column(0).as_ref()).collect::<Vec<_>>()).unwrap()
    }

    #[tokio::test]
    async fn nulls_sort_first_ascending_and_last_descending_as_on_spark() {
        let sql = "SELECT x FROM (VALUES (2), (NULL), (1)) AS t(x) ORDER BY x";
        let up = column(sql).await;
        assert!(up.is_null(0) && !up.is_null(2));
        let down = column(&format!("{sql} DESC")).await;
        let down = down.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!((down.value(0), down.value(1), down.is_null(2)), (2, 1, true));
    }

    #[tokio::test]
    async fn functions_are_spark_s() {
        // Spark counts a substring's position 0 as 1; DataFusion's own substr would give "len".
        let s = column("SELECT substring('lensflow', 0, 4)").await;
        assert_eq!(s.as_any().downcast_ref::<StringArray>().unwrap().value(0), "lens");
        // A Spark-only function resolves.
        let d = column("SELECT CAST(date_add(DATE '2026-11-27', CAST(5 AS INT)) AS STRING)").await;
        let d = datafusion::arrow::compute::cast(&d, &arrow_schema::DataType::Utf8).unwrap();
        assert_eq!(d.as_any().downcast_ref::<StringArray>().unwrap().value(0), "2026-12-02");
    }

    #[tokio::test]
    async fn spark_s_date_parts_sign_and_variance_are_there() {
        let parts = ["year", "month", "dayofmonth", "dayofweek", "quarter", "dayofyear"];
        let sql = parts.iter().map(|p| format!("{p}(DATE '2026-11-29')")).collect::<Vec<_>>().join(", ");
        let batch = &session().sql(&format!("SELECT {sql}")).await.unwrap().collect().await.unwrap()[0];
        let values: Vec<i32> = batch.columns().iter().map(|c| c.as_any().downcast_ref::<arrow_array::Int32Array>().unwrap().value(0)).collect();
        // 29 November 2026 is a Sunday: day 1 of Spark's week.
        assert_eq!(values, [2026, 11, 29, 1, 4, 333]);
        let sign = column("SELECT sign(CAST(-2.5 AS DOUBLE))").await;
        assert_eq!(
            datafusion::arrow::compute::cast(&sign, &arrow_schema::DataType::Utf8).unwrap().as_any().downcast_ref::<StringArray>().unwrap().value(0),
            "-1.0"
        );
        let var = column("SELECT variance(x) FROM (VALUES (1.0), (2.0), (4.0)) AS t(x)").await;
        let var = var.as_any().downcast_ref::<arrow_array::Float64Array>().unwrap().value(0);
        assert!((var - 7.0 / 3.0).abs() < 1e-12, "{var}");
    }
}
