-- Every user's statistics over all of a round's ratings: the state serving turns into features
-- "now" with the final SELECT of features.sql. Reads that SQL's materialised output, so the
-- residuals are the ones each rating had at its own moment.
SELECT user_id,
  CAST(COUNT(rating) AS DOUBLE) AS u_n,
  SUM(rating) AS u_sum,
  SUM(rating * rating) AS u_sumsq,
  SUM(liked) AS u_liked_n,
  SUM(u_resid_one_a) AS u_resid_a,
  SUM(u_resid_one_b) AS u_resid_b,
  CAST(MAX(ts) AS DOUBLE) AS u_ts
FROM features
GROUP BY user_id
ORDER BY user_id
