"""Tier 3 (issue 27): a 150-row table (scikit-learn's iris) through `raysys data import` and `raysys run --preset
tiny`, as a new user would: the parts of the loop the table is too small for are reduced or skipped with a line
on the model card, and a student is registered (the run used to exit 2 after training, on the monitor
detector's calibration)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.integration


def _iris_parquet(path) -> None:
    from sklearn.datasets import load_iris

    iris = load_iris(as_frame=True)
    frame = iris.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame["target"] = [str(iris.target_names[i]) for i in frame["target"]]
    frame.to_parquet(path)


@pytest.mark.timeout(600)
def test_iris_through_import_and_run(ray_cluster, tmp_path):
    from raysys.cli import app
    from raysys.monitor.core import Monitor
    from raysys.registry import Registry

    _iris_parquet(tmp_path / "iris.parquet")
    runner = CliRunner()
    r = runner.invoke(app, ["data", "import", str(tmp_path / "iris.parquet"), "--label", "target",
                            "--out", str(tmp_path / "iris")])
    assert r.exit_code == 0, r.output
    assert "warning: validation: 22 rows" in r.output.replace("\n", " "), r.output
    (tmp_path / "iris.yaml").write_text(f"data:\n  source: parquet\n  root: {tmp_path / 'iris'}\n")

    r = runner.invoke(app, ["run", "--preset", "tiny", "-c", str(tmp_path / "iris.yaml"), "--root",
                            str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    reg = Registry(str(tmp_path / "run" / "registry"))
    loaded = reg.load("raysys-student", "production")  # a student is registered and in production
    _, card, md = reg.model_card("raysys-student", "production")
    limits = " ".join(card["limitations"])
    assert "Online drift detector not calibrated" in limits and "44 rows" in limits, card["limitations"]
    assert "confidence bins instead of distill.evaluation.num_calibration_bins=15" in limits
    assert "Test metrics rest on 22 rows" in limits and "Online drift detector not calibrated" in md
    assert card["metrics"]["calibration"]["num_bins"] == 2, card["metrics"]["calibration"]
    # training sized to 106 rows (sizing:): batch 16 and enough epochs for 600 steps, said on the card, and the
    # student learned (the tiny preset's batch 256 x 4 epochs left it at 0.55, near the majority class's 0.36)
    assert "The student trained with batch 16 for 86 epochs (602 optimizer steps)" in limits, card["limitations"]
    assert loaded.config["distill"]["batch_size"] == 16 and loaded.config["train"]["num_epochs"] == 86
    assert loaded.metrics["test"]["accuracy"] >= 0.8, loaded.metrics["test"]["accuracy"]
    _, t_card, _ = reg.model_card("raysys-student-teacher", "latest")
    assert any("Online drift detector" in x for x in t_card["limitations"])

    # the endpoint-facing piece: the monitor profile exists, its detector explicitly absent with the reason
    prof = loaded.reference_profile
    assert prof is not None and prof["detector"] is None
    assert "needs 50 held-out rows" in prof["detector_skipped"]
    assert prof["prediction"] is not None  # validation + test rows gave the prediction distributions
    report = Monitor(prof, loaded.schema).report()
    assert report["detector"]["calibrated"] is False, json.dumps(report["detector"])
    assert (tmp_path / "run" / "report.html").exists()
