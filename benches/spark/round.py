"""One lensflow training round, done the Spark way: the baseline lensflow's speed and memory are
measured against (issue 14).

    python3 benches/spark/round.py --pipeline pipelines/movielens \
        --events 'data/lake/movielens/events/*.parquet' [--master local[2]] [--driver-memory 8g] \
        [--shuffle-partitions 4] [--out FILE]

lensflow replaced a PySpark MLlib stack. To say how much faster and leaner it is, the same round
has to run on Spark over the same data in the same run: the pipeline's own feature SQL, run by
Spark SQL exactly as shipped (its `${name}` variables set with `SET name=value`, as
tests/spark/run_sql.py does), and the same three models fitted with pyspark.ml. The round follows
jobs/src/train/mod.rs step by step, each step a timed stage:

    read            load the event Parquet files, count them
    split           hold out the newest share (pipeline.toml's holdout.newest) by event time, or
                    by arrival within each Kafka partition when the pipeline has no time column
    variables       the pipeline's [features.variables] aggregates over the training events
    features        features.sql over every event, cached and counted; standardisation (mean and
                    population standard deviation on the training rows); the training and hold-out
                    rows assembled into vectors and cached
    regression      LinearRegression of models.regression.target
    classification  LogisticRegression of models.classification.label
    segments        KMeans of models.clustering.entity on its profile, and the silhouette
    evaluate        RMSE, MAE, AUC and accuracy on the hold-out, beside lensflow's baselines

lensflow's round also writes lookup tables and checks serving's expressions; those have no Spark
counterpart here, so compare this total with lensflow's stages features + regression +
classification + evaluate + segments.

It prints one JSON object (and writes it to --out): seconds per stage and in total, rows, the
variables, the metrics with the names model.json gives them, the fitted models (so a reader can
see they are lensflow's models, not just similar numbers), the Spark version, and memory. In local
mode the driver JVM does all of Spark's work, so its resident set is what Spark costs: a thread
samples the JVM's VmRSS every 0.2 s (per stage and overall), and the kernel's own high-water mark
(VmHWM) is read at the end, which also catches a peak between samples. The Python process's peak
is reported too; it holds little beyond the small results it collects.

Needs the standard library, pyspark (pyspark==4.3.0, a Java 17 runtime) and numpy, which
pyspark.ml and the silhouette use; `pip install pyspark==4.3.0` alone does not bring it.
"""

import argparse
import glob
import json
import math
import os
import re
import resource
import sys
import threading
import time
import tomllib

import numpy as np
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.clustering import KMeans
from pyspark.ml.evaluation import BinaryClassificationEvaluator, MulticlassClassificationEvaluator, RegressionEvaluator
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.regression import LinearRegression
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

# lensflow's trainer, for the settings below: jobs/src/train/mod.rs (split, variables, scaling,
# regression, Newton steps, evaluation) and jobs/src/train/segments.rs (k-means, silhouette).
KAFKA_PARTITION, KAFKA_OFFSET = "kafka_partition", "kafka_offset"
SILHOUETTE_ENTITIES = 1000
KMEANS_ITERATIONS, KMEANS_TOLERANCE, KMEANS_SEED = 300, 1e-8, 42
SAMPLE_SECONDS = 0.2


