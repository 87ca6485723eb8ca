"""Tier 1: training-state checkpoints, the loop's Ray-free pieces, run naming. No Ray, no process group."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from raysys.models import build_model
from raysys.parallel import apply_ddp, parallelize
from raysys.statefile import flatten_state, unflatten_state
from raysys.train import TeacherResult
from raysys.train.checkpoint import (
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    is_checkpoint_dir,
    load_model_state,
    load_training_state,
    model_state_dict,
    read_meta,
    save_training_state,
)
from raysys.train.steps import epoch_seed, evaluate_sums, per_worker_batch_size, train_step
from raysys.train.trainer import choose_run_name, storage_path

SPEC = {"family": "mlp", "num_numeric": 5, "cardinalities": [3, 4], "num_classes": 3, "hidden_dims": [16, 8],
        "embed_dim": 3, "dropout": 0.0}


def _batches(n_batches: int, batch: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x_num = torch.randn(batch, 5, generator=g)
        x_cat = torch.stack([torch.randint(0, 3, (batch,), generator=g), torch.randint(0, 4, (batch,), generator=g)], 1)
        y = torch.randint(0, 3, (batch,), generator=g)
        out.append((x_num, x_cat, y))
    return out


def _fresh(seed: int):
    torch.manual_seed(seed)
    model = build_model(SPEC)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-3)
    return model, opt


def test_resume_is_bit_identical(tmp_path):
    batches = _batches(10)
    # uninterrupted reference
    ref, ref_opt = _fresh(0)
    ref_losses = [train_step(ref, ref_opt, *b) for b in batches]

    # interrupted: 4 steps, save, load into a model/optimizer built from a different seed, 6 more
    model, opt = _fresh(0)
    losses = [train_step(model, opt, *b) for b in batches[:4]]
    save_training_state(tmp_path, model, opt, epoch=0, global_step=4, model_spec=SPEC,
                        metrics=[{"epoch": 0, "train_loss": losses[-1]}], extra={"note": "x"})
    model2, opt2 = _fresh(123)
    assert not torch.equal(model2.head.weight, model.head.weight)
    meta = load_training_state(tmp_path, model2, opt2)
    assert meta["epoch"] == 0 and meta["global_step"] == 4 and meta["model_spec"] == SPEC
    assert meta["extra"] == {"note": "x"} and meta["metrics"][0]["epoch"] == 0
    losses += [train_step(model2, opt2, *b) for b in batches[4:]]

    assert losses == ref_losses
    for (k, a), (k2, b) in zip(ref.state_dict().items(), model2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    ref_state, state = ref_opt.state_dict(), opt2.state_dict()
    assert ref_state["param_groups"] == state["param_groups"]
    for i in ref_state["state"]:
        for key, v in ref_state["state"][i].items():
            assert torch.equal(v, state["state"][i][key]), (i, key)


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    model, opt = _fresh(0)
    train_step(model, opt, *_batches(1)[0])
    save_training_state(tmp_path, model, opt, epoch=2, global_step=7, model_spec=SPEC)
    assert {p.name for p in tmp_path.iterdir()} == {MODEL_FILE, OPTIMIZER_FILE, META_FILE}
    assert is_checkpoint_dir(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["epoch"] == 2 and meta["has_optimizer"] is True
    # safetensors files start with an 8-byte little-endian header length then JSON: no pickle opcodes
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        raw = (tmp_path / name).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        json.loads(raw[8:8 + n])
    assert set(load_model_state(tmp_path)) == set(model.state_dict())
    # no temp files left behind
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_ddp_prefix_is_stripped(tmp_path):
    class Wrapper(nn.Module):  # stands in for DDP's `module.` attribute
        def __init__(self, m):
            super().__init__()
            self.module = m

    model, _ = _fresh(0)
    sd = model_state_dict(Wrapper(model))
    assert set(sd) == set(model.state_dict())
    save_training_state(tmp_path, Wrapper(model), None, epoch=0, global_step=0, model_spec=SPEC)
    fresh = build_model(SPEC)
    fresh.load_state_dict(load_model_state(tmp_path))
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert read_meta(tmp_path)["has_optimizer"] is False
    with pytest.raises(FileNotFoundError, match="weights only"):
        load_training_state(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()))


def test_optimizer_flatten_roundtrip_keeps_structure():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2), "count": 5}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0], "foreach": None}]}
    tensors, tree = flatten_state(state)
    json.dumps(tree)
    assert set(tensors) == {"state.0.step", "state.0.exp_avg"}
    back = unflatten_state(tensors, json.loads(json.dumps(tree)))
    assert back["param_groups"] == state["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    assert back["state"][0]["count"] == 5 and torch.equal(back["state"][0]["step"], torch.tensor(3.0))
    with pytest.raises(TypeError, match="without pickle"):
        flatten_state({"state": {}, "param_groups": [{"fn": object()}]})


def test_read_meta_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint dir"):
        read_meta(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        read_meta(tmp_path)


def test_parallelize_single_process_and_unknown_strategy():
    model, _ = _fresh(0)
    assert apply_ddp(model) is model  # no process group: unchanged
    assert parallelize(model, "ddp") is model
    with pytest.raises(ValueError, match="train.strategy"):
        parallelize(model, "fsdp")


def test_evaluate_sums_and_helpers():
    model, _ = _fresh(0)
    batches = _batches(3, batch=10)
    loss_sum, correct, n = evaluate_sums(model, batches)
    assert n == 30 and 0 <= correct <= 30 and loss_sum > 0
    assert evaluate_sums(model, []) == (0.0, 0, 0)
    assert per_worker_batch_size(256, 2) == 128 and per_worker_batch_size(5, 2) == 2
    with pytest.raises(ValueError, match="train.batch_size"):
        per_worker_batch_size(1, 2)
    seeds = {epoch_seed(0, e, r) for e in range(3) for r in range(2)}
    assert len(seeds) == 6 and epoch_seed(0, 1, 1) == epoch_seed(0, 1, 1)


def test_choose_run_name(tmp_path):
    storage = storage_path(str(tmp_path))
    assert choose_run_name(storage, "teacher", resume=False) == "teacher"
    (tmp_path / "teacher").mkdir()
    assert choose_run_name(storage, "teacher", resume=True) == "teacher"
    fresh = choose_run_name(storage, "teacher", resume=False)
    assert fresh.startswith("teacher_") and not (tmp_path / fresh).exists()
    (tmp_path / fresh).mkdir()
    again = choose_run_name(storage, "teacher", resume=False)
    assert again not in {"teacher", fresh}
    with pytest.raises(ValueError, match="run_name"):
        choose_run_name(storage, "a/b", resume=False)
    assert storage_path("s3://bucket/runs") == "s3://bucket/runs"


def test_teacher_result_from_checkpoint_dir(tmp_path):
    model, opt = _fresh(0)
    metrics = [{"epoch": 0, "val_accuracy": 0.5}, {"epoch": 1, "val_accuracy": 0.7}]
    save_training_state(tmp_path, model, opt, epoch=1, global_step=2, model_spec=SPEC, metrics=metrics,
                        extra={"run_name": "teacher"})
    res = TeacherResult.from_checkpoint_dir(tmp_path)
    assert res.metrics == metrics and res.final_metrics["val_accuracy"] == 0.7 and res.run_name == "teacher"
    loaded = res.load_model()
    x = _batches(1)[0]
    assert np.allclose(loaded(x[0], x[1]).detach().numpy(), model.eval()(x[0], x[1]).detach().numpy())
    assert set(res.state_dict()) == set(model.state_dict())


def test_resume_refuses_another_architecture(tmp_path):
    from raysys.train.trainer import _check_resumable

    storage = storage_path(str(tmp_path))
    _check_resumable(storage, "teacher", SPEC)  # no run yet: nothing to check
    model, opt = _fresh(0)
    for epoch in (0, 1):
        save_training_state(tmp_path / "teacher" / f"checkpoint_epoch_{epoch:04d}", model, opt, epoch=epoch,
                            global_step=epoch, model_spec=SPEC)
    _check_resumable(storage, "teacher", dict(SPEC))
    with pytest.raises(ValueError, match="resume: run 'teacher'.*model spec"):
        _check_resumable(storage, "teacher", {**SPEC, "hidden_dims": [64]})


def _ft_schema():
    from raysys.data.schema import DatasetSchema

    features = [{"name": f"n{i}", "kind": "numeric"} for i in range(5)]
    features += [{"name": "a", "kind": "categorical", "categories": ["x", "y", "z"]},
                 {"name": "b", "kind": "categorical", "categories": ["p", "q", "r", "s"]}]
    return DatasetSchema.model_validate({"features": features, "label": "label", "classes": ["c0", "c1", "c2"]})


@pytest.mark.parametrize("strategy,workers", [("ddp", 2), ("tensor", 2), ("pipeline", 2)])
def test_teacher_family_comes_from_the_config(strategy, workers):
    """`teacher.family` reaches the workers' spec: the driver checks and the loop config build the FT teacher."""
    from types import SimpleNamespace

    from raysys.config import ModelConfig, preset
    from raysys.models.ft_transformer import FTTransformer
    from raysys.train.trainer import check_train_config
    from raysys.train.worker_config import worker_config

    cfg = preset("tiny")
    cfg.teacher = ModelConfig(family="ft_transformer", size="tiny", num_blocks=2)
    cfg.train = cfg.train.model_copy(update={"strategy": strategy, "num_workers": workers})
    schema = _ft_schema()
    est = check_train_config(cfg, schema)
    conf = worker_config(cfg, schema, SimpleNamespace(to_dict=dict), "teacher").model_dump(mode="json")
    spec = conf["model_spec"]
    assert spec["family"] == "ft_transformer" and spec["num_blocks"] == 2 and spec["d_model"] == 32
    assert json.loads(json.dumps(conf["model_spec"])) == spec
    model = build_model(spec)  # what train_loop_per_worker builds
    assert isinstance(model, FTTransformer)
    assert est.total_bytes > 0
    # the default teacher is still the MLP, with the spec it always had apart from the activation key
    cfg.teacher = ModelConfig(hidden_dims=[16, 8], embed_dim=3, activation="gelu")
    mlp = worker_config(cfg, schema, SimpleNamespace(to_dict=dict), "teacher").model_spec
    assert mlp == {**SPEC, "cardinalities": [3, 4]}


