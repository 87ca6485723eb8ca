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
    # both halves of the pipeline take DP-SGD now; what they cannot keep private is refused, naming the fix
    cfg = PipelineConfig.model_validate({"train": {"dp": {}}, "distill": {"dp": {"noise_multiplier": 1.0}}})
    assert cfg.train.dp.noise_multiplier == 1.0 and cfg.distill.dp is not None
    with pytest.raises(ValueError, match="train.dp: DP-SGD runs on plain data parallel only.*tp=2"):
        TrainConfig(strategy="ddp", num_workers=2, parallel={"tp": 2}, dp=DPConfig())
    with pytest.raises(ValueError, match="distill.dp: MUNGE transfer rows.*transfer_multiplier: 0"):
        PipelineConfig.model_validate({"distill": {"dp": {}, "transfer_multiplier": 1.0}})
    with pytest.raises(ValueError, match="distill.dp: the hint loss.*hint_weight: 0"):
        PipelineConfig.model_validate({"distill": {"dp": {}, "hint_weight": 0.5}})


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


def _student_data(n=600):
    from raysys.distill import StudentData

    cfg = DataConfig(num_numeric=4, num_categorical=2, num_categories=4, num_classes=3, seed=5)
    task = SyntheticTask(cfg)
    schema = task.schema()
    tr, va = task.sample(n, [5, 1]), task.sample(300, [6, 1])
    pre = Preprocessor.fit(schema, tr)
    (x, c, y), (vx, vc, vy) = pre.transform_table(tr), pre.transform_table(va)
    logits = np.eye(3, dtype=np.float32)[y] * 3.0
    return schema, StudentData(x_num=x, x_cat=c, y=y, teacher_logits=logits, val_x_num=vx, val_x_cat=vc, val_y=vy)


def test_a_student_trains_with_dp_sgd_reports_epsilon_each_epoch_and_resumes_exactly(tmp_path):
    """A Tune trial's loop (`fit_student`) under `dp`: Poisson batches, per-row clipping and noise (the weights
    differ from the same run without DP), epsilon growing with the steps as the accountant says, and a run
    resumed from a saved epoch ending exactly where the uninterrupted one ends (batches, noise, optimizer)."""
    pytest.importorskip("opacus")
    from raysys.distill import fit_student
    from raysys.statefile import load_state, save_state
    from raysys.trust.dp import dp_accounting, steps_per_epoch

    torch.set_num_threads(1)
    schema, data = _student_data()
    spec = model_spec(schema, ModelConfig(hidden_dims=[16]))
    dp = {"noise_multiplier": 0.8, "max_grad_norm": 1.0, "delta": 1e-5}
    config = {"student_spec": spec, "temperature": 2.0, "alpha": 0.5, "num_epochs": 3, "batch_size": 60,
              "lr": 1e-2, "seed": 0, "dp": dp}
    full = fit_student(config, data)
    eps = [m["dp"]["epsilon"] for m in full.history]
    assert 0 < eps[0] < eps[1] < eps[2]
    steps = steps_per_epoch(len(data.y), 60)
    assert full.history[-1]["dp"] == dp_accounting(DPConfig(**dp), sample_rate=0.1, steps=3 * steps, epochs=3)
    assert full.history[-1]["val_accuracy"] > 0.5  # learns through the noise (3 classes)
    plain = fit_student({**config, "dp": None}, data)
    assert "dp" not in plain.history[-1]
    assert not torch.equal(plain.state_dict["head.weight"], full.state_dict["head.weight"])

    saved = {}

    def report(m, state):
        if m["epoch"] == 1:
            save_state(tmp_path / "resume.safetensors", state.resumable())
            saved["weights"] = state.weights
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_student(config, data, report)
    resumed = fit_student(config, data, resume={**load_state(tmp_path / "resume.safetensors"),
                                                "weights": saved["weights"]})
    assert [m["epoch"] for m in resumed.history] == [2, 3]
    assert resumed.history[-1]["dp"] == full.history[-1]["dp"]
    for k, v in full.state_dict.items():
        assert torch.equal(resumed.state_dict[k], v), k
    with pytest.raises(ValueError, match="dp: the hint loss"):
        fit_student({**config, "hint_weight": 0.5}, data)
