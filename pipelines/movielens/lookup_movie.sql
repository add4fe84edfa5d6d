-- Every movie's statistics over all of a round's ratings (see lookup_user.sql); a movie's
-- age counts from its first rating.
SELECT movie_id,
  CAST(COUNT(rating) AS DOUBLE) AS m_n,
  SUM(rating) AS m_sum,
  SUM(rating * rating) AS m_sumsq,
  SUM(liked) AS m_liked_n,
  SUM(m_resid_one_a) AS m_resid_a,
  SUM(m_resid_one_b) AS m_resid_b,
  CAST(MIN(ts) AS DOUBLE) AS m_ts
FROM features
GROUP BY movie_id
ORDER BY movie_id
