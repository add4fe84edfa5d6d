-- Statistics of every user (or movie) over all of the round's ratings: the lookup table the API
-- turns into features "now" with lensflow_core::model::feature_row. Reads the materialised
-- output of features.sql. ${side} is `user` or `movie`, ${ts_agg} MAX for users (last rating)
-- and MIN for movies (first rating).
SELECT ${side}_id AS id,
  CAST(COUNT(rating) AS DOUBLE) AS n,
  SUM(rating) AS sum,
  SUM(rating * rating) AS sumsq,
  SUM(liked) AS liked,
  SUM(${resid}) AS resid,
  CAST(${ts_agg}(ts) AS DOUBLE) AS ts
FROM features
GROUP BY ${side}_id
ORDER BY id
