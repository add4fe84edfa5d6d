-- Features of every device: the row's own columns, nothing from other rows, so a request that
-- carries a device's columns gets exactly the features the trainer saw. The trainer
-- standardises each feature. The thresholds are the operating limits efficiency is judged by
-- (over 8 hours a day in use, under 5 kWh, at most 35 months old, no malfunction). The device
-- type is one-hot with Smart Speaker as the reference level, so the indicators are not
-- collinear with the intercept. The 0/1 flags are cast to DOUBLE: a bare 1.0 would be a DECIMAL
-- on Spark (tests/spark.rs runs this file on Spark itself).
SELECT *,
  CAST(smart_home_efficiency AS DOUBLE) AS efficient,
  CAST(malfunction_incidents AS DOUBLE) AS incidents,
  CAST(user_preferences AS DOUBLE) AS prefers_automation,
  CAST(CASE WHEN usage_hours_per_day > 8.0 THEN 1 ELSE 0 END AS DOUBLE) AS heavy_use,
  CAST(CASE WHEN energy_consumption < 5.0 THEN 1 ELSE 0 END AS DOUBLE) AS low_energy,
  CAST(CASE WHEN device_age_months <= 35 THEN 1 ELSE 0 END AS DOUBLE) AS young,
  CAST(CASE WHEN malfunction_incidents = 0 THEN 1 ELSE 0 END AS DOUBLE) AS no_malfunctions,
  usage_hours_per_day AS usage_hours,
  energy_consumption AS energy_kwh,
  CAST(device_age_months AS DOUBLE) AS device_age,
  CAST(malfunction_incidents AS DOUBLE) AS malfunctions,
  CAST(CASE WHEN device_type = 'Camera' THEN 1 ELSE 0 END AS DOUBLE) AS is_camera,
  CAST(CASE WHEN device_type = 'Lights' THEN 1 ELSE 0 END AS DOUBLE) AS is_lights,
  CAST(CASE WHEN device_type = 'Security System' THEN 1 ELSE 0 END AS DOUBLE) AS is_security_system,
  CAST(CASE WHEN device_type = 'Thermostat' THEN 1 ELSE 0 END AS DOUBLE) AS is_thermostat
FROM devices
