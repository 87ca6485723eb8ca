"""Tier 3: sharded teacher training on the session's local Ray: resuming a 4-worker zero3 run on 2 workers, and a
pipeline run resumed as ddp. (A SIGKILL of a zero3 rank mid-epoch, and the loss of its node, resuming from the
last sharded checkpoint: tests/integration/test_chaos_ray.py, benchmarks/chaos.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raysys.data import Preprocessor, ensure_dataset, read_split
from raysys.train import train_teacher
from raysys.train.checkpoint import checkpoint_layout, read_meta

pytestmark = pytest.mark.integration


def _data(cfg):
    schema = ensure_dataset(cfg.data)
    return schema, Preprocessor.fit_split(schema, cfg.data.root)


def _events(test_dir: Path, rank: int) -> list[dict]:
    path = test_dir / f"events-rank{rank}.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def _registered(run_dir: Path, epoch: int) -> bool:
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return f"checkpoint_epoch_{epoch:04d}" in snap.read_text()
    except OSError:
        return False


def _accuracy_band(cfg, pre) -> float:
    # the band test_train_ray.py asserts for an uninterrupted run of the same tiny teacher
    y = pre.transform_table(read_split(cfg.data.root, "validation"))[2]
    return max(0.6, np.bincount(y).max() / len(y) + 0.2)


@pytest.mark.timeout(420)
def test_zero3_on_4_workers_resumes_on_2(ray_cluster, tiny_cfg):
    cfg = tiny_cfg
    cfg.train.strategy = "zero3"
    cfg.train.num_workers = 4
    cfg.train.cpus_per_worker = 0.5
    cfg.train.num_epochs = 1
    schema, pre = _data(cfg)
    first = train_teacher(cfg, schema, pre, run_name="teacher-reshard")
    assert read_meta(first.checkpoint_dir)["extra"]["world_size"] == 4
    assert len(list((Path(first.checkpoint_dir) / "dcp").glob("*.distcp"))) == 4

    cfg.train.num_workers = 2
    cfg.train.cpus_per_worker = 1.0
    cfg.train.num_epochs = 2
    again = train_teacher(cfg, schema, pre, run_name=first.run_name, resume=True)
    assert [m["epoch"] for m in again.metrics] == [0, 1]
    assert [m["world_size"] for m in again.metrics] == [4, 2]
    assert [m["resumes"] for m in again.metrics] == [0, 1]
    # the resumed epoch continued from the 4-worker state (weights and AdamW moments) rather than starting over
    assert again.metrics[1]["train_loss"] < again.metrics[0]["train_loss"] - 0.05
    assert len(list((Path(again.checkpoint_dir) / "dcp").glob("*.distcp"))) == 2


@pytest.mark.timeout(420)
def test_pipeline_trains_and_resumes_as_ddp(ray_cluster, tiny_cfg):
    cfg = tiny_cfg
    cfg.train.strategy = "pipeline"  # pp = 2 stages, one per worker
    cfg.train.num_epochs = 1
    schema, pre = _data(cfg)
    first = train_teacher(cfg, schema, pre, run_name="teacher-pipeline")
    ckpt = Path(first.checkpoint_dir)
    # each stage wrote its own keys (DCP); the registry export consolidates them offline
    assert checkpoint_layout(ckpt) == "sharded" and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert set(first.state_dict()) == set(first.load_model().state_dict())
    m = first.metrics[0]
    assert m["strategy"] == "pipeline" and len(set(m["mem_per_rank_params_bytes"])) == 2  # two different stages

    cfg.train.strategy = "ddp"
    cfg.train.num_epochs = 2
    again = train_teacher(cfg, schema, pre, run_name=first.run_name, resume=True)
    assert [m["strategy"] for m in again.metrics] == ["pipeline", "ddp"]
    assert again.metrics[1]["train_loss"] < again.metrics[0]["train_loss"] - 0.05


def _ft_tiny(cfg):
    from raysys.config import ModelConfig

    cfg.teacher = ModelConfig(family="ft_transformer", size="tiny", num_blocks=2)
    cfg.train.num_workers = 4
    cfg.train.cpus_per_worker = 0.5
    cfg.train.num_epochs = 2
    return cfg


def _learns(res, cfg, pre) -> None:
    """Ran to completion, the loss fell, and the teacher beats the majority class on validation."""
    assert [m["epoch"] for m in res.metrics] == [0, 1]
    assert all(np.isfinite(m["train_loss"]) and np.isfinite(m["val_loss"]) for m in res.metrics)
    assert res.metrics[1]["train_loss"] < res.metrics[0]["train_loss"] - 0.02
    y = pre.transform_table(read_split(cfg.data.root, "validation"))[2]
    assert res.metrics[-1]["val_accuracy"] > np.bincount(y).max() / len(y) + 0.05


def _train_2d(tiny_cfg, strategy: str, parallel: dict, run_name: str):
    """Train the tiny FT teacher with a 2-D composition on 4 workers; check it learned and ran as asked.
    Returns (result, last epoch's metrics, bytes of the full model's state dict)."""
    from raysys.config import ParallelConfig

    cfg = _ft_tiny(tiny_cfg)
    cfg.train.strategy = strategy
    cfg.train.parallel = ParallelConfig(**parallel)
    schema, pre = _data(cfg)
    res = train_teacher(cfg, schema, pre, run_name=run_name)
    _learns(res, cfg, pre)
    m = res.metrics[-1]
    assert m["strategy"] == strategy and m["world_size"] == 4
    full = sum(t.numel() * t.element_size() for t in res.load_model().state_dict().values())
    return res, m, full


@pytest.mark.timeout(240)
def test_pipeline_x_ddp_on_4_workers(ray_cluster, tiny_cfg):
    """2 pipeline stages x 2 DDP replicas: each stage's two replicas hold equal, different-from-the-other-stage
    parameter bytes; the consolidated weights load into the single-device teacher."""
    res, m, full = _train_2d(tiny_cfg, "pipeline", {"dp": 2, "pp": 2}, "teacher-pp-x-dp")
    per_rank = m["mem_per_rank_params_bytes"]
    assert len(per_rank) == 4 and len(set(per_rank)) == 2 and sorted(per_rank)[0] == sorted(per_rank)[1]
    assert sum(set(per_rank)) == full  # the two stages together are the whole model, each held twice
    assert read_meta(res.checkpoint_dir)["extra"]["parallel"] == {"dp": 2, "tp": 1, "pp": 2}


@pytest.mark.timeout(240)
def test_tensor_x_zero3_on_4_workers(ray_cluster, tiny_cfg):
    """2-way tensor parallel x 2-way FSDP2 (zero3): every rank holds about a quarter of the sharded layers."""
    res, m, full = _train_2d(tiny_cfg, "tensor", {"dp": 2, "tp": 2}, "teacher-tp-x-zero3")
    assert max(m["mem_per_rank_params_bytes"]) < 0.5 * full  # sharded over tp and dp, not replicated
    assert max(m["mem_per_rank_optimizer_bytes"]) < full  # AdamW's 2 x full, split four ways
    assert read_meta(res.checkpoint_dir)["extra"]["parallel"] == {"dp": 2, "tp": 2, "pp": 1}
