-- Each station's hours so far: what serving turns into the station's features "now".
SELECT station_id, CAST(COUNT(*) AS DOUBLE) AS s_n, SUM(rentals_n) AS s_sum
FROM features
GROUP BY station_id
ORDER BY station_id