@pytest.mark.parametrize("spec", [SPEC, {"family": "ft_transformer", "num_numeric": 5, "cardinalities": [3, 4],
                                         "num_classes": 3, "d_model": 8, "num_blocks": 1, "num_heads": 2,
                                         "ffn_mult": 2.0, "dropout": 0.0}], ids=["mlp", "ft_transformer"])
def test_padding_batches_have_the_model_input_shapes(monkeypatch, spec):
    """A rank with no validation batch of its own pads with empty ones shaped for the model (either family)."""
    import torch.distributed as dist

    from raysys.train.steps import pad_to_common_count

    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: t.fill_(2))  # the busiest rank has 2 batches
    model = build_model(spec).eval()
    padded = pad_to_common_count([], model)
    assert len(padded) == 2
    x_num, x_cat, y = padded[0]
    assert x_num.shape == (0, 5) and x_cat.shape == (0, 2) and x_cat.dtype == torch.int64 and y.shape == (0,)
    assert model(x_num, x_cat).shape == (0, 3)


def test_report_poll_interval_sets_and_restores_the_controller_variable(monkeypatch):
    from raysys.train.process import REPORT_POLL_ENV, report_poll_interval

    monkeypatch.delenv(REPORT_POLL_ENV, raising=False)
    with report_poll_interval(0.25) as got:
        assert got == 0.25 and float(os.environ[REPORT_POLL_ENV]) == 0.25
    assert REPORT_POLL_ENV not in os.environ
    with pytest.raises(RuntimeError), report_poll_interval(0.25):
        raise RuntimeError("fit failed")
    assert REPORT_POLL_ENV not in os.environ
    # an operator's explicit setting wins and is left as it was
    monkeypatch.setenv(REPORT_POLL_ENV, "1.5")
    with report_poll_interval(0.25) as got:
        assert got == 1.5 and os.environ[REPORT_POLL_ENV] == "1.5"
    assert os.environ[REPORT_POLL_ENV] == "1.5"


def test_report_poll_interval_is_validated():
    from pydantic import ValidationError

    from raysys.config import TrainConfig

    assert TrainConfig().report_poll_interval_s == 0.2
    with pytest.raises(ValidationError, match="report_poll_interval_s"):
        TrainConfig(report_poll_interval_s=0)
