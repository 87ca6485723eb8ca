"""Tier 1: soft targets and transfer rows of a small table, scored in this process (no Ray): the same files the
Ray Data path writes (tests/integration/test_distill_ray.py), every original column kept as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysys.config import ModelConfig
from raysys.data import Preprocessor, read_split
from raysys.data.byod import import_parquet
from raysys.distill import compute_soft_targets, precompute_teacher_logits, read_soft_targets
from raysys.distill.soft_targets import compute_transfer_targets, read_transfer_targets, score_here
from raysys.models import build_model, model_spec


@pytest.fixture
def small_table(tmp_path):
    """1,000 rows: a numeric feature with nulls, an integer one, a categorical one with nulls, a 3-class label."""
    rng = np.random.default_rng(0)
    n = 1000
    age = rng.normal(40, 10, n)
    city = rng.choice(["paris", "oslo", "rome"], n).astype(object)
    age_nulls, city_nulls = rng.random(n) < 0.1, rng.random(n) < 0.1
    city[city_nulls] = None
    table = pa.table({"age": pa.array(age, mask=age_nulls), "visits": rng.integers(0, 20, n),
                      "city": pa.array(city, type=pa.string()), "plan": rng.choice(["a", "b", "c"], n)})
    (tmp_path / "raw").mkdir()
    pq.write_table(table, tmp_path / "raw" / "part.parquet")
    schema = import_parquet(tmp_path / "raw", tmp_path / "ds", label="plan", seed=1)
    pre = Preprocessor.fit_split(schema, tmp_path / "ds")
    torch.manual_seed(0)
    teacher = build_model(model_spec(schema, ModelConfig(hidden_dims=[16, 8])))
    return tmp_path / "ds", schema, pre, teacher


def test_a_small_set_is_scored_here_into_the_same_files_with_every_column_kept(small_table):
    import ray

    root, schema, pre, teacher = small_table
    assert score_here(1000, teacher)
    teacher.train()
    st = compute_soft_targets(root, schema, pre, teacher, hints=True)
    assert not ray.is_initialized()  # no Ray started for it
    assert teacher.training  # the caller's mode is restored
    assert not st.reused and st.num_actors == 0
    meta = json.loads((root / "soft_targets" / st.key / "meta.json").read_text())
    assert meta["num_actors"] == 0 and meta["num_rows"] == st.num_rows
    for split in ("train", "validation"):
        source = read_split(root, split)
        stored = pq.read_table(sorted((root / "soft_targets" / st.key / split).glob("*.parquet")))
        assert st.num_rows[split] == source.num_rows == stored.num_rows
        # every original column as it was, nulls and types included, in the same order
        assert stored.select(source.column_names).equals(source)
        x_num, x_cat, y, logits, hints = read_soft_targets(st, split, pre)
        assert logits.shape == (source.num_rows, schema.num_classes) and hints.shape == (source.num_rows, 8)
        np.testing.assert_allclose(precompute_teacher_logits(teacher, x_num, x_cat), logits, rtol=1e-5, atol=1e-6)
    assert compute_soft_targets(root, schema, pre, teacher, hints=True).reused


def test_the_budget_is_rows_times_parameters_and_transfer_rows_are_scored_here_too(small_table):
    root, schema, pre, teacher = small_table
    params = sum(p.numel() for p in teacher.parameters())
    assert score_here(10, teacher, max_macs=10 * params) and not score_here(11, teacher, max_macs=10 * params)
    path, _, reused = compute_transfer_targets(root, schema, pre, teacher, 300, seed=3)
    assert not reused and json.loads((Path(path) / "meta.json").read_text())["num_actors"] == 0
    x_num, x_cat, logits = read_transfer_targets(path, pre)
    assert logits.shape == (300, schema.num_classes)
    np.testing.assert_allclose(precompute_teacher_logits(teacher, x_num, x_cat), logits, rtol=1e-5, atol=1e-6)
    assert compute_transfer_targets(root, schema, pre, teacher, 300, seed=3)[2]  # reused
