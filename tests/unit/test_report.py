"""Tier 1: the HTML report's pieces on synthetic run directories (no Ray, no training): every stage missing,
every stage present, one stage broken; determinism; nothing a browser would fetch or run."""

from __future__ import annotations

import sys

import pyarrow as pa
import pytest
from helpers.report_html import offline_problems, parse_report
from helpers.synthetic_run import ALL_PLOTS, make_run, profile

from raysys.report import load_run, render, write_report, write_run_report
from raysys.report.card import markdown_to_html
from raysys.report.drift import psi, traffic_psi


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
    out = traffic_psi(profile(), table, 50)
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


def test_renders_in_separate_processes_are_identical(tmp_path):
    """matplotlib's ids come from svg.hashsalt, not from the process: two interpreters with different hash
    seeds write the same bytes."""
    import os
    import subprocess

    root = make_run(tmp_path / "run")
    outs = []
    for seed in ("0", "12345"):
        out = tmp_path / f"r{seed}.html"
        subprocess.run([sys.executable, "-m", "raysys.cli", "report", str(root), "-o", str(out)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
