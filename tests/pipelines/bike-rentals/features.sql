-- Each hour's features: the weather that hour, and the station's earlier hours (strictly
-- before `ts`), shrunk towards the overall mean.
WITH hist AS (
  SELECT *,
    COUNT(rentals) OVER (PARTITION BY station_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS s_count,
    SUM(rentals) OVER (PARTITION BY station_id ORDER BY ts RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS s_sum_raw
  FROM trips
),
state AS (
  SELECT *, CAST(s_count AS DOUBLE) AS s_n, CAST(COALESCE(s_sum_raw, 0) AS DOUBLE) AS s_sum FROM hist
)
SELECT station_id, ts, temperature, is_weekend, weather, kafka_partition, kafka_offset, s_n, s_sum,
  CAST(rentals AS DOUBLE) AS rentals_n,
  CASE WHEN rentals >= 20 THEN 1.0 ELSE 0.0 END AS busy,
  temperature AS temp_c,
  CAST(is_weekend AS DOUBLE) AS weekend,
  CASE WHEN weather = 'rain' THEN 1.0 ELSE 0.0 END AS rainy,
  (s_sum + ${k} * ${prior_rentals}) / (s_n + ${k}) AS station_mean,
  LN(1.0 + s_n) AS station_log_n
FROM state
