"""A synthetic run directory (no Ray, no training) in the layout `raysys run` leaves: two teacher versions
(ddp, zero3) with per-epoch metrics, a three-trial sweep, two student versions with a card and a reference
profile, alias moves ending in a rollback, a data-quality JSON, and (optionally) monitor reports, stored
traffic and labels. The report and tracking unit tests read it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysys.report import record_monitor_report

CLASSES = ["a", "b", "c"]
ALL_PLOTS = {"training-curves", "training-memory", "sweep-tradeoffs", "sweep-params", "confusion-matrix",
             "reliability", "slices", "drift", "detector", "latency", "accuracy", "traffic-share", "aliases"}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _test_metrics(acc: float) -> dict:
    bins = [{"lower": i / 5, "upper": (i + 1) / 5, "count": c, "confidence": (i + 0.5) / 5 if c else None,
             "accuracy": min(1.0, (i + 0.4) / 5) if c else None} for i, c in enumerate([0, 10, 40, 30, 20])]
    slices = [{"feature": "c0", "kind": "categorical", "slice": f"c0 = {v}", "num_rows": 30 + i,
               "accuracy": acc - 0.05 * i, "macro_f1": acc - 0.06 * i, "worst": i == 2} for i, v in enumerate("xyz")]
    return {"accuracy": acc, "macro_f1": acc - 0.01, "macro_precision": acc, "macro_recall": acc, "log_loss": 0.7,
            "num_parameters": 1000, "classes": CLASSES, "confusion_matrix": [[30, 3, 2], [4, 28, 3], [1, 2, 27]],
            "calibration": {"ece": 0.03, "bins": bins}, "slices": {"slices": slices, "worst": slices[2]}}


def _epochs(strategy: str) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1), "val_accuracy": 0.5 + 0.05 * e,
             "samples_per_s": 1000.0 * (e + 1), "strategy": strategy, "world_size": 2,
             "mem_per_rank_total_bytes": [2**20, 2**20 + 4096]} for e in range(4)]


def profile() -> dict:
    return {"numeric": [{"name": "x0", "edges": [-1.0, 0.0, 1.0], "ref_props": [0.16, 0.34, 0.34, 0.16]}],
            "categorical": [{"name": "c0", "categories": ["x", "y", "z"], "ref_props": [0.5, 0.3, 0.2]}],
            "classes": CLASSES}


def _version(reg: Path, name: str, v: int, metrics: dict, **extra) -> None:
    d = reg / name / "versions" / str(v)
    _write(d / "manifest.json", {"files": {}})
    _write(d / "metrics.json", metrics)
    for fn, obj in extra.items():
        _write(d / fn.replace("__", "."), obj)


def _alias(reg: Path, name: str, alias: str, gen: int, version: int, prev, t: str, **extra) -> None:
    _write(reg / name / "aliases" / alias / f"{gen:012d}.json",
           {"version": version, "previous": prev, "generation": gen, "updated_at": t, **extra})


def _monitor(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "monitor" / "traffic" / "labels").mkdir(parents=True)
    n = 400
    x0 = np.r_[rng.normal(0, 1, n // 2), rng.normal(1.5, 1, n // 2)]
    pq.write_table(pa.table({"ts": np.arange(n, dtype=np.float64), "model_version": ["1"] * 300 + ["2"] * 100,
                             "x0": x0, "c0": rng.choice(["x", "y", "z"], n).tolist(),
                             "prediction": rng.choice(CLASSES, n).tolist(), "confidence": rng.uniform(0.4, 1, n)}),
                   root / "monitor" / "traffic" / "part-1.parquet")
    pq.write_table(pa.table({"ts": np.arange(100, dtype=np.float64), "label": rng.choice(CLASSES, 100).tolist(),
                             "prediction": rng.choice(CLASSES, 100).tolist()}),
                   root / "monitor" / "traffic" / "labels" / "part-1.parquet")
    for i, (phase, p) in enumerate((("normal", 0.01), ("shifted", 0.9))):
        record_monitor_report(root, {
            "psi_threshold": 0.2, "window_size": 100, "rows_seen": 200 * (i + 1),
            "features": {"x0": {"psi": p}, "c0": {"psi": 0.02}},
            "detector": {"calibrated": True, "threshold": 11.0, "max_score": 3.0 + 9 * i},
            "latency_by_version": {"1": {"p50": 1.0 + i, "p95": 2.0 + i, "p99": 3.0 + i}},
            "accuracy": {"realised": 0.8 - 0.1 * i, "estimated": 0.78, "reference": 0.8},
            "alert_events": [{"kind": "online", "detail": {"row_in_stream": 350, "score": 12.5, "threshold": 11.0,
                                                           "chart": "sum"}}] if i else []}, phase, now=100.0 + i)


def make_run(root: Path, *, monitor: bool = True) -> Path:
    reg = root / "registry"
    for v, strategy in ((1, "ddp"), (2, "zero3")):
        _version(reg, "m-teacher", v, {"epochs": _epochs(strategy), "test": _test_metrics(0.8)})
    sweep_dir = root / "runs" / "distill-1"
    trials = [{"trial_id": f"t{i}", "temperature": t, "alpha": 0.5, "lr": lr, "hidden_dims": [16 * (i + 1)],
               "num_parameters": 100 * (i + 1), "best_val_accuracy": 0.6 + 0.05 * i, "latency_ms_per_row": 0.001 * (i + 1),
               "pareto": True, "chosen": i == 1, "error": None}
              for i, (t, lr) in enumerate(((2.0, 1e-3), (4.0, 3e-3), (2.0, 1e-2)))]
    _write(sweep_dir / "sweep_summary.json", {"sweep_id": "distill-1", "trials": trials, "teacher_val_accuracy": 0.8,
                                              "best_config": {"temperature": 4.0}, "search": "grid"})
    _version(reg, "m", 1, {"test": _test_metrics(0.75)}, model_card__md="# Model card: m\n\n| a | b |\n|---|---|\n"
             "| 1 | <script>x</script> |\n\n- one\n- two\n\n```json\n{\"k\": 1}\n```\n",
             lineage__json={"parent_teacher": "m-teacher:v2", "sweep_dir": str(sweep_dir)},
             config__json={"monitor": {"window_size": 100}}, reference_profile__json=profile())
    _version(reg, "m", 2, {"test": _test_metrics(0.74)})
    _alias(reg, "m", "production", 1, 1, None, "2026-01-01T00:00:00+00:00")
    _alias(reg, "m", "candidate", 1, 2, None, "2026-01-01T00:00:01+00:00")
    _alias(reg, "m", "production", 2, 2, 1, "2026-01-01T00:00:02+00:00")
    _alias(reg, "m", "production", 3, 1, 2, "2026-01-01T00:00:03+00:00", rolled_back_from=2)
    _write(root / "data_quality.json", {"rows": 1000, "duplicates": 3, "classes": [{"class": "a", "share": 0.3}]})
    if monitor:
        _monitor(root)
    return root
