"""Tier 1: the HTML report's pieces on synthetic run directories (no Ray, no training): every stage missing,
every stage present, one stage broken; determinism; nothing a browser would fetch or run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.report_html import offline_problems, parse_report

from raysys.report import load_run, record_monitor_report, render, write_report, write_run_report
from raysys.report.card import markdown_to_html
from raysys.report.drift import psi, traffic_psi

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


def _profile() -> dict:
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
             config__json={"monitor": {"window_size": 100}}, reference_profile__json=_profile())
    _version(reg, "m", 2, {"test": _test_metrics(0.74)})
    _alias(reg, "m", "production", 1, 1, None, "2026-01-01T00:00:00+00:00")
    _alias(reg, "m", "candidate", 1, 2, None, "2026-01-01T00:00:01+00:00")
    _alias(reg, "m", "production", 2, 2, 1, "2026-01-01T00:00:02+00:00")
    _alias(reg, "m", "production", 3, 1, 2, "2026-01-01T00:00:03+00:00", rolled_back_from=2)
    _write(root / "data_quality.json", {"rows": 1000, "duplicates": 3, "classes": [{"class": "a", "share": 0.3}]})
    if monitor:
        _monitor(root)
    return root


def test_an_empty_run_dir_says_not_available_for_every_section(tmp_path):
    html = render(load_run(tmp_path))
    page = parse_report(html)
    assert not page.plots
    assert set(page.sections) == {"data-quality", "training", "sweep", "evaluation", "slices", "model-card",
                                  "monitoring"}
    for key, text in page.sections.items():
        assert "not available" in text, key
    assert not offline_problems(html, page)


def test_a_full_run_dir_draws_every_plot_offline_and_deterministically(tmp_path):
    root = make_run(tmp_path)
    out = write_report(root, tmp_path / "a.html")
    html = out.read_text()
    page = parse_report(html)
    assert set(page.plots) == ALL_PLOTS
    for key, plot in page.plots.items():
        assert plot.svgs == 1 and plot.paths >= 5, (key, plot)
    assert {"epoch", "validation accuracy", "student parameters", "predicted class", "true class",
            "mean confidence (top class)", "PSI vs reference", "detector statistic", "model version"} <= \
        {t for p in page.plots.values() for t in p.texts}
    assert not offline_problems(html, page), offline_problems(html, page)
    for key, text in page.sections.items():
        assert "not available:" not in text, (key, text[:300])
    # the production alias was rolled back to v1: the report describes v1 and lists the rollback
    assert "m:v1" in page.sections["model-card"] and "rollback" in page.sections["monitoring"].split("kind")[-1]
    assert "<script>x</script>" not in html and "&lt;script&gt;" in html  # the card's text is escaped
    assert write_report(root, tmp_path / "b.html").read_bytes() == out.read_bytes()


def test_a_missing_stage_is_named_and_the_rest_still_renders(tmp_path):
    root = make_run(tmp_path, monitor=False)
    (root / "runs" / "distill-1" / "sweep_summary.json").unlink()
    (root / "registry" / "m-teacher" / "versions" / "1" / "metrics.json").write_text("{not json")
    page = parse_report(render(data := load_run(root)))
    assert "not available" in page.sections["sweep"] and "not available" in page.sections["monitoring"]
    assert "not available" not in page.sections["evaluation"]
    assert {"training-curves", "confusion-matrix", "reliability", "slices"} <= set(page.plots)
    assert any("metrics.json" in p for p in data.problems)


def test_psi_matches_the_monitors_and_the_traffic_windows():
    from raysys.monitor.stats import psi as monitor_psi

    ref, counts = [0.2, 0.3, 0.5], [10, 0, 30]
    assert psi(ref, counts) == pytest.approx(monitor_psi(ref, counts))
    table = pa.table({"x0": [-2.0] * 50 + [5.0] * 50, "c0": ["x"] * 100})
    out = traffic_psi(_profile(), table, 50)
    assert out["ends"] == [50, 100] and out["psi"]["x0"][0] > 1 and out["psi"]["c0"][0] > 0.3


def test_the_card_markdown_is_escaped_and_structured():
    html = markdown_to_html("# T\n\nsome `code` and **bold** <b>raw</b>\n\n| h |\n|---|\n| v |\n")
    assert "<h3>T</h3>" in html and "<code>code</code>" in html and "<b>bold</b>" in html
    assert "&lt;b&gt;raw&lt;/b&gt;" in html and "<th>h</th>" in html and "<td>v</td>" in html


def test_the_report_package_does_not_load_ray():
    import subprocess

    code = "import sys, raysys.report; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_end_of_run_hook_writes_beside_the_registry_and_never_raises(tmp_path, monkeypatch):
    root = make_run(tmp_path, monitor=False)
    assert write_run_report(str(root / "registry")) == root / "report.html"
    assert "raysys run report" in (root / "report.html").read_text()
    assert write_run_report("s3://bucket/registry") is None  # remote: nothing to write beside it

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("raysys.report.page.write_report", boom)
    assert write_run_report(str(root / "registry")) is None
