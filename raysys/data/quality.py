"""The data quality report: every check of `raysys.config.quality.QUALITY_CHECKS` over a dataset directory,
each finding graded by the `quality:` thresholds into a warning or a refusal to train. Ray-free.

    report = check_dataset(root, cfg.quality)   # a JSON-able dict
    enforce(report)                             # ValueError naming the refusing checks and example rows

The checks live one concern per module: `quality_rows` (duplicates, leakage), `quality_features` (balance,
constant/predictive features, unseen categories, outliers, nulls) and `quality_labels` (confident learning).
A check whose `warn` and `refuse` are both None is not run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from raysys.config.quality import QUALITY_CHECKS, CheckLevels, QualityConfig
from raysys.data import quality_features as qf
from raysys.data import quality_labels as ql
from raysys.data import quality_rows as qr
from raysys.data.quality_frame import load_frame
from raysys.data.schema import DatasetSchema

REPORT_FORMAT = 1
REPORT_FILE = "data_quality.json"
CHECKS = {
    "duplicates": qr.duplicates, "near_duplicates": qr.near_duplicates, "leakage": qr.leakage,
    "class_imbalance": qf.class_imbalance, "label_issues": ql.label_issues,
    "constant_features": qf.constant_features, "predictive_features": qf.predictive_features,
    "unseen_categories": qf.unseen_categories, "outliers": qf.outliers, "missing_values": qf.missing_values,
}
assert tuple(CHECKS) == QUALITY_CHECKS


def _num(v: float) -> float | str:
    return round(float(v), 6) if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def grade(value: float, levels: CheckLevels) -> str | None:
    """'refuse', 'warn' or None for a check's value (strictly above a threshold fires)."""
    if levels.refuse is not None and value > levels.refuse:
        return "refuse"
    if levels.warn is not None and value > levels.warn:
        return "warn"
    return None


def check_dataset(root: str | Path, cfg: QualityConfig | None = None,
                  schema: DatasetSchema | None = None) -> dict[str, Any]:
    """Run every enabled check on the dataset at `root`; the report as a JSON-able dict."""
    cfg = cfg or QualityConfig()
    schema = schema or DatasetSchema.load(root)
    t0 = time.perf_counter()
    frame = load_frame(root, schema, max_rows=cfg.max_rows, seed=cfg.seed)
    seconds = {"load": round(time.perf_counter() - t0, 3)}
    checks: dict[str, Any] = {}
    findings = []
    smallest = min(s.num_rows_total for s in frame.splits.values())
    for name in QUALITY_CHECKS:
        levels = cfg.levels(name)
        if levels.warn is None and levels.refuse is None:
            checks[name] = {"level": "off"}
            continue
        t = time.perf_counter()
        res = CHECKS[name](frame, cfg)
        seconds[name] = round(time.perf_counter() - t, 3)
        level, message, downgraded = _small_table_grade(grade(res.value, levels), res.message, smallest, cfg)
        checks[name] = {"value": _num(res.value), "level": level, "warn": levels.warn, "refuse": levels.refuse,
                        "message": message, "examples": res.examples, "details": res.details,
                        "seconds": seconds[name], **({"downgraded": True} if downgraded else {})}
        if level:
            findings.append({"check": name, "level": level, "value": _num(res.value),
                             "threshold": levels.refuse if level == "refuse" or downgraded else levels.warn,
                             "message": message, "examples": res.examples,
                             **({"downgraded": True} if downgraded else {})})
    status = "refuse" if any(f["level"] == "refuse" for f in findings) else "warn" if findings else "ok"
    return {"format": REPORT_FORMAT, "dataset": str(root), "status": status,
            "rows": {k: s.num_rows_total for k, s in frame.splits.items()},
            "rows_checked": {k: len(s) for k, s in frame.splits.items()},
            "findings": findings, "checks": checks, "seconds": {**seconds, "total": round(time.perf_counter() - t0, 3)},
            "config": json.loads(cfg.model_dump_json())}


def _small_table_grade(level: str | None, message: str, smallest: int,
                       cfg: QualityConfig) -> tuple[str | None, str, bool]:
    """A refusal on a table whose smallest split is below `quality.min_rows_to_refuse` becomes a warning that
    says why (returns level, message, downgraded)."""
    if level != "refuse" or smallest >= cfg.min_rows_to_refuse:
        return level, message, False
    return "warn", (f"{message} (above the refuse threshold, but the smallest split has {smallest} rows, fewer "
                    f"than quality.min_rows_to_refuse={cfg.min_rows_to_refuse}: warned instead of refused)"), True


def refusal_message(report: dict[str, Any]) -> str | None:
    """The message of a refusal to train (None when no check refuses): each refusing check, its value and
    threshold, its finding and example rows, and the setting that would let the data through."""
    refused = [f for f in report["findings"] if f["level"] == "refuse"]
    if not refused:
        return None
    parts = [f"quality.{f['check']}: {f['message']} (value {f['value']} > refuse threshold {f['threshold']}); "
             f"example rows: {json.dumps(f['examples'][:5])}" for f in refused]
    return ("data quality check refused training for " + report["dataset"] + ": " + "; ".join(parts)
            + ". Fix the data, or raise (or set to null) the refuse threshold named above.")


def enforce(report: dict[str, Any]) -> None:
    """Raise ValueError when the report holds a refusal."""
    msg = refusal_message(report)
    if msg:
        raise ValueError(msg)


def card_summary(report: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """What the model card and the lineage carry: status, the findings (without their example rows) and
    every check's value."""
    return {"status": report["status"], "report": path,
            "findings": [{k: f[k] for k in ("check", "level", "value", "threshold", "message", "downgraded")
                          if k in f} for f in report["findings"]],
            "skipped": {k: c["message"] for k, c in report["checks"].items()
                        if (c.get("details") or {}).get("skipped")},
            "values": {k: c.get("value") for k, c in report["checks"].items() if c.get("level") != "off"},
            "rows": report["rows"], "seconds": report["seconds"].get("total")}


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per check: name, value, level, thresholds, seconds, message (for the CLI's table)."""
    out = []
    for name, c in report["checks"].items():
        if c.get("level") == "off":
            out.append([name, "", "off", "", "", "", "not run"])
            continue
        out.append([name, str(c["value"]), c["level"] or "ok", str(c["warn"]), str(c["refuse"]),
                    f"{c['seconds']:.2f}", c["message"]])
    return out


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as JSON (to a temp name, then renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    return path
