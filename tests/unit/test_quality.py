"""Tier 1: the data quality report on real Parquet datasets, each made to carry one problem (copied rows
across splits, flipped labels at a known rate, a leaking feature, an unseen category, a constant feature,
outliers), and the clean synthetic data, which raises no finding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys.config import CheckLevels, DataConfig, QualityConfig
from raysys.data import DatasetSchema, FeatureSpec, SyntheticTask, read_split, write_synthetic
from raysys.data.quality import check_dataset, enforce, refusal_message
from raysys.data.synthetic import SPLITS

OFF = CheckLevels(warn=None, refuse=None)
SMALL = DataConfig(num_train_rows=3000, num_val_rows=600, num_test_rows=600, num_shards=2)


def _fast(**update) -> QualityConfig:
    """The checks without the (costly) label-issue model."""
    return QualityConfig(label_issues=OFF, **update)


def _rewrite(root, split: str, table: pa.Table) -> None:
    for f in (root / split).glob("*.parquet"):
        f.unlink()
    pq.write_table(table, root / split / "part-00000.parquet")


@pytest.fixture(scope="module")
def clean_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("q") / "clean"
    write_synthetic(SMALL, root)
    return root


def _copy(src, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def test_clean_synthetic_data_raises_no_finding(tmp_path):
    # the default thresholds, every check on (label issues included) on the synthetic task with its 3% noise
    cfg = DataConfig(num_train_rows=12_000, num_val_rows=2000, num_test_rows=2000, num_shards=2)
    write_synthetic(cfg, tmp_path / "d")
    report = check_dataset(tmp_path / "d", QualityConfig())
    assert report["status"] == "ok", report["findings"]
    assert report["findings"] == [] and refusal_message(report) is None
    assert all(c["level"] is None for c in report["checks"].values())
    json.dumps(report)  # JSON-able as it is


def test_rows_copied_across_and_within_splits_are_found_with_their_rows(clean_small, tmp_path):
    root = _copy(clean_small, tmp_path)
    train, test, val = (read_split(root, s) for s in ("train", "test", "validation"))
    test_copies = np.arange(0, 300, 3)  # 100 train rows copied into test (1/6 of it: over the refusal line)
    _rewrite(root, "test", pa.concat_tables([test, train.take(pa.array(test_copies))]))
    # 20 validation rows are train rows nudged by far less than the near-duplicate tolerance
    near = train.take(pa.array(np.arange(1000, 1020)))
    near = near.set_column(0, "x0", pa.compute.add(near.column("x0"), 1e-7))
    _rewrite(root, "validation", pa.concat_tables([val, near]))
    _rewrite(root, "train", pa.concat_tables([train, train.slice(0, 15)]))  # 15 exact repeats in train
    report = check_dataset(root, _fast())
    leak = report["checks"]["leakage"]
    assert leak["level"] == "refuse"
    assert leak["details"]["test"]["exact_in_train"] == 100 and leak["details"]["validation"]["near_in_train"] == 20
    listed = [(e["row"], e["train_row"]) for e in leak["examples"] if e["split"] == "validation"]
    assert listed == [(600 + i, 1000 + i) for i in range(len(listed))] and listed
    dup = report["checks"]["duplicates"]
    assert dup["level"] == "warn" and dup["details"]["train"]["duplicate_rows"] == 15
    assert dup["examples"][0] == {"split": "train", "row": 3000, "same_as_row": 0}
    with pytest.raises(ValueError, match=r"quality\.leakage: .*example rows"):
        enforce(report)


def test_flipped_labels_are_found_with_precision_and_recall_above_half(tmp_path):
    cfg = DataConfig(num_train_rows=12_000, num_val_rows=1000, num_test_rows=1000, num_shards=1, label_noise=0.0)
    root = tmp_path / "d"
    write_synthetic(cfg, root)
    train = read_split(root, "train")
    y = train.column("label").to_numpy()
    rng = np.random.default_rng(7)
    flipped = rng.random(len(y)) < 0.10
    y_noisy = y.copy()
    y_noisy[flipped] = (y[flipped] + rng.integers(1, cfg.num_classes, flipped.sum())) % cfg.num_classes
    _rewrite(root, "train", train.set_column(train.schema.get_field_index("label"), "label", pa.array(y_noisy)))
    report = check_dataset(root, QualityConfig())
    check = report["checks"]["label_issues"]
    found = np.zeros(len(y), dtype=bool)
    found[check["details"]["flagged_row_indices"]] = True
    precision = (found & flipped).sum() / found.sum()
    recall = (found & flipped).sum() / flipped.sum()
    print(f"label issues at 10% noise: precision {precision:.3f}, recall {recall:.3f}, {found.sum()} rows flagged")
    assert precision > 0.5 and recall > 0.5
    assert check["level"] == "warn"
    classes = SyntheticTask(cfg).classes
    for e in check["examples"]:
        assert e["given"] == classes[y_noisy[e["row"]]] and e["suspected"] != e["given"]


def _add_column(root, name: str, make, kind: str = "numeric", categories=None) -> None:
    for split in SPLITS:
        t = read_split(root, split)
        _rewrite(root, split, t.append_column(name, make(split, t)))
    schema = DatasetSchema.load(root)
    schema.features.append(FeatureSpec(name=name, kind=kind, categories=categories))
    schema.save(root)


def test_a_feature_that_leaks_the_label_is_refused_by_name(clean_small, tmp_path):
    root = _copy(clean_small, tmp_path)
    _add_column(root, "leak", lambda split, t: pa.array(t.column("label").to_numpy() * 10.0
                                                        + np.random.default_rng(1).normal(0, 0.1, t.num_rows)))
    report = check_dataset(root, _fast())
    pred = report["checks"]["predictive_features"]
    assert pred["level"] == "refuse" and pred["examples"][0]["feature"] == "leak"
    assert [f["check"] for f in report["findings"]] == ["predictive_features"]
    with pytest.raises(ValueError, match="quality.predictive_features: best one-feature rule: 'leak'"):
        enforce(report)


def test_unseen_category_constant_feature_and_outliers_are_found(clean_small, tmp_path):
    root = _copy(clean_small, tmp_path)
    _add_column(root, "flat", lambda split, t: pa.array(np.where(np.arange(t.num_rows) == 5, 2.0, 1.0)))
    _add_column(root, "site", lambda split, t: pa.array(["new" if split == "test" and i % 50 == 0 else "old"
                                                         for i in range(t.num_rows)]),
                kind="categorical", categories=["old", "new"])
    test = read_split(root, "test")
    x1 = test.column("x1").to_numpy().copy()
    x1[[7, 8, 9, 10, 11]] = 1e6
    _rewrite(root, "test", test.set_column(test.schema.get_field_index("x1"), "x1", pa.array(x1)))
    report = check_dataset(root, _fast())
    levels = {f["check"]: f["level"] for f in report["findings"]}
    assert levels == {"unseen_categories": "warn", "constant_features": "warn", "outliers": "warn"}, levels
    unseen = report["checks"]["unseen_categories"]
    assert unseen["details"]["test"] == {"rows": 600, "rows_with_unseen": 12, "categories": {"site": ["new"]}}
    assert unseen["examples"][0] == {"split": "test", "row": 0, "feature": "site", "value": "new"}
    assert report["checks"]["constant_features"]["examples"][0]["feature"] in ("flat", "site")
    assert {(e["row"], e["feature"]) for e in report["checks"]["outliers"]["examples"]} == {
        (r, "x1") for r in (7, 8, 9, 10, 11)}


def test_thresholds_are_configurable_and_a_check_can_be_turned_off(clean_small):
    strict = _fast(class_imbalance=CheckLevels(warn=None, refuse=1.0))
    report = check_dataset(clean_small, strict)
    assert report["status"] == "refuse" and report["findings"][0]["check"] == "class_imbalance"
    off = check_dataset(clean_small, _fast())
    assert off["checks"]["label_issues"] == {"level": "off"} and "label_issues" not in off["seconds"]


def test_cli_data_check_prints_writes_json_and_exits_2_on_a_refusal(clean_small, tmp_path):
    from typer.testing import CliRunner

    from raysys.cli import app

    root = _copy(clean_small, tmp_path)
    cfg = tmp_path / "q.yaml"
    cfg.write_text("quality:\n  label_issues: {warn: null, refuse: null}\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "check", str(root), "--config", str(cfg), "--out", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "ok"
    train = read_split(root, "train")
    _rewrite(root, "test", pa.concat_tables([read_split(root, "test"), train.slice(0, 200)]))
    bad = runner.invoke(app, ["data", "check", str(root), "--config", str(cfg)])
    assert bad.exit_code == 2
    assert "quality.leakage" in bad.output and (root / "data_quality.json").exists()


def test_the_pipeline_stage_writes_the_report_puts_it_on_the_card_and_refuses_leaky_data(tmp_path):
    from raysys.config import preset
    from raysys.registry.modelcard import build_model_card, render_markdown
    from raysys.workflow.stages import _quality_lineage, absolute, stage_data, stage_quality

    cfg = absolute(preset("tiny").with_root(tmp_path))
    cfg.data = cfg.data.model_copy(update=dict(num_train_rows=2000, num_val_rows=400, num_test_rows=400))
    cfg.quality.label_issues = OFF
    prep = stage_data(cfg)
    summary = stage_quality(cfg, prep)
    assert summary["status"] == "ok" and prep.quality is summary
    report = json.loads(open(summary["report"]).read())
    assert summary["report"].startswith(cfg.run_dir) and report["config"]["label_issues"]["warn"] is None
    assert _quality_lineage(prep)["data_quality"]["status"] == "ok"
    card = build_model_card(name="m", kind="teacher", schema=prep.schema, data_fingerprint=prep.fingerprint,
                            metrics={"accuracy": 0.5}, data_quality=summary)
    md = render_markdown(card)
    assert card["data"]["quality"]["status"] == "ok" and "## Data quality" in md and "| leakage | 0 |" in md
    train = read_split(cfg.data.root, "train")
    _rewrite(Path(cfg.data.root), "test", pa.concat_tables([read_split(cfg.data.root, "test"), train.slice(0, 100)]))
    prep = stage_data(cfg)
    with pytest.raises(ValueError, match=r"quality\.leakage: .*test 100/500"):
        stage_quality(cfg, prep)


def test_a_dataset_that_does_not_match_its_schema_is_a_clear_error(clean_small, tmp_path):
    root = _copy(clean_small, tmp_path)
    schema = DatasetSchema.load(root)
    schema.features.append(FeatureSpec(name="ghost", kind="numeric"))
    schema.save(root)
    with pytest.raises(ValueError, match="ghost: column missing from train split"):
        check_dataset(root, _fast())
