"""Runs SQL files on pyspark (local mode), the Spark way, for lensflow's parity tests.

    python3 run_sql.py PLAN.json

PLAN.json: {"out": DIR, "runs": [{"name": RUN, "tables": {VIEW: [PARQUET FILE, ...]},
"set": {NAME: VALUE}, "steps": [[STEP, SQL FILE], ...]}, ...]}

Per run, each table becomes a temporary view over its Parquet files, and each variable is set
with Spark SQL's own `SET NAME=VALUE`, so Spark itself substitutes the files' `${NAME}`
(spark.sql.variable.substitute). Each step runs one SQL file as it is written, becomes a view
named STEP (so a later step can read it, as a lookup reads `features`), and is written to
DIR/RUN/STEP/ as Parquet, with DIR/RUN/STEP.json holding Spark's column types and the seconds
the step took. A step Spark rejects leaves DIR/RUN/STEP.json holding {"error": MESSAGE} instead,
and the run goes on. DIR/spark-version holds the Spark version. One Spark session serves every
run.
"""

import json
import os
import sys
import time

from pyspark.sql import SparkSession


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("lensflow-parity")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    out = plan["out"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "spark-version"), "w") as f:
        f.write(spark.version)
    for run in plan["runs"]:
        folder = os.path.join(out, run["name"])
        os.makedirs(folder, exist_ok=True)
        for view, files in run["tables"].items():
            spark.read.parquet(*files).createOrReplaceTempView(view)
        for name, value in run["set"].items():
            spark.sql(f"SET {name}={value}")
        for step, path in run["steps"]:
            with open(path) as f:
                sql = f.read()
            start = time.perf_counter()
            try:
                # Materialised once, so the view later steps read and the files written are
                # the same rows.
                result = spark.sql(sql).localCheckpoint(eager=True)
            except Exception as e:  # Spark's own error is the answer for this step.
                with open(os.path.join(folder, f"{step}.json"), "w") as f:
                    json.dump({"error": str(e).splitlines()[0]}, f)
                continue
            seconds = time.perf_counter() - start
            result.createOrReplaceTempView(step)
            result.write.mode("overwrite").parquet(os.path.join(folder, step))
            schema = [[fld.name, fld.dataType.simpleString()] for fld in result.schema.fields]
            with open(os.path.join(folder, f"{step}.json"), "w") as f:
                json.dump({"columns": schema, "seconds": seconds}, f)
    spark.stop()


if __name__ == "__main__":
    main()
