"""Tier 1: DP-SGD through Opacus on a tiny model (skipped without the `dp` extra), and the strategy refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysys.config import DataConfig, DPConfig, ModelConfig, PipelineConfig, TrainConfig
from raysys.data import Preprocessor
from raysys.data.synthetic import SyntheticTask
from raysys.models import build_model, model_spec
from raysys.trust.dp import check_strategy


def test_strategies_dp_sgd_cannot_run_under_are_refused():
    check_strategy("ddp")
    check_strategy("single")
    for s in ("zero1", "zero2", "zero3", "pipeline", "tensor"):
        with pytest.raises(ValueError, match="single-process and data-parallel"):
            check_strategy(s)
        with pytest.raises(ValueError, match="train.dp: DP-SGD .*set train.strategy: ddp"):
            TrainConfig(strategy=s, dp=DPConfig())
    assert TrainConfig(strategy="ddp", dp=DPConfig()).dp.delta == 1e-5
    with pytest.raises(ValueError, match="distill.dp: the Ray Train teacher loop and the Tune student trials"):
        PipelineConfig.model_validate({"distill": {"dp": {"noise_multiplier": 1.0}}})


def test_dp_sgd_trains_reports_epsilon_and_keeps_the_state_dict():
    pytest.importorskip("opacus")
    from raysys.trust.dp import train_dp

    cfg = DataConfig(num_numeric=4, num_categorical=2, num_categories=4, num_classes=3, seed=3)
    task = SyntheticTask(cfg)
    schema = task.schema()
    table = task.sample(1200, [3, 1])
    x_num, x_cat, y = Preprocessor.fit(schema, table).transform_table(table)
    spec = model_spec(schema, ModelConfig(hidden_dims=[32]))
    torch.set_num_threads(1)
    out = {}
    for sigma in (0.8, 2.0):
        model = build_model(spec)
        keys = set(model.state_dict())
        trained, acct = train_dp(model, x_num, x_cat, y, DPConfig(noise_multiplier=sigma), epochs=2,
                                 batch_size=100, lr=1e-2, soft_targets=np.zeros((len(y), 3), np.float32))
        assert set(trained.state_dict()) == keys  # Opacus's wrapper is gone, the offsets buffer is back
        assert any(n.endswith("offsets") for n, _ in trained.named_buffers())
        assert acct["dp_sgd"] and acct["steps"] > 0 and acct["sample_rate"] == pytest.approx(100 / 1200)
        out[sigma] = acct["epsilon"]
    assert 0 < out[2.0] < out[0.8] < 100  # more noise, smaller epsilon
