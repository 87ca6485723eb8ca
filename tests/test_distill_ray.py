"""Tier 3: the distillation sweep on the session's local Ray cluster (tiny preset).

The teacher is trained here with a plain torch loop so these tests do not depend on raysys.train.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysys.data import Preprocessor, ensure_dataset, read_split
from raysys.distill import precompute_teacher_logits, run_sweep
from raysys.evaluate import agreement, evaluate_model
from raysys.models import build_model, model_spec

pytestmark = pytest.mark.integration


def _teacher(cfg, num_epochs=5):
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    x_num, x_cat, y = (torch.from_numpy(a) for a in pre.transform_table(read_split(cfg.data.root, "train")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: one thread is faster on a shared 2-core box
    try:
        return schema, pre, _fit(_seeded_model(model_spec(schema, cfg.teacher)), x_num, x_cat, y, num_epochs)
    finally:
        torch.set_num_threads(threads)


def _seeded_model(spec):
    torch.manual_seed(0)
    return build_model(spec)


def _fit(model, x_num, x_cat, y, num_epochs):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(num_epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x_num[idx], x_cat[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def _split(cfg, pre, name):
    return pre.transform_table(read_split(cfg.data.root, name))


def test_sweep_fifo_finds_a_good_student(ray_cluster, tiny_cfg):
    cfg = tiny_cfg
    schema, pre, teacher = _teacher(cfg)
    res = run_sweep(cfg, schema, pre, teacher, run_name="distill-fifo")

    grid = [(t, a) for t in cfg.distill.temperatures for a in cfg.distill.alphas]
    assert len(res.trials) == len(grid)
    assert sorted((t["temperature"], t["alpha"]) for t in res.trials) == sorted(grid)
    assert (res.best_config["temperature"], res.best_config["alpha"]) in grid
    assert all(t["error"] is None and t["epochs_run"] == cfg.distill.num_epochs for t in res.trials)
    assert res.best_val_accuracy == max(t["best_val_accuracy"] for t in res.trials)
    assert res.results_dir.startswith(cfg.run_dir)
    json.dumps(res.summary())
    # the checkpoint is safetensors + JSON, nothing pickled
    ckpt = Path(res.best_checkpoint_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors"]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["temperature"], meta["alpha"]) == (res.best_config["temperature"], res.best_config["alpha"])
    assert meta["metrics"]["epoch"] == res.best_epoch

    # the best weights load into the student architecture and reproduce the reported accuracy
    student = build_model(res.student_spec)
    student.load_state_dict(res.best_state_dict)
    assert res.student_spec == model_spec(schema, cfg.distill.student)
    vx_num, vx_cat, vy = _split(cfg, pre, "validation")
    val = evaluate_model(student, vx_num, vx_cat, vy, schema.num_classes)
    assert val["accuracy"] == pytest.approx(res.best_val_accuracy, abs=2e-3)

    # well above the majority class on held-out test rows, and mostly agreeing with the teacher
    tx_num, tx_cat, ty = _split(cfg, pre, "test")
    majority = np.bincount(ty).max() / len(ty)
    test = evaluate_model(student, tx_num, tx_cat, ty, schema.num_classes)
    assert test["accuracy"] > majority + 0.25, (test["accuracy"], majority)
    teacher_pred = precompute_teacher_logits(teacher, tx_num, tx_cat).argmax(1)
    student_pred = np.asarray(student(torch.from_numpy(tx_num), torch.from_numpy(tx_cat)).argmax(1))
    assert agreement(teacher_pred, student_pred) > 0.65  # 0.74 when written
    assert res.teacher_val_accuracy > majority + 0.25


def test_sweep_asha_completes_without_deadlock(ray_cluster, tiny_cfg):
    cfg = tiny_cfg
    cfg.distill = cfg.distill.model_copy(update=dict(scheduler="asha", temperatures=[1.0, 4.0], alphas=[0.3, 0.9],
                                                     num_epochs=4, max_concurrent_trials=2))
    schema, pre, teacher = _teacher(cfg, num_epochs=3)
    res = run_sweep(cfg, schema, pre, teacher, run_name="distill-asha")
    assert len(res.trials) == 4
    assert all(t["error"] is None for t in res.trials)
    # ASHA never stops a trial before its grace period (2 epochs here)
    assert all(2 <= t["epochs_run"] <= 4 for t in res.trials)
    assert (res.best_config["temperature"], res.best_config["alpha"]) in [(1.0, 0.3), (1.0, 0.9), (4.0, 0.3),
                                                                           (4.0, 0.9)]
    student = build_model(res.student_spec)
    student.load_state_dict(res.best_state_dict)
    assert res.scheduler == "asha"
