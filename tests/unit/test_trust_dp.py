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
    # private students learning from a teacher's logits need a private teacher (or no distillation)
    with pytest.raises(ValueError, match="distill.dp: the students learn from the teacher's logits.*set train.dp"):
        PipelineConfig.model_validate({"distill": {"dp": {}}})
    assert PipelineConfig.model_validate({"distill": {"dp": {}, "search": "grid", "alphas": [0.0]}}).train.dp is None
    with pytest.raises(ValueError, match="train.dp: DP-SGD supports the mlp family only.*teacher.family: mlp"):
        PipelineConfig.model_validate({"train": {"dp": {}}, "teacher": {"family": "ft_transformer"}})


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
    # a resume under other DP settings would report an epsilon that does not cover the epochs already trained
    with pytest.raises(ValueError, match="dp: cannot resume a trial trained with DP-SGD settings"):
        fit_student({**config, "dp": {**dp, "noise_multiplier": 2.0}}, data,
                    resume={**load_state(tmp_path / "resume.safetensors"), "weights": saved["weights"]})


def test_a_private_students_epsilon_composes_every_trial_and_the_teacher():
    """The card's epsilon of a student chosen from a DP-SGD sweep is that of every trial (all trained on the same
    rows; the last epoch's steps, not the chosen epoch's) and of the private teacher whose logits they learnt,
    composed in RDP: above each part, below their sum."""
    pytest.importorskip("opacus")
    from raysys.distill.sweep.results import Candidate, sweep_privacy
    from raysys.trust.dp import dp_accounting
    from raysys.workflow.trust_stage import student_privacy

    dp = DPConfig(noise_multiplier=1.0)
    acct = [dp_accounting(dp, sample_rate=0.01, steps=n, epochs=n // 100) for n in (400, 1000, 1000)]
    trials = [{"dp_epsilon": a["epsilon"], "dp_steps": a["steps"], "epochs_run": a["epochs"]} for a in acct]
    best_epoch = dp_accounting(dp, sample_rate=0.01, steps=300, epochs=3)  # its checkpoint, 7 epochs before its end
    sweep = sweep_privacy(Candidate(trials[1], None, {"dp": best_epoch}, {}), trials)
    assert sweep["trial_epsilon"] == acct[1]["epsilon"] and sweep["steps"] == 1000  # every step it took
    assert max(a["epsilon"] for a in acct) < sweep["epsilon"] < sum(a["epsilon"] for a in acct)
    teacher = dp_accounting(DPConfig(noise_multiplier=1.0), sample_rate=0.02, steps=500, epochs=10)
    cfg = PipelineConfig.model_validate({"train": {"dp": {}}, "distill": {"dp": {}}})
    card = student_privacy(cfg, sweep, teacher)
    assert card["teacher_epsilon"] == teacher["epsilon"] and card["sweep_epsilon"] == sweep["epsilon"]
    assert max(sweep["epsilon"], teacher["epsilon"]) < card["epsilon"] < sweep["epsilon"] + teacher["epsilon"]
    no_kd = PipelineConfig.model_validate({"distill": {"dp": {}, "search": "grid", "alphas": [0.0]}})
    assert student_privacy(no_kd, sweep, None)["epsilon"] == sweep["epsilon"]  # the teacher taught nothing
    assert student_privacy(cfg, None, teacher) is None
