"""Tier 3: the HTML report of a real `tiny` run (Ray Train teacher, Tune sweep, registry; both trained with DP-SGD
when Opacus is installed, and `raysys registry show` printing their epsilon), plus monitor data
from the production student's Monitor (normal then shifted traffic, delayed labels, a snapshot, stored
traffic), rendered through `raysys report` and read back with html.parser."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from helpers.monitor_feed import feed_monitor
from helpers.report_html import offline_problems, parse_report
from typer.testing import CliRunner

from raysys.cli import app
from raysys.config import preset
from raysys.workflow.stages import absolute, run_pipeline

PLOTS = {"training-curves", "training-memory", "sweep-tradeoffs", "sweep-params", "confusion-matrix",
         "reliability", "slices", "drift", "detector", "latency", "accuracy", "traffic-share", "aliases"}
AXIS_LABELS = {"epoch", "loss (cross-entropy)", "validation accuracy", "student parameters",
               "best validation accuracy", "predicted class", "true class", "mean confidence (top class)", "slice",
               "PSI vs reference", "detector statistic", "request latency (ms)", "accuracy", "model version"}


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("report-run")
    cfg = absolute(preset("tiny").with_root(root))
    if importlib.util.find_spec("opacus"):  # a governed run: teacher and students trained with DP-SGD (issue 23)
        cfg = cfg.model_validate({**cfg.model_dump(), "train": {**cfg.train.model_dump(), "dp": {}},
                                  "distill": {**cfg.distill.model_dump(), "dp": {"noise_multiplier": 0.8}}})
    result = run_pipeline(cfg)
    feed_monitor(root, model_name=cfg.model_name)
    return root, result


def _render(root, out) -> str:
    r = CliRunner().invoke(app, ["report", str(root), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert str(out) in r.output.replace("\n", "")
    return out.read_text(encoding="utf-8")


@pytest.mark.integration
def test_report_of_a_tiny_run(tiny_run, tmp_path):
    root, result = tiny_run
    html = _render(root, tmp_path / "a.html")
    page = parse_report(html)
    assert set(page.plots) >= PLOTS, sorted(PLOTS - set(page.plots))
    for key, plot in page.plots.items():
        assert plot.svgs == 1 and plot.paths >= 5, (key, plot.paths)
    texts = {t for p in page.plots.values() for t in p.texts}
    assert AXIS_LABELS <= texts, sorted(AXIS_LABELS - texts)
    assert not offline_problems(html, page), offline_problems(html, page)
    # the stages this run had are all there, the data quality check (a pipeline stage) included
    assert "data_quality" in page.sections["data-quality"] and "status" in page.sections["data-quality"]
    for key in ("data-quality", "training", "sweep", "evaluation", "slices", "model-card", "monitoring"):
        assert "not available:" not in page.sections[key], (key, page.sections[key][:400])
    assert f"{result.model_name}:v{result.student_version}" in page.sections["model-card"]
    assert "ddp" in " ".join(page.plots["training-curves"].texts)
    # two renders of the same run are the same bytes
    assert _render(root, tmp_path / "b.html") == html


@pytest.mark.integration
def test_mlflow_copy_of_a_tiny_run(tiny_run, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    root, result = tiny_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = CliRunner().invoke(app, ["report", str(root), "-o", str(tmp_path / "r.html"), "--mlflow-uri", uri])
    assert r.exit_code == 0, r.output
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("raysys")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    kinds = [x.data.tags.get("raysys.kind") for x in runs]
    assert kinds.count("pipeline") == 1 and kinds.count("teacher") == 1 and kinds.count("evaluation") == 1
    sweep = next(x for x in runs if x.data.tags.get("raysys.kind") == "sweep")
    trials = [x for x in runs if x.data.tags.get("raysys.kind") == "trial"]
    assert trials and all(t.data.tags["mlflow.parentRunId"] == sweep.info.run_id for t in trials)
    # per-epoch validation accuracy of every trial, from Tune's progress.csv
    assert all(len(client.get_metric_history(t.info.run_id, "val_accuracy")) >= 1 for t in trials)
    teacher = next(x for x in runs if x.data.tags.get("raysys.kind") == "teacher")
    epochs = json.loads((root / "registry" / f"{result.model_name}-teacher" / "versions" /
                         str(result.teacher_version) / "metrics.json").read_text())["epochs"]
    assert len(client.get_metric_history(teacher.info.run_id, "val_accuracy")) == len(epochs)
    evaluation = next(x for x in runs if x.data.tags.get("raysys.kind") == "evaluation")
    assert evaluation.data.metrics["test_accuracy"] == pytest.approx(result.student_metrics["accuracy"])
    prod = client.get_model_version_by_alias(result.model_name, "production")
    assert prod.tags["raysys_version"] == str(result.student_version)
    assert client.get_model_version_by_alias(result.model_name, "candidate").tags["raysys_version"] == str(
        result.student_version + 1)


@pytest.mark.integration
def test_registry_show_prints_the_dp_sgd_accounting_of_teacher_and_student(tiny_run):
    pytest.importorskip("opacus")
    root, result = tiny_run
    r = CliRunner().invoke(app, ["registry", "show", "production", "--preset", "tiny", "--name", result.model_name,
                                 "--root", str(root)])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    # the student's privacy lines: its own epsilon, what the whole sweep spent on the same rows, the teacher's
    mine = out[out.index("#### Privacy"):]
    assert re.search(r"- this model: membership-inference AUC [0-9.]+ .*?; DP-SGD epsilon [0-9.]+ at delta 1e-05 "
                     r"\(noise 0\.8, clip 1\.0\); epsilon composes \(rdp \(opacus\), the teacher and every trial of "
                     r"the sweep composed\): this trial alone [0-9.]+, the sweep's \d+ trials composed [0-9.]+, the "
                     r"teacher alone [0-9.]+", mine), mine
    assert re.search(r"- teacher: membership-inference AUC .*?; DP-SGD epsilon [0-9.]+ at delta 1e-05 \(noise 1\.0",
                     mine), mine
    assert "trained without DP-SGD" not in out, mine
    t = CliRunner().invoke(app, ["registry", "show", "latest", "--preset", "tiny", "--name",
                                 f"{result.model_name}-teacher", "--root", str(root)])
    assert t.exit_code == 0 and "DP-SGD epsilon" in t.output, t.output[-3000:]
