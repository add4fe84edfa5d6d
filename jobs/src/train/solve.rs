//! The solvers, split so the heavy part runs on the cluster: every pass over the training rows
//! is one aggregate query (sums of products of standardised features), and the trainer only
//! solves the small linear systems those sums form.
//!
//! - least squares: one pass gives X'X and X'y; the normal equations give the coefficients;
//! - logistic regression: each Newton (IRLS) step is one pass giving the gradient and the
//!   Hessian X'WX at the current coefficients.

use linfa_linalg::cholesky::SolveCInplace;
use ndarray::{Array1, Array2};

use lensflow_core::model::{LinearModel, Scaling};

/// SQL expression of feature `i` of all `features` standardised.
fn z(features: &[String], scaling: &Scaling, i: usize) -> String {
    format!("(({} - ({:?})) / {:?})", features[i], scaling.mean[i], scaling.scale[i])
}

/// SQL expression of a model's score (the linear predictor) on a row of `features` (all of the
/// pipeline's features, which `scaling` standardises; the model uses those in `model.uses`).
pub fn score_sql(features: &[String], scaling: &Scaling, model: &LinearModel) -> String {
    let mut s = format!("({:?}", model.intercept);
    for (c, &i) in model.coefficients.iter().zip(&model.uses) {
        s.push_str(&format!(" + ({c:?}) * {}", z(features, scaling, i)));
    }
    s.push(')');
    s
}

/// The aggregate query of a weighted Gram matrix over `[1, z_u1..z_ud]` (the features at
/// positions `uses`) and the weighted products with `target`: `SUM(w·x_j·x_k)` for `j <= k`,
/// then `SUM(t·x_j)`. `weight` and `target` are SQL expressions over the `carry` columns,
/// `z0..` and `score` (the given model score of the row, when one is given).
#[allow(clippy::too_many_arguments)]
pub fn gram_sql(
    features: &[String],
    scaling: &Scaling,
    uses: &[usize],
    filter: &str,
    carry: &[&str],
    score: Option<&str>,
    weight: &str,
    target: &str,
) -> String {
    let d = uses.len();
    let zs: Vec<String> = uses.iter().enumerate().map(|(j, &i)| format!("{} AS z{j}", z(features, scaling, i))).collect();
    let x = |j: usize| if j == 0 { "1.0".to_string() } else { format!("z{}", j - 1) };
    let mut aggs = Vec::new();
    for j in 0..=d {
        for k in j..=d {
            aggs.push(format!("SUM({weight} * {} * {})", x(j), x(k)));
        }
    }
    for j in 0..=d {
        aggs.push(format!("SUM({target} * {})", x(j)));
    }
    let score = score.map(|s| format!(", {s} AS score")).unwrap_or_default();
    format!("WITH zs AS (SELECT {}, {}{score} FROM features WHERE {filter}) SELECT {} FROM zs", carry.join(", "), zs.join(", "), aggs.join(", "))
}

/// Unpacks [`gram_sql`]'s row into the matrix and vector.
pub fn unpack_gram(d: usize, row: &[f64]) -> (Array2<f64>, Array1<f64>) {
    let n = d + 1;
    let mut a = Array2::zeros((n, n));
    let mut idx = 0;
    for j in 0..n {
        for k in j..n {
            a[[j, k]] = row[idx];
            a[[k, j]] = row[idx];
            idx += 1;
        }
    }
    let b = Array1::from_iter(row[idx..idx + n].iter().copied());
    (a, b)
}

/// Solves `(A + ridge·I') x = b` for symmetric positive definite `A` (the intercept, index 0,
/// is not penalised). A tiny ridge is added only if `A` alone is singular.
pub fn solve_spd(a: &Array2<f64>, b: &Array1<f64>, ridge: f64) -> Option<Array1<f64>> {
    for extra in [0.0, 1e-9, 1e-6, 1e-3] {
        let mut m = a.clone();
        let scale = (0..m.nrows()).map(|i| m[[i, i]].abs()).fold(0.0, f64::max).max(1.0);
        for i in 1..m.nrows() {
            m[[i, i]] += ridge + extra * scale;
        }
        // Factorises `m` in place, then solves against the factor.
        let mut rhs = b.clone().insert_axis(ndarray::Axis(1));
        if m.solvec_inplace(&mut rhs).is_ok() && rhs.iter().all(|v| v.is_finite()) {
            return Some(rhs.column(0).to_owned());
        }
    }
    None
}

/// A model over the features at `uses` from a solution vector `[intercept, coefficients…]`.
pub fn model_of(x: &Array1<f64>, uses: &[usize]) -> LinearModel {
    LinearModel { uses: uses.to_vec(), intercept: x[0], coefficients: x.iter().skip(1).copied().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_equations_recover_known_coefficients() {
        // y = 1 + 2·z0 - 3·z1 on four exact points.
        let rows = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]];
        let mut a = Array2::<f64>::zeros((3, 3));
        let mut b = Array1::<f64>::zeros(3);
        for r in rows {
            let x = [1.0, r[0], r[1]];
            let y = 1.0 + 2.0 * r[0] - 3.0 * r[1];
            for j in 0..3 {
                for k in 0..3 {
                    a[[j, k]] += x[j] * x[k];
                }
                b[j] += x[j] * y;
            }
        }
        let x = solve_spd(&a, &b, 0.0).unwrap();
        for (got, want) in x.iter().zip([1.0, 2.0, -3.0]) {
            assert!((got - want).abs() < 1e-12, "{x}");
        }
    }

    #[test]
    fn gram_unpacks_symmetric() {
        let (a, b) = unpack_gram(1, &[4.0, 2.0, 3.0, 10.0, 7.0]);
        assert_eq!(a, ndarray::arr2(&[[4.0, 2.0], [2.0, 3.0]]));
        assert_eq!(b, ndarray::arr1(&[10.0, 7.0]));
    }
}
