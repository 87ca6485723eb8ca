"""Tier 1 (issue 27): what a small table changes in the loop. The import's split sizes, the size plan (each
reduction or skip with its card line), the quality report's refusals on a few rows, the monitor reference of
a table too small for the online detector, and the card lines, all without Ray."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest

from raysys.config import CheckLevels, QualityConfig, preset
from raysys.data.byod import import_parquet, split_sizes
from raysys.data.quality import card_summary, check_dataset, enforce
from raysys.workflow.small_tables import MIN_CALIBRATION_ROWS, plan_for_table, quality_notes

OFF = CheckLevels(warn=None, refuse=None)


@pytest.fixture(scope="module")
def iris_root(tmp_path_factory):
    from sklearn.datasets import load_iris

    tmp = tmp_path_factory.mktemp("iris")
    iris = load_iris(as_frame=True)
    frame = iris.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame["target"] = [str(iris.target_names[i]) for i in frame["target"]]
    frame.to_parquet(tmp / "iris.parquet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import_parquet(tmp / "iris.parquet", tmp / "ds", label="target")
    assert any("validation: 22 rows of 150" in str(w.message) and "--val-fraction" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    return tmp / "ds"


def test_split_sizes_give_every_split_a_row_and_refuse_fewer_than_three():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert split_sizes(150, 0.15, 0.15) == (22, 22)
        assert split_sizes(5, 0.15, 0.15) == (1, 1)  # int(0.75) would have left validation empty
        assert split_sizes(3, 0.4, 0.4) == (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert split_sizes(1000, 0.15, 0.15) == (150, 150)  # no warning at a useful size
    with pytest.raises(ValueError, match="source: 2 rows; the import needs at least 3"):
        split_sizes(2, 0.15, 0.15)


def test_a_tiny_table_imports_with_a_row_in_every_split(tmp_path):
    pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0, 5.0], "y": ["a", "b", "a", "b", "a"]}).to_parquet(tmp_path / "t.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_parquet(tmp_path / "t.parquet", tmp_path / "ds", label="y")
    from raysys.workflow.small_tables import split_rows

    assert split_rows(str(tmp_path / "ds")) == {"train": 3, "validation": 1, "test": 1}


def test_plan_for_a_big_table_changes_nothing():
    cfg = preset("tiny")
    plan = plan_for_table(cfg, {"train": 6000, "validation": 1500, "test": 1500})
    assert plan.notes == [] and plan.calibrate_detector and plan.reference_splits == ("validation",)
    assert plan.num_calibration_bins == cfg.distill.evaluation.num_calibration_bins
    assert plan.latency_batch_size == cfg.distill.evaluation.latency_batch_size


def test_plan_pools_validation_with_test_when_validation_alone_is_too_small():
    plan = plan_for_table(preset("tiny"), {"train": 126, "validation": 26, "test": 26})  # the 178-row table
    assert plan.reference_splits == ("validation", "test") and plan.calibrate_detector
    assert any("calibrated on validation + test (52 held-out rows)" in n for n in plan.notes), plan.notes


def test_plan_skips_the_detector_and_reduces_evaluation_on_iris():
    plan = plan_for_table(preset("tiny"), {"train": 106, "validation": 22, "test": 22}, has_slices=False)
    assert not plan.calibrate_detector and plan.reference_splits == ("validation", "test")
    assert f"needs {MIN_CALIBRATION_ROWS} held-out rows" in plan.detector_skipped
    assert plan.num_calibration_bins == 2 and plan.latency_batch_size == 22
    text = " ".join(plan.notes)
    assert "Online drift detector not calibrated" in text and "Test metrics rest on 22 rows" in text
    assert ("The teacher trained with batch 16 for 86 epochs (602 optimizer steps) instead of train.batch_size=256 "
            "for train.num_epochs=6: the training split has 106 rows") in text
    assert plan.training == {"train": {"batch_size": 16, "num_epochs": 86},
                             "distill": {"batch_size": 16, "num_epochs": 86}}
    assert "No slice is named weakest" not in text  # no slices at all on an all-numeric table
    assert "No slice is named weakest" in " ".join(plan_for_table(preset("tiny"), plan.rows).notes)
    assert plan.to_dict()["detector_skipped"] == plan.detector_skipped


def test_sizing_follows_the_table_and_leaves_what_it_must_alone():
    from raysys.config import DPConfig
    from raysys.workflow.small_tables import sized, sized_training

    cfg = preset("tiny")  # train 256 x 6 epochs, distill 256 x 4
    assert sized_training(cfg, "train", 6000) == (256, 6)  # 23 batches an epoch: a table it was made for
    assert sized_training(cfg, "train", 1257) == (64, 30)  # digits: 20 steps an epoch, 600 steps
    assert sized_training(cfg, "distill", 398) == (16, 24)  # breast_cancer
    assert sized_training(cfg, "train", 3) == (16, 200)  # at most sizing.max_epochs
    cfg.sizing.min_steps = 50
    assert sized_training(cfg, "train", 106) == (16, 8)  # epochs raised only when short of min_steps
    off = preset("tiny")
    off.sizing.enabled = False
    assert sized_training(off, "train", 106) == (256, 6)
    private = preset("tiny")
    private.distill.dp = DPConfig(noise_multiplier=1.0)
    assert sized_training(private, "distill", 106) == (256, 4)  # the batch and epochs set epsilon
    pipe = preset("tiny")
    pipe.train.strategy = "pipeline"
    assert sized_training(pipe, "train", 106)[0] == 256  # micro-batches split this batch: kept
    plan = plan_for_table(preset("tiny"), {"train": 106, "validation": 22, "test": 22})
    trained = sized(preset("tiny"), plan)
    assert (trained.train.batch_size, trained.train.num_epochs, trained.distill.num_epochs) == (16, 86, 86)
    assert trained.train.lr == preset("tiny").train.lr  # nothing else moved
    notes = " ".join(plan_for_table(off, {"train": 106, "validation": 22, "test": 22}).notes)
    assert "teacher took one optimizer step per epoch" in notes and "lower train.batch_size" in notes


def test_plan_with_one_held_out_row_has_no_prediction_reference():
    plan = plan_for_table(preset("tiny"), {"train": 3, "validation": 1, "test": 0})
    assert plan.reference_splits == () and not plan.calibrate_detector
    assert any("no prediction distributions" in n for n in plan.notes)


def test_quality_refusal_on_a_small_table_is_a_warning_that_says_why(iris_root):
    # a refuse threshold the iris features cross (petal width alone predicts the species)
    strict = dict(label_issues=OFF, predictive_features=CheckLevels(warn=0.3, refuse=0.5))
    report = check_dataset(iris_root, QualityConfig(**strict))
    enforce(report)  # no refusal: the validation split has 22 rows
    f = next(f for f in report["findings"] if f["check"] == "predictive_features")
    assert f["level"] == "warn" and f["downgraded"] and f["threshold"] == 0.5
    assert "quality.min_rows_to_refuse=100: warned instead of refused" in f["message"]
    summary = card_summary(report, "r.json")
    assert any("predictive_features" in n and "warned instead" in n for n in quality_notes(summary))
    with pytest.raises(ValueError, match="quality.predictive_features"):
        enforce(check_dataset(iris_root, QualityConfig(min_rows_to_refuse=0, **strict)))


def test_skipped_quality_checks_reach_the_card_lines(iris_root):
    report = check_dataset(iris_root, QualityConfig(num_folds=20))  # 106 rows < 10 x 20 folds: skipped
    summary = card_summary(report)
    assert "label_issues" in summary["skipped"]
    assert any(n.startswith("Data quality check label_issues skipped") for n in quality_notes(summary))


def test_monitor_reference_without_a_detector_names_the_reason(iris_root):
    from raysys.data import DatasetSchema, Preprocessor
    from raysys.models import build_model, model_spec
    from raysys.monitor.core import Monitor
    from raysys.workflow.reference import monitor_reference

    cfg = preset("tiny")
    cfg.data.root, cfg.data.source = str(iris_root), "parquet"
    schema = DatasetSchema.load(iris_root)
    pre = Preprocessor.fit_split(schema, iris_root)
    model = build_model(model_spec(schema, cfg.distill.student)).eval()
    plan = plan_for_table(cfg, {"train": 106, "validation": 22, "test": 22})
    prof = monitor_reference(cfg, schema, pre, model, plan)
    assert prof["detector"] is None and "needs 50 held-out rows" in prof["detector_skipped"]
    assert prof["prediction"]["num_rows"] == 44  # validation + test
    assert Monitor(prof, schema).report()["detector"]["calibrated"] is False