def main():
    args = parse_args()
    with open(os.path.join(args.pipeline, "pipeline.toml"), "rb") as f:
        definition = tomllib.load(f)
    # The machine's load around the run: timings from a busy machine say so.
    load_before = os.getloadavg()[0]
    memory = MemorySampler(os.getpid())
    memory.start()
    clock = Clock(memory)

    spark = (
        SparkSession.builder.master(args.master)
        .appName("lensflow-spark-round")
        # In local mode this sizes the JVM spark-submit starts (its -Xmx).
        .config("spark.driver.memory", args.driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        # lensflow plans its queries with 4 partitions (train --partitions); Spark's default of
        # 200 would spend a round on scheduling empty tasks.
        .config("spark.sql.shuffle.partitions", str(args.shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    clock.lap("start")

    report = Round(spark, definition, args.pipeline, clock).run(args.events)

    memory.stop()
    report["spark"] = spark.version
    report["master"] = args.master
    report["driver_memory"] = args.driver_memory
    report["shuffle_partitions"] = args.shuffle_partitions
    report["cores"] = os.cpu_count()
    report["load_average"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    report["seconds"] = {k: round(v, 3) for k, v in clock.seconds.items() if k != "start"}
    report["total_seconds"] = round(sum(report["seconds"].values()), 3)
    # JVM start and session creation: paid once per process, not per round.
    report["start_seconds"] = round(clock.seconds["start"], 3)
    report["memory"] = memory.report(clock.stage_peaks)
    spark.stop()

    # Indented, with each list of numbers on one line.
    text = re.sub(r"\[[^\[\]{}\"]*\]", lambda m: json.dumps(json.loads(m.group(0))), json.dumps(report, indent=2))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


def parse_args():
    p = argparse.ArgumentParser(description="One lensflow training round on pyspark, timed per stage, with peak memory.")
    p.add_argument("--pipeline", required=True, help="a pipeline folder (pipeline.toml and its SQL files), e.g. pipelines/movielens")
    p.add_argument("--events", required=True, help="the lake's event Parquet files: a glob or a folder, e.g. LAKE/movielens/events/*.parquet")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="8g")
    p.add_argument("--shuffle-partitions", type=int, default=4)
    p.add_argument("--out", help="also write the JSON report here")
    return p.parse_args()


class Round:
    """One round of one pipeline on one Spark session, stage by stage."""

    def __init__(self, spark, definition, folder, clock):
        self.spark, self.d, self.folder, self.clock = spark, definition, folder, clock
        self.table = definition["events"]["table"]
        self.time = definition["events"].get("time")
        self.features = definition["features"]["names"]
        self.models = definition["models"]

    def sql_file(self, name):
        with open(os.path.join(self.folder, name)) as f:
            return f.read()

    def row(self, sql):
        """The first row of a query, as floats (Spark gives DECIMAL for some aggregates)."""
        return [None if v is None else float(v) for v in self.spark.sql(sql).first()]

    def run(self, events):
        spark, table, clock = self.spark, self.table, self.clock

        files = sorted(glob.glob(os.path.join(events, "*.parquet"))) if os.path.isdir(events) else sorted(glob.glob(events))
        if not files:
            sys.exit(f"no Parquet files match {events}")
        # Every file given is read, where lensflow reads only the files its committed
        # manifests name: the two see the same events only if these are exactly those files.
        spark.read.parquet(*files).createOrReplaceTempView(table)
        n = spark.table(table).count()
        check_committed(files, n)
        clock.lap("read")

        train_filter, test_filter, order_by = self.split(n)
        clock.lap("split")

        variables = self.variables(train_filter)
        clock.lap("variables")

        train, test, scaling, stats = self.materialise(train_filter, test_filter)
        clock.lap("features")

        regression = self.regression(train)
        clock.lap("regression")

        classification = self.classification(train)
        clock.lap("classification")

        segments, silhouette, entities = self.segments(train_filter, order_by)
        clock.lap("segments")

        metrics = self.evaluate(test, regression, classification, stats)
        metrics["silhouette"] = silhouette
        clock.lap("evaluate")

        train.unpersist()
        test.unpersist()
        return {
            "pipeline": self.d["name"],
            "events": events,
            "files": len(files),
            "rows": {"events": n, "train": stats["train_rows"], "test": metrics["test_rows"], "segmented": entities},
            "variables": variables,
            "metrics": metrics,
            "models": {
                "scaling": scaling,
                "regression": linear_model(regression, self.uses("regression")),
                "classification": dict(linear_model(classification, self.uses("classification")), iterations=classification.summary.totalIterations),
                "segments": segments,
            },
        }

    def split(self, n):
        """The hold-out filters, as jobs/src/train/mod.rs finds them."""
        share = self.d.get("holdout", {}).get("newest", 0.2)
        table = self.table
        if self.time:
            # The event time at position floor(n * (1 - share)) in time order: everything at or
            # after it is held out, so ties at the cutoff all land on the same side.
            offset = math.floor(n * (1.0 - share))
            cutoff = self.spark.sql(f"SELECT {self.time} FROM {table} ORDER BY {self.time} LIMIT 1 OFFSET {offset}").first()[0]
            return f"{self.time} < {cutoff}", f"{self.time} >= {cutoff}", self.time
        # No event time: arrival order, which Kafka defines only within a partition.
        rows = self.spark.sql(
            f"SELECT {KAFKA_PARTITION}, {KAFKA_OFFSET} FROM (SELECT {KAFKA_PARTITION}, {KAFKA_OFFSET}, "
            f"ROW_NUMBER() OVER (PARTITION BY {KAFKA_PARTITION} ORDER BY {KAFKA_OFFSET}) AS rn, "
            f"COUNT(*) OVER (PARTITION BY {KAFKA_PARTITION}) AS n FROM {table}) t "
            f"WHERE rn = CAST(FLOOR(n * {1.0 - share!r}) AS BIGINT) + 1 ORDER BY {KAFKA_PARTITION}"
        ).collect()
        cuts = [f"({KAFKA_PARTITION} = {p} AND {KAFKA_OFFSET} >= {o})" for p, o in rows]
        test = f"({' OR '.join(cuts)})" if cuts else "FALSE"
        return f"NOT {test}", test, f"{KAFKA_PARTITION}, {KAFKA_OFFSET}"

    def variables(self, train_filter):
        """Sets the constants and this round's variables (computed on the training events) the
        Spark way, so Spark itself substitutes the SQL files' `${name}`."""
        values = dict(self.d["features"].get("constants", {}))
        exprs = self.d["features"].get("variables", {})
        if exprs:
            # The expressions run as Spark SQL: where one averages a bare 1.0 (a DECIMAL on
            # Spark, a DOUBLE on DataFusion), Spark rounds the average to a few decimals
            # (movielens' prior_liked to 5), so such a variable differs from lensflow's in its
            # 6th decimal. That is Spark running the shipped SQL, and moves no metric visibly.
            v = self.row(f"SELECT COUNT(*), {', '.join(exprs.values())} FROM {self.table} WHERE {train_filter}")
            if v[0] < 10:
                sys.exit(f"only {v[0]:.0f} events are older than the hold-out")
            values.update(zip(exprs.keys(), v[1:]))
        for name, value in values.items():
            # repr: the shortest text that reads back as the same double, as lensflow's `{v:?}`.
            self.spark.sql(f"SET {name}={float(value)!r}")
        return values

    def materialise(self, train_filter, test_filter):
        """The feature SQL as shipped, cached; then standardisation and the model inputs."""
        spark, features = self.spark, self.features
        target, label = self.models["regression"]["target"], self.models["classification"]["label"]
        rows = spark.sql(self.sql_file(self.d["features"]["sql"])).cache()
        rows.count()
        rows.createOrReplaceTempView("features")

        # Standardised on the training rows with the population standard deviation, as lensflow
        # does (pyspark.ml's StandardScaler divides by the sample one), so the coefficients
        # below are directly comparable with model.json's.
        aggs = ["COUNT(*)", f"AVG({target})", f"AVG({label})"]
        for f in features:
            aggs += [f"AVG({f})", f"STDDEV_POP({f})"]
        s = self.row(f"SELECT {', '.join(aggs)} FROM features WHERE {train_filter}")
        mean = s[3::2]
        scale = [sd if sd is not None and sd > 1e-12 else 1.0 for sd in s[4::2]]
        stats = {"train_rows": int(s[0]), "target_mean": s[1], "label_share": s[2]}

        z = [((F.col(f) - F.lit(m)) / F.lit(sc)).alias(f"z_{f}") for f, m, sc in zip(features, mean, scale)]

        def assembled(condition):
            # Each model reads its own features (all of them unless pipeline.toml names some).
            data = rows.where(condition).select(target, label, *z)
            for model in ("regression", "classification"):
                used = [f"z_{features[i]}" for i in self.uses(model)]
                data = VectorAssembler(inputCols=used, outputCol=f"x_{model}").transform(data)
            # Both models and the evaluation read these: cached once, as lensflow keeps the
            # features.
            return data.select(target, label, "x_regression", "x_classification").cache()

        train, test = assembled(train_filter), assembled(test_filter)
        train.count()
        test.count()
        return train, test, {"mean": mean, "scale": scale}, stats

    def uses(self, model):
        """Positions of a model's features: all, unless pipeline.toml names a subset."""
        subset = self.models[model].get("features")
        return list(range(len(self.features))) if subset is None else [self.features.index(f) for f in subset]

    def regression(self, train):
        # lensflow: least squares, one pass for X'X and X'y, then the normal equations. Spark's
        # "normal" solver is the same (one pass for the Gram matrix, then a Cholesky solve), with
        # no penalty and no further standardisation. Same model, to rounding.
        return LinearRegression(
            featuresCol="x_regression",
            labelCol=self.models["regression"]["target"],
            predictionCol="linear",
            solver="normal",
            regParam=0.0,
            elasticNetParam=0.0,
            standardization=False,
            fitIntercept=True,
        ).fit(train)

    def classification(self, train):
        c = self.models["classification"]
        # lensflow: Newton (IRLS) steps from the intercept-only model, one pass each, until no
        # coefficient moves by 1e-9 (at most 25), with an optional ridge of
        # `ridge * training rows / 1000` on the summed log-likelihood. Spark's objective is the
        # mean log-loss plus regParam/2 * |w|^2, so regParam = ridge / 1000 is the same
        # penalty; neither penalises the intercept, and with standardization off Spark
        # penalises the coefficients of the already standardised features, as lensflow does.
        # What differs: Spark minimises by L-BFGS (many cheaper passes) and stops when the loss
        # changes by less than tol relative, not when the step is tiny; with tol 1e-9 it
        # reaches the same optimum to about 4 significant digits of each coefficient.
        # (pyspark.ml's GeneralizedLinearRegression(family="binomial") would do IRLS, but the
        # MLlib stack lensflow replaced used LogisticRegression.)
        return LogisticRegression(
            featuresCol="x_classification",
            labelCol=c["label"],
            predictionCol="predicted_label",
            probabilityCol="probability",
            rawPredictionCol="raw",
            family="binomial",
            regParam=c.get("ridge", 0.0) / 1000.0,
            elasticNetParam=0.0,
            standardization=False,
            fitIntercept=True,
            maxIter=200,
            tol=1e-9,
        ).fit(train)

    def segments(self, train_filter, order_by):
        """k-means of the clustered entity's profiles on the training rows, as segments.rs."""
        spark, c = self.spark, self.models["clustering"]
        profile = c["profile"]
        lookup = next((l for l in self.d.get("lookups", []) if l["name"] == c["entity"]), None)
        if lookup is not None:
            # An entity's profile is its state over the training rows (its lookup's own SQL,
            # reading only those rows as `features`), turned into profile features by the
            # feature SQL's final SELECT expressions: what serving would answer for it.
            sql = self.sql_file(lookup["sql"]).lstrip()
            cte = f"features AS (SELECT * FROM features_all WHERE {train_filter})"
            sql = f"WITH {cte}, {sql[5:]}" if sql[:5].lower() == "with " else f"WITH {cte} {sql}"
            spark.table("features").createOrReplaceTempView("features_all")
            spark.sql(sql).createOrReplaceTempView("entity_state")
            items = final_select_items(self.sql_file(self.d["features"]["sql"]))
            key = lookup["key"]
            entities = spark.sql(f"SELECT {key}, {', '.join(f'{items[p]} AS {p}' for p in profile)} FROM entity_state")
            order = [key]
        else:
            # Events are their own entities: each training event's profile features.
            order = [o.strip() for o in order_by.split(",")]
            entities = spark.sql(f"SELECT {', '.join(order)}, {', '.join(profile)} FROM features WHERE {train_filter}")
        entities = entities.cache()
        count = entities.count()
        if count < 2 * c.get("k", 4):
            sys.exit(f"{count} entities are too few for {c.get('k', 4)} segments")

        # Standardised over the entities (population standard deviation), as segments.rs does.
        stats = entities.select(*[F.avg(p) for p in profile], *[F.stddev_pop(p) for p in profile]).first()
        mean = [float(v) for v in stats[: len(profile)]]
        scale = [float(v) if v is not None and v > 1e-12 else 1.0 for v in stats[len(profile) :]]
        z = VectorAssembler(inputCols=[f"z_{p}" for p in profile], outputCol="z").transform(
            entities.select(*order, *[((F.col(p) - m) / s).alias(f"z_{p}") for p, m, s in zip(profile, mean, scale)])
        )

        # lensflow: linfa's k-means, k-means++ seeding (seed 42), one run, at most 300
        # iterations, stopping when the centroids move less than 1e-8 in all. Spark has no
        # k-means++; its k-means|| (two rounds) is the parallel form of it, so the seeds and
        # thus which local optimum is found may differ. Spark stops when every centroid moves
        # less than tol.
        model = KMeans(
            featuresCol="z",
            predictionCol="segment",
            k=c.get("k", 4),
            maxIter=KMEANS_ITERATIONS,
            tol=KMEANS_TOLERANCE,
            initMode="k-means||",
            seed=KMEANS_SEED,
        ).fit(z)

        # lensflow's silhouette: Euclidean distances among the first 1000 entities in key
        # order. (pyspark.ml's ClusteringEvaluator uses squared distances over all of them: a
        # different figure.)
        first = model.transform(z).orderBy(*order).limit(SILHOUETTE_ENTITIES).select("z", "segment").collect()
        silhouette = mean_silhouette(np.array([r["z"].toArray() for r in first]), np.array([r["segment"] for r in first]))

        sizes = model.summary.clusterSizes
        segments = [
            {"id": i, "size": sizes[i], "centroid": [float(v) for v in centre], "profile": {p: float(v * s + m) for p, v, s, m in zip(profile, centre, scale, mean)}}
            for i, centre in enumerate(model.clusterCenters())
        ]
        entities.unpersist()
        return {"iterations": model.summary.numIter, "segments": segments}, silhouette, count

    def evaluate(self, test, regression, classification, stats):
        """Hold-out metrics beside lensflow's baselines, with pyspark.ml's evaluators."""
        r = self.models["regression"]
        target, label = r["target"], self.models["classification"]["label"]
        scored = classification.transform(regression.transform(test))
        # lensflow clips the regression's answer to the pipeline's range before scoring it.
        lo, hi = r.get("clip", [None, None])
        pred = F.col("linear")
        if lo is not None:
            pred = F.least(F.greatest(pred, F.lit(float(lo))), F.lit(float(hi)))
        scored = scored.withColumn("predicted", pred).select(target, label, "predicted", "predicted_label", "probability").cache()
        n = scored.count()
        if n == 0:
            sys.exit("the hold-out is empty")

        def regression_metric(name):
            return RegressionEvaluator(labelCol=target, predictionCol="predicted", metricName=name).evaluate(scored)

        rmse, mae = regression_metric("rmse"), regression_metric("mae")
        # numBins=0: the exact ROC curve (lensflow bins probabilities by 1e-5, close to exact);
        # the evaluator's default of 1000 bins would cost AUC accuracy, not time worth saving.
        auc = BinaryClassificationEvaluator(rawPredictionCol="probability", labelCol=label, metricName="areaUnderROC", numBins=0).evaluate(scored)
        # Spark predicts 1 when the probability is above 0.5, lensflow at 0.5 or above: only an
        # exact 0.5 differs.
        accuracy = MulticlassClassificationEvaluator(labelCol=label, predictionCol="predicted_label", metricName="accuracy").evaluate(scored)
        # The baselines: the training mean for the regression, the training majority class.
        m = stats["target_mean"]
        base = scored.select(F.sum((F.lit(m) - F.col(target)) ** 2), F.sum(F.col(label))).first()
        positive_share = float(base[1]) / n
        scored.unpersist()
        rmse_baseline = math.sqrt(float(base[0]) / n)
        return {
            "train_rows": stats["train_rows"],
            "test_rows": n,
            "rmse": rmse,
            "mae": mae,
            "rmse_baseline": rmse_baseline,
            "r2": 1.0 - (rmse / rmse_baseline) ** 2 if rmse_baseline > 0 else 0.0,
            "auc": auc,
            "auc_baseline": 0.5,
            "accuracy": accuracy,
            "accuracy_baseline": positive_share if stats["label_share"] >= 0.5 else 1.0 - positive_share,
        }


def check_committed(files, rows):
    """Stops when the files hold other events than the committed batches of their lake (when
    they sit in a lake's events folder): a batch still being written, or files compacted
    beside the ones they replace, would make this a round over different data."""
    folders = {os.path.dirname(os.path.abspath(f)) for f in files}
    batches = [os.path.join(os.path.dirname(d), "_batches") for d in folders]
    if len(folders) != 1 or not os.path.isdir(batches[0]):
        return
    committed = 0
    for name in os.listdir(batches[0]):
        if name.endswith(".json"):
            with open(os.path.join(batches[0], name)) as f:
                committed += json.load(f)["rows"]
    if committed != rows:
        sys.exit(f"the files hold {rows} events but the lake's committed batches ({batches[0]}) hold {committed}: "
                 "give --events the event files of the committed batches only")


def linear_model(model, uses):
    return {"uses": uses, "intercept": float(model.intercept), "coefficients": [float(v) for v in model.coefficients]}


def mean_silhouette(z, labels):
    """Mean silhouette, defined as segments.rs defines it: an entity alone in its segment (among
    those scored) counts 0, and the mean is over all of them."""
    n = len(labels)
    if n == 0:
        return 0.0
    d = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(axis=2))
    members = np.eye(labels.max() + 1)[labels]
    sums = d @ members  # distance from each entity to each segment, summed
    counts = members.sum(axis=0)[None, :] - members  # members of each segment other than itself
    total = 0.0
    for i in range(n):
        own = labels[i]
        if counts[i, own] == 0:
            continue
        a = sums[i, own] / counts[i, own]
        others = [sums[i, c] / counts[i, c] for c in range(counts.shape[1]) if c != own and counts[i, c] > 0]
        if others:
            b = min(others)
            total += (b - a) / max(a, b)
    return total / n


def final_select_items(sql):
    """The feature SQL's final SELECT as {column name: expression}: what serving evaluates on a
    lookup's state. Scans the text at parenthesis depth 0 (the CTEs sit inside parentheses), so
    the last SELECT there is the final one and its items end at the FROM that follows."""
    text = re.sub(r"--[^\n]*", "", sql)  # the shipped SQL has no '--' inside strings
    depth, quoted, top = 0, False, []
    for i, ch in enumerate(text):
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        top.append(depth == 0 and not quoted)
    words = [(m.start(), m.group(0).upper()) for m in re.finditer(r"\b(?:SELECT|FROM)\b", text, re.IGNORECASE) if top[m.start()]]
    start = max(i for i, w in words if w == "SELECT") + len("SELECT")
    end = min(i for i, w in words if w == "FROM" and i > start)
    items, begin = [], start
    for i in range(start, end):
        if text[i] == "," and top[i]:
            items.append(text[begin:i])
            begin = i + 1
    items.append(text[begin:end])
    named = {}
    for item in (" ".join(i.split()) for i in items):
        m = re.fullmatch(r"(.+)\s+AS\s+(\w+)", item, re.IGNORECASE | re.DOTALL)
        if m:
            named[m.group(2)] = m.group(1)
        else:
            named[item] = item
    return named


class MemorySampler(threading.Thread):
    """Samples the resident set of the JVM Spark runs in, every 0.2 s.

    The JVM is found in /proc as the `java` process running SparkSubmit that descends from
    this one (spark-submit's script execs it, but a /proc scan does not depend on that), so
    sampling can start before the session does."""

    def __init__(self, parent):
        super().__init__(daemon=True)
        self.parent, self.pid = parent, None
        self.peak = self.stage_peak = 0  # KiB
        self.samples = 0
        self.lock = threading.Lock()
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(SAMPLE_SECONDS):
            if self.pid is None:
                self.pid = find_jvm(self.parent)
            rss = status_kib(self.pid, "VmRSS") if self.pid else None
            if rss is None:
                self.pid = None  # not there yet, or not the JVM after all: look again
                continue
            with self.lock:
                self.peak = max(self.peak, rss)
                self.stage_peak = max(self.stage_peak, rss)
                self.samples += 1

    def take_stage_peak(self):
        """The peak since the last call (one stage's), in MiB, and a fresh start for the next."""
        if self.pid is None:
            self.pid = find_jvm(self.parent)
        rss = status_kib(self.pid, "VmRSS") if self.pid else None
        with self.lock:
            peak = max(self.stage_peak, rss or 0)
            self.peak = max(self.peak, peak)
            self.stage_peak = 0
        return round(peak / 1024, 1)

    def stop(self):
        self.halt.set()
        self.join()

    def report(self, stage_peaks):
        # Read while the JVM is still up: VmHWM is its lifetime peak, samples or not.
        hwm = status_kib(self.pid, "VmHWM") if self.pid else None
        return {
            "jvm_pid": self.pid,
            "jvm_max_heap": jvm_max_heap(self.pid),
            "jvm_peak_rss_mib": round(self.peak / 1024, 1),
            "jvm_hwm_mib": round(hwm / 1024, 1) if hwm else None,
            "jvm_peak_rss_mib_by_stage": stage_peaks,
            "jvm_cpu_seconds": jvm_cpu_seconds(self.pid),
            "python_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "samples": self.samples,
            "sample_seconds": SAMPLE_SECONDS,
        }


def find_jvm(ancestor):
    """The pid of Spark's JVM (a `java` process running SparkSubmit) descending from
    `ancestor`, if there is one yet. spark-submit first runs a short-lived `java` of its own
    (Spark's launcher, given SparkSubmit as an argument) to build the JVM's command line: that
    one must not be mistaken for it."""
    parents, candidates = {}, []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # The name sits in parentheses and may hold spaces; the parent pid follows it.
        parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        if stat[stat.index("(") + 1 : stat.rindex(")")] == "java":
            candidates.append(int(entry))
    for pid in candidates:
        args = cmdline(pid)
        if "org.apache.spark.deploy.SparkSubmit" not in args or "org.apache.spark.launcher.Main" in args:
            continue
        p = pid
        while p in parents and p > 1:
            p = parents[p]
            if p == ancestor:
                return pid
    return None


def cmdline(pid):
    """The arguments of process `pid` ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except (OSError, TypeError):
        return []


def status_kib(pid, field):
    """A `kB` field of /proc/PID/status, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def jvm_cpu_seconds(pid):
    """User plus system CPU seconds the JVM has used (of up to 2 per second on local[2])."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    # utime and stime, fields 14 and 15 of stat(5), in clock ticks.
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)


def jvm_max_heap(pid):
    """The -Xmx the JVM was started with: proof that --driver-memory reached it."""
    return next((a[4:] for a in cmdline(pid) if a.startswith("-Xmx")), None)


class Clock:
    """Wall seconds per stage, and the JVM's peak resident set during each."""

    def __init__(self, memory):
        self.memory, self.seconds, self.stage_peaks = memory, {}, {}
        self.since = time.perf_counter()

    def lap(self, stage):
        now = time.perf_counter()
        self.seconds[stage] = now - self.since
        self.stage_peaks[stage] = self.memory.take_stage_peak()
        self.since = time.perf_counter()


if __name__ == "__main__":
    main()
