-- Point-in-time features of every rating in `ratings`.
--
-- A rating's features use only ratings with strictly earlier timestamps (the window frames end
-- at `1 PRECEDING` of the integer `ts`): exactly what a live system knew at that moment.
-- Serving evaluates the final SELECT's feature expressions on a request's row, whose state
-- columns (u_n … m_ts) come from the lookup tables (lookup_*.sql) instead of the windows; the
-- trainer checks, every round, that the two agree.
--
-- Written in the common subset of Spark SQL and DataFusion SQL, types included: a bare 1.0 is
-- a DECIMAL on Spark and a DOUBLE on DataFusion, so 0/1 flags are cast to DOUBLE (tests/spark.rs
-- runs this file on Spark itself). ${...} are Spark-style variables
-- (spark.sql.variable.substitute), substituted by lensflow before running (see
-- pipeline.toml's [features.constants] and [features.variables]):
--   ${shrink}       weight of the prior in every shrunk statistic
--   ${prior_mean}   mean training rating
--   ${prior_var}    variance of the training ratings
--   ${prior_liked}  share of liked training ratings
WITH rated AS (
  SELECT user_id, movie_id, rating, ts,
         CAST(CASE WHEN rating >= 4.0 THEN 1 ELSE 0 END AS DOUBLE) AS liked
  FROM ratings
),
first_pass AS (
  SELECT user_id, movie_id, rating, ts, liked,
    COUNT(rating)       OVER (PARTITION BY user_id  ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS u_count,
    SUM(rating)         OVER (PARTITION BY user_id  ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS u_sum_raw,
    SUM(rating*rating)  OVER (PARTITION BY user_id  ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS u_sumsq_raw,
    SUM(liked)          OVER (PARTITION BY user_id  ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS u_liked_raw,
    MAX(ts)             OVER (PARTITION BY user_id  ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS u_ts_raw,
    COUNT(rating)       OVER (PARTITION BY movie_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m_count,
    SUM(rating)         OVER (PARTITION BY movie_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m_sum_raw,
    SUM(rating*rating)  OVER (PARTITION BY movie_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m_sumsq_raw,
    SUM(liked)          OVER (PARTITION BY movie_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m_liked_raw,
    MIN(ts)             OVER (PARTITION BY movie_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m_ts_raw
  FROM rated
),
-- How far each rating sits from the other side's (shrunk) mean at its own moment: summed over a
-- user's earlier ratings this is the user's bias against the movies they rated, and vice versa.
-- The residual is linear in the prior, rating - (sum + shrink * prior) / (n + shrink) =
-- a - prior * b, so the windows sum a and b, which no round's prior changes; the final SELECT
-- applies this round's ${prior_mean}. Everything before it is the same in every round, so a
-- rating's state is computed once (incremental rounds).
residuals AS (
  SELECT *,
    rating - COALESCE(m_sum_raw, 0.0) / (m_count + ${shrink}) AS u_resid_one_a,
    CAST(${shrink} AS DOUBLE) / (m_count + ${shrink}) AS u_resid_one_b,
    rating - COALESCE(u_sum_raw, 0.0) / (u_count + ${shrink}) AS m_resid_one_a,
    CAST(${shrink} AS DOUBLE) / (u_count + ${shrink}) AS m_resid_one_b
  FROM first_pass
),
second_pass AS (
  SELECT *,
    SUM(u_resid_one_a) OVER (PARTITION BY user_id  ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS u_resid_a_raw,
    SUM(u_resid_one_b) OVER (PARTITION BY user_id  ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS u_resid_b_raw,
    SUM(m_resid_one_a) OVER (PARTITION BY movie_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m_resid_a_raw,
    SUM(m_resid_one_b) OVER (PARTITION BY movie_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m_resid_b_raw
  FROM residuals
),
stats AS (
  SELECT user_id, movie_id, rating, liked, ts, u_resid_one_a, u_resid_one_b, m_resid_one_a, m_resid_one_b,
    CAST(u_count AS DOUBLE) AS u_n,
    COALESCE(u_sum_raw, 0.0) AS u_sum,
    COALESCE(u_sumsq_raw, 0.0) AS u_sumsq,
    COALESCE(u_liked_raw, 0.0) AS u_liked_n,
    COALESCE(u_resid_a_raw, 0.0) AS u_resid_a,
    COALESCE(u_resid_b_raw, 0.0) AS u_resid_b,
    CAST(COALESCE(u_ts_raw, 0) AS DOUBLE) AS u_ts,
    CAST(m_count AS DOUBLE) AS m_n,
    COALESCE(m_sum_raw, 0.0) AS m_sum,
    COALESCE(m_sumsq_raw, 0.0) AS m_sumsq,
    COALESCE(m_liked_raw, 0.0) AS m_liked_n,
    COALESCE(m_resid_a_raw, 0.0) AS m_resid_a,
    COALESCE(m_resid_b_raw, 0.0) AS m_resid_b,
    CAST(COALESCE(m_ts_raw, 0) AS DOUBLE) AS m_ts
  FROM second_pass
)
SELECT user_id, movie_id, rating, liked, ts, u_resid_one_a, u_resid_one_b, m_resid_one_a, m_resid_one_b,
  u_n, u_sum, u_sumsq, u_liked_n, u_resid_a, u_resid_b, u_ts,
  m_n, m_sum, m_sumsq, m_liked_n, m_resid_a, m_resid_b, m_ts,
  LN(1.0 + u_n) AS u_log_n,
  (u_sum + ${shrink} * ${prior_mean}) / (u_n + ${shrink}) AS u_mean,
  SQRT((CASE WHEN u_n > 0 THEN GREATEST(u_sumsq - u_sum * u_sum / u_n, 0.0) ELSE 0.0 END + ${shrink} * ${prior_var}) / (u_n + ${shrink})) AS u_sd,
  (u_liked_n + ${shrink} * ${prior_liked}) / (u_n + ${shrink}) AS u_liked,
  (u_resid_a - ${prior_mean} * u_resid_b) / (u_n + ${shrink}) AS u_bias,
  CASE WHEN u_n > 0 THEN LN(1.0 + GREATEST((CAST(ts AS DOUBLE) - u_ts) / 86400.0, 0.0)) ELSE 0.0 END AS u_recency,
  LN(1.0 + m_n) AS m_log_n,
  (m_sum + ${shrink} * ${prior_mean}) / (m_n + ${shrink}) AS m_mean,
  SQRT((CASE WHEN m_n > 0 THEN GREATEST(m_sumsq - m_sum * m_sum / m_n, 0.0) ELSE 0.0 END + ${shrink} * ${prior_var}) / (m_n + ${shrink})) AS m_sd,
  (m_liked_n + ${shrink} * ${prior_liked}) / (m_n + ${shrink}) AS m_liked,
  (m_resid_a - ${prior_mean} * m_resid_b) / (m_n + ${shrink}) AS m_bias,
  CASE WHEN m_n > 0 THEN LN(1.0 + GREATEST((CAST(ts AS DOUBLE) - m_ts) / 86400.0, 0.0)) ELSE 0.0 END AS m_age
FROM stats
