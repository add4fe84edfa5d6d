-- Features of every device: the row's own columns, nothing from other rows, so a request that
-- carries a device's columns gets exactly the features the trainer saw. The trainer
-- standardises each feature. The thresholds are the operating limits efficiency is judged by
-- (over 8 hours a day in use, under 5 kWh, at most 35 months old, no malfunction). The device
-- type is one-hot with Smart Speaker as the reference level, so the indicators are not
-- collinear with the intercept.
SELECT *,
  CAST(smart_home_efficiency AS DOUBLE) AS efficient,
  CAST(malfunction_incidents AS DOUBLE) AS incidents,
  CAST(user_preferences AS DOUBLE) AS prefers_automation,
  CASE WHEN usage_hours_per_day > 8.0 THEN 1.0 ELSE 0.0 END AS heavy_use,
  CASE WHEN energy_consumption < 5.0 THEN 1.0 ELSE 0.0 END AS low_energy,
  CASE WHEN device_age_months <= 35 THEN 1.0 ELSE 0.0 END AS young,
  CASE WHEN malfunction_incidents = 0 THEN 1.0 ELSE 0.0 END AS no_malfunctions,
  usage_hours_per_day AS usage_hours,
  energy_consumption AS energy_kwh,
  CAST(device_age_months AS DOUBLE) AS device_age,
  CAST(malfunction_incidents AS DOUBLE) AS malfunctions,
  CASE WHEN device_type = 'Camera' THEN 1.0 ELSE 0.0 END AS is_camera,
  CASE WHEN device_type = 'Lights' THEN 1.0 ELSE 0.0 END AS is_lights,
  CASE WHEN device_type = 'Security System' THEN 1.0 ELSE 0.0 END AS is_security_system,
  CASE WHEN device_type = 'Thermostat' THEN 1.0 ELSE 0.0 END AS is_thermostat
FROM devices
