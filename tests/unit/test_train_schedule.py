"""Tier 1: the teacher's lr schedule (stateless, from the global step) and selective decoupled weight decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raysys.config import load_config
from raysys.models import build_model
from raysys.train.schedule import (
    decay_parameters,
    decoupled_weight_decay,
    lr_at,
    set_lr,
    total_steps,
    warmup_steps,
)

FT_SPEC = {"family": "ft_transformer", "num_numeric": 3, "cardinalities": [3, 4], "num_classes": 3, "d_model": 8,
           "num_blocks": 2, "num_heads": 2, "ffn_mult": 2.0, "dropout": 0.0}
MLP_SPEC = {"family": "mlp", "num_numeric": 3, "cardinalities": [3, 4], "num_classes": 3, "hidden_dims": [16, 8],
            "embed_dim": 3, "dropout": 0.0}


def test_total_steps_is_ceil_rows_over_batch_times_epochs():
    assert total_steps(1000, 256, 3) == 4 * 3
    assert total_steps(1024, 256, 2) == 8
    assert total_steps(0, 256, 2) == 2  # never a zero-length schedule
    with pytest.raises(ValueError):
        total_steps(10, 0, 1)


def test_cosine_warms_up_linearly_then_decays_to_zero():
    total, base = 200, 1e-2
    warm = warmup_steps(total, 0.05)
    assert warm == 10
    lrs = [lr_at(s, total, base, "cosine", 0.05) for s in range(total)]
    assert lrs[0] == pytest.approx(base / warm)
    assert lrs[warm - 1] == pytest.approx(base)  # peak at the end of warm-up
    assert all(b > a for a, b in zip(lrs[:warm], lrs[1:warm]))  # strictly rising
    assert all(b <= a for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # never rising afterwards
    assert lrs[warm] == pytest.approx(base)
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(base / 2, rel=1e-2)
    assert 0 < lrs[-1] < base * 1e-3
    assert lr_at(total, total, base, "cosine", 0.05) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(10 * total, total, base, "cosine", 0.05) == pytest.approx(0.0, abs=1e-12)  # clamped, not periodic


def test_constant_and_no_warmup():
    assert {lr_at(s, 50, 3e-3, "constant", 0.2) for s in range(60)} == {3e-3}
    assert lr_at(0, 100, 1.0, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_at(50, 100, 1.0, "cosine", 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(0, 10, 1.0, "linear")
    with pytest.raises(ValueError, match="warmup_fraction"):
        lr_at(0, 10, 1.0, "cosine", 1.0)


def test_schedule_is_a_function_of_the_global_step_only():
    """Resume safety: a run restarted at step k sets the same lr as an uninterrupted one."""
    total = 37
    straight = [lr_at(s, total, 2e-3, "cosine", 0.1) for s in range(total)]
    resumed = [lr_at(s, total, 2e-3, "cosine", 0.1) for s in range(12)] + \
              [lr_at(s, total, 2e-3, "cosine", 0.1) for s in range(12, total)]
    assert straight == resumed
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1.0)
    set_lr(opt, straight[5])
    assert opt.param_groups[0]["lr"] == straight[5]


def test_train_config_schedule_fields():
    cfg = load_config(preset_name="tiny")
    assert cfg.train.lr_schedule == "cosine" and cfg.train.warmup_fraction == 0.05
    cfg = load_config(preset_name="tiny", overrides={"train": {"lr_schedule": "constant", "warmup_fraction": 0}})
    assert cfg.train.lr_schedule == "constant"
    with pytest.raises(ValueError, match="lr_schedule"):
        load_config(preset_name="tiny", overrides={"train": {"lr_schedule": "step"}})
    with pytest.raises(ValueError, match="warmup_fraction"):
        load_config(preset_name="tiny", overrides={"train": {"warmup_fraction": 1.5}})


def test_loop_config_carries_the_schedule(tmp_path):
    from types import SimpleNamespace

    from raysys.config import preset
    from raysys.data.schema import DatasetSchema
    from raysys.train.worker_config import worker_config

    cfg = preset("tiny").with_root(tmp_path)  # no data written: the synthetic row count sizes the schedule
    schema = DatasetSchema.model_validate({"features": [{"name": "a", "kind": "numeric"}], "label": "y",
                                           "classes": ["p", "q"]})
    wc = worker_config(cfg, schema, SimpleNamespace(to_dict=dict), "teacher")
    conf = {**wc.train.model_dump(), "total_steps": wc.total_steps}
    assert conf["lr_schedule"] == "cosine" and conf["warmup_fraction"] == 0.05
    assert conf["total_steps"] == math.ceil(cfg.data.num_train_rows / cfg.train.batch_size) * cfg.train.num_epochs


@pytest.mark.parametrize("spec", [FT_SPEC, MLP_SPEC], ids=["ft_transformer", "mlp"])
def test_decay_only_matrices_outside_embeddings(spec):
    model = build_model(spec)
    decayed = {id(p) for p in decay_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names, "some weights must be decayed"
    for n, p in model.named_parameters():
        if id(p) in decayed:
            assert p.ndim >= 2 and "embed" not in n and "tokenizer" not in n, n
        elif p.ndim >= 2:
            assert "embed" in n or "tokenizer" in n, f"{n} is a non-embedding matrix left undecayed"
    if spec["family"] == "ft_transformer":
        assert not any(n.startswith("tokenizer.") for n in names)
        assert any(".attn." in n or "attn" in n for n in names)


def _grouped_adamw(model, lr, wd):
    decay = {id(p) for p in decay_parameters(model)}
    return torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) in decay], "weight_decay": wd},
                              {"params": [p for p in model.parameters() if id(p) not in decay], "weight_decay": 0.0}],
                             lr=lr)


@pytest.mark.parametrize("spec", [FT_SPEC, MLP_SPEC], ids=["ft_transformer", "mlp"])
def test_hooked_decay_equals_adamw_param_groups(spec):
    """One group + the pre-step hook == AdamW with a decay group and a no-decay group, under a changing lr."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    ref = build_model(spec)
    ours = build_model(spec)
    ours.load_state_dict(ref.state_dict())
    lr, wd = 5e-2, 0.3  # large, so a wrong decay set or order would show
    ref_opt = _grouped_adamw(ref, lr, wd)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=lr, weight_decay=wd)
    remove = decoupled_weight_decay(ours, our_opt, wd)
    assert our_opt.param_groups[0]["weight_decay"] == 0.0
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x_num = torch.randn(16, 3, generator=g)
        x_cat = torch.stack([torch.randint(0, 3, (16,), generator=g), torch.randint(0, 4, (16,), generator=g)], 1)
        y = torch.randint(0, 3, (16,), generator=g)
        this_lr = lr_at(step, 5, lr, "cosine", 0.2)
        set_lr(ref_opt, this_lr)
        set_lr(our_opt, this_lr)
        for m, o in ((ref, ref_opt), (ours, our_opt)):
            o.zero_grad()
            F.cross_entropy(m(x_num, x_cat), y).backward()
            o.step()
    for (n, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    # and the decay mattered: a run without it ends elsewhere
    remove()
    torch.manual_seed(0)
    plain = build_model(spec)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x_num = torch.randn(16, 3, generator=g)
        x_cat = torch.stack([torch.randint(0, 3, (16,), generator=g), torch.randint(0, 4, (16,), generator=g)], 1)
        y = torch.randint(0, 3, (16,), generator=g)
        set_lr(plain_opt, lr_at(step, 5, lr, "cosine", 0.2))
        plain_opt.zero_grad()
        F.cross_entropy(plain(x_num, x_cat), y).backward()
        plain_opt.step()
    diff = max(float((a - b).abs().max()) for a, b in zip(plain.parameters(), ours.parameters()))
    assert diff > 1e-3


def test_no_hook_when_weight_decay_is_zero():
    model = build_model(MLP_SPEC)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    assert decoupled_weight_decay(model, opt, 0.0) is None
    assert opt.param_groups[0]["weight_decay"] == 0.0
