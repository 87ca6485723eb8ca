"""Tier 1: a synthetic run copied into a temporary MLflow sqlite store and read back with MLflow's client
(skipped without the optional extra `raysys[mlflow]`)."""

from __future__ import annotations

import sys

import pytest
from helpers.synthetic_run import make_run


def _runs(client, exp_id: str) -> dict[str, list]:
    by_kind: dict[str, list] = {}
    for r in client.search_runs([exp_id], max_results=1000):
        by_kind.setdefault(r.data.tags.get("raysys.kind"), []).append(r)
    return by_kind


def test_a_run_is_copied_into_mlflow_and_reads_back(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from raysys.tracking import log_run

    root = make_run(tmp_path / "run", monitor=False)
    (root / "report.html").write_text("<html></html>")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (./mlruns)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    got = log_run(root, uri, experiment="unit")
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = _runs(client, got["experiment_id"])
    assert {k: len(v) for k, v in runs.items()} == {"pipeline": 1, "teacher": 2, "sweep": 1, "trial": 3,
                                                    "evaluation": 1}
    parent, sweep = runs["pipeline"][0].info.run_id, runs["sweep"][0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in runs["trial"]} == {sweep}
    assert {r.data.tags["mlflow.parentRunId"] for k in ("teacher", "sweep", "evaluation") for r in runs[k]} == {parent}
    chosen = [r for r in runs["trial"] if r.data.tags["raysys.chosen"] == "True"]
    assert len(chosen) == 1 and chosen[0].data.params["temperature"] == "4.0"
    teacher = next(r for r in runs["teacher"] if r.data.tags["raysys.version"] == "2")
    history = client.get_metric_history(teacher.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1, 2, 3] and teacher.data.metrics["test_accuracy"] == 0.8
    evaluation = runs["evaluation"][0]
    assert evaluation.data.metrics["test_accuracy"] == 0.75
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id)} == {
        "confusion_matrix.json", "model_card.md", "report.html"}
    # every registry version is an MLflow model version; the aliases follow the registry (production was
    # rolled back to v1, candidate is v2)
    assert {m.name for m in client.search_registered_models()} == {"m", "m-teacher"}
    prod = client.get_model_version_by_alias("m", "production")
    assert prod.tags["raysys_version"] == "1" and prod.source.endswith("/registry/m/versions/1")
    assert client.get_model_version_by_alias("m", "candidate").tags["raysys_version"] == "2"
    # logging again adds runs but no second copy of a version
    log_run(root, uri, experiment="unit")
    assert len(client.search_model_versions("name = 'm'")) == 2
    assert not (tmp_path / "mlruns").exists()


def test_without_mlflow_installed_the_message_names_the_extra(tmp_path, monkeypatch):
    from raysys.tracking import log_run

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(ValueError, match=r"raysys\[mlflow\]"):
        log_run(make_run(tmp_path, monitor=False))


def test_the_end_of_run_hook_logs_when_tracking_is_on(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from raysys.cli.report import write_run_report
    from raysys.config import preset

    root = make_run(tmp_path / "run", monitor=False)
    monkeypatch.chdir(tmp_path)
    cfg = preset("tiny").with_root(root)
    cfg.tracking.mlflow = True  # default store: sqlite:///<root>/mlflow.db
    assert write_run_report(cfg) == root / "report.html"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raysys")
    assert len(client.search_runs([exp.experiment_id])) == 8
    assert client.get_model_version_by_alias("m", "production").tags["raysys_version"] == "1"
