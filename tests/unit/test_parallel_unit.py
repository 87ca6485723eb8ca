"""Tier 1: parallel degrees, strategy config, memory accounting and the budget refusal. No process group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import REPO

from raysys.config import load_config
from raysys.models import build_model
from raysys.parallel import (
    ParallelDims,
    StrategyConfig,
    build_optimizer,
    check_available,
    fsdp_units,
    parallelize,
)
from raysys.parallel.memory import (
    GB,
    check_memory_budget,
    estimate_rank_bytes,
    memory_metrics,
    rank_memory,
    suggest_fit,
)
from raysys.train.steps import train_step

SPEC = {"family": "mlp", "num_numeric": 5, "cardinalities": [3, 4], "num_classes": 3, "hidden_dims": [16, 8],
        "embed_dim": 3, "dropout": 0.0}


def test_parallel_dims_validate_and_name_the_mesh():
    assert ParallelDims.for_strategy("zero3", 4) == ParallelDims(dp=4, tp=1, pp=1, world_size=4)
    assert ParallelDims.for_strategy("tensor", 4) == ParallelDims(dp=1, tp=4, pp=1, world_size=4)
    assert ParallelDims.for_strategy("pipeline", 2).pp == 2
    d = ParallelDims.for_strategy("zero3", 4, tp=2)  # tensor x zero3: dp inferred
    assert (d.dp, d.tp, d.pp) == (2, 2, 1)
    assert d.mesh_shape() == ((2, 2), ("dp", "tp"))
    assert ParallelDims.for_strategy("ddp", 4, pp=2).mesh_shape() == ((2, 2), ("pp", "dp"))
    assert ParallelDims(dp=1, world_size=1).mesh_shape() == ((1,), ("dp",))
    with pytest.raises(ValueError, match=r"train\.parallel: dp=3 x tp=1 x pp=1 = 3 but there are 4 workers"):
        ParallelDims(dp=3, world_size=4)
    with pytest.raises(ValueError, match=r"train\.parallel: tp=3 x pp=1 does not divide the 4 workers"):
        ParallelDims.for_strategy("ddp", 4, tp=3)
    with pytest.raises(ValueError, match=r"train\.strategy: unknown strategy 'fsdp'"):
        ParallelDims.for_strategy("fsdp", 2)
    assert ParallelDims(dp=1, world_size=1).build_mesh() is None  # no process group: single process


def test_strategy_config_and_model_parallel_hooks():
    assert StrategyConfig("zero3").data_parallel == "zero3"
    assert StrategyConfig("pipeline").data_parallel == "ddp"
    with pytest.raises(ValueError, match="train.strategy"):
        StrategyConfig("fsdp1")
    check_available(ParallelDims(dp=2, world_size=2))
    check_available(ParallelDims(dp=2, pp=2, world_size=4), StrategyConfig("pipeline"))  # pipeline x ddp
    check_available(ParallelDims(dp=2, tp=2, world_size=4), StrategyConfig("zero3"))  # tensor x zero3
    with pytest.raises(ValueError, match="pipeline stages replicate over dp with DDP only"):
        check_available(ParallelDims(dp=2, pp=2, world_size=4), StrategyConfig("zero3"))
    with pytest.raises(ValueError, match="cannot replicate tensor-parallel shards"):
        check_available(ParallelDims(dp=2, tp=2, world_size=4), StrategyConfig("ddp"))


def test_single_process_strategies_are_no_ops_and_optimizer_is_adamw():
    for s in ("ddp", "zero1", "zero2", "zero3"):
        model = build_model(SPEC)
        cfg = StrategyConfig(s, lr=1e-2, weight_decay=1e-3)
        assert parallelize(model, ParallelDims.for_strategy(s, 1), cfg) is model
        opt = build_optimizer(model, cfg)
        assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["lr"] == 1e-2
    assert [type(m).__name__ for m in fsdp_units(build_model(SPEC))] == ["Linear", "Linear"]


def test_config_strategy_parallel_and_budget_fields():
    cfg = load_config(preset_name="tiny", overrides={"train": {"strategy": "zero3", "num_workers": 4,
                                                               "parallel": {"dp": 4}, "max_worker_memory_gb": 2}})
    assert cfg.train.strategy == "zero3" and cfg.train.parallel.dp == 4 and cfg.train.max_worker_memory_gb == 2
    cfg = load_config(preset_name="tiny", overrides={"train": {"strategy": "pipeline", "num_workers": 4,
                                                               "parallel": {"pp": 2}, "num_microbatches": 4}})
    assert (cfg.train.parallel.pp, cfg.train.num_microbatches, cfg.train.pipeline_schedule) == (2, 4, "1f1b")
    with pytest.raises(ValueError, match=r"train\.parallel: dp=3 .* train\.num_workers is 4"):
        load_config(preset_name="tiny", overrides={"train": {"num_workers": 4, "parallel": {"dp": 3}}})
    with pytest.raises(ValueError, match=r"train\.strategy"):
        load_config(preset_name="tiny", overrides={"train": {"strategy": "fsdp"}})
    with pytest.raises(ValueError, match=r"train\.max_worker_memory_gb"):
        load_config(preset_name="tiny", overrides={"train": {"max_worker_memory_gb": 0}})


def test_memory_estimates_follow_each_strategys_sharding():
    p = 1_000_000
    d4 = ParallelDims(dp=4, world_size=4)
    ddp = estimate_rank_bytes(p, "ddp", d4)
    assert (ddp.params_bytes, ddp.grads_bytes, ddp.optimizer_bytes) == (4 * p, 4 * p, 8 * p)
    z1 = estimate_rank_bytes(p, "zero1", d4)
    assert (z1.params_bytes, z1.grads_bytes, z1.optimizer_bytes) == (4 * p, 4 * p, 2 * p)
    z2 = estimate_rank_bytes(p, "zero2", d4)
    assert (z2.params_bytes, z2.grads_bytes, z2.optimizer_bytes) == (4 * p, p, 2 * p)
    z3 = estimate_rank_bytes(p, "zero3", d4, largest_unit_params=1000)
    assert (z3.params_bytes, z3.grads_bytes, z3.optimizer_bytes) == (p + 4000, p, 2 * p)
    assert estimate_rank_bytes(p, "zero3", ParallelDims(dp=1, world_size=1)).total_bytes == 16 * p
    # model parallelism divides the model first
    assert estimate_rank_bytes(p, "tensor", ParallelDims(dp=1, tp=4, world_size=4)).total_bytes == 4 * p


def test_budget_refusal_names_a_strategy_and_worker_count_that_fit():
    p = 100_000_000  # 1.49 GiB of params + grads + AdamW with ddp
    d2 = ParallelDims(dp=2, world_size=2)
    assert check_memory_budget(p, "ddp", d2, None).total_bytes == 16 * p
    assert check_memory_budget(p, "ddp", d2, 2.0).strategy == "ddp"
    with pytest.raises(ValueError) as e:
        check_memory_budget(p, "ddp", d2, 1.0)
    msg = str(e.value)
    assert "train.max_worker_memory_gb" in msg and "'ddp' on 2 workers" in msg
    # 2 workers: zero1 = 4P + 4P + 4P = 1.12 GiB, zero2 = 4P + 6P = 0.93 GiB fits
    assert "strategy 'zero2' with 2 workers fits" in msg and "--strategy zero2 --workers 2" in msg
    fit = suggest_fit(p, 0.5, d2)
    assert (fit.strategy, fit.num_workers) == ("zero3", 4) and fit.total_gb <= 0.5
    with pytest.raises(ValueError, match="nothing fits up to 1024 workers"):
        check_memory_budget(p, "zero3", d2, 1e-6)


def test_budget_is_checked_on_the_driver_before_training(tiny_cfg):
    from raysys.data import Preprocessor, ensure_dataset
    from raysys.train import train_teacher
    from raysys.train.trainer import check_train_config

    cfg = tiny_cfg
    schema = ensure_dataset(cfg.data)
    est = check_train_config(cfg, schema)
    assert est.total_bytes > 0
    cfg.train.max_worker_memory_gb = est.total_gb * 0.9
    # refused before Ray starts or any worker trains: the suggestion shards more
    with pytest.raises(ValueError, match=r"'ddp' on 2 workers .* strategy 'zero1' with 2 workers fits"):
        train_teacher(cfg, schema, Preprocessor.fit_split(schema, cfg.data.root))


def test_rank_memory_counts_params_grads_and_adamw_state():
    torch.manual_seed(0)
    model = build_model(SPEC)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    n = sum(p.numel() for p in model.parameters())
    before = rank_memory(model, opt)
    assert before == {"params_bytes": 4 * n, "grads_bytes": 0, "optimizer_bytes": 0, "total_bytes": 4 * n}
    x_num, x_cat, y = torch.randn(8, 5), torch.zeros(8, 2, dtype=torch.int64), torch.zeros(8, dtype=torch.int64)
    train_step(model, opt, x_num, x_cat, y)
    after = rank_memory(model, opt)
    n_tensors = len(list(model.parameters()))
    assert after["grads_bytes"] == 4 * n
    assert after["optimizer_bytes"] == 8 * n + 4 * n_tensors  # two moments + a float32 step per tensor
    m = memory_metrics([after, {**after, "optimizer_bytes": 1}])
    assert m["mem_max_optimizer_bytes"] == after["optimizer_bytes"]
    assert m["mem_per_rank_optimizer_bytes"] == [after["optimizer_bytes"], 1]
    assert GB == 2**30


def test_cli_and_job_flags_become_config_overrides():
    import importlib.util

    from raysys.workflow.overrides import train_overrides

    assert train_overrides() is None
    assert train_overrides("zero3", 4) == {"train": {"strategy": "zero3", "num_workers": 4}}
    assert train_overrides("zero3", 4, tp=2, max_worker_memory_gb=8.0) == {
        "train": {"strategy": "zero3", "num_workers": 4, "parallel": {"tp": 2}, "max_worker_memory_gb": 8.0}}
    path = REPO / "jobs" / "train_teacher.py"
    spec = importlib.util.spec_from_file_location("train_teacher_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = job.parse_args(["--strategy", "zero3", "--workers", "4"])
    assert (args.strategy, args.workers) == ("zero3", 4)
    with pytest.raises(SystemExit):
        job.parse_args(["--strategy", "fsdp"])


class _FakeShard:
    """Stands in for a Ray Data shard: counts passes, yields numpy dict batches."""

    def __init__(self, n: int):
        self.cols = {"a": np.arange(n, dtype=np.float32), "c": np.array([f"k{i % 3}" for i in range(n)], dtype=object)}
        self.passes = 0

    def iter_batches(self, batch_size, batch_format="numpy", **kwargs):
        self.passes += 1
        n = len(self.cols["a"])
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.cols.items()}


def test_shard_cache_streams_once_then_shuffles_in_memory():
    from raysys.train.shard import ShardCache

    shard = _FakeShard(100)
    cache = ShardCache(shard, max_bytes=1 << 20)
    first = list(cache.batches(32, shuffle_seed=1))
    assert shard.passes == 1 and cache.cached and [len(b["a"]) for b in first] == [32, 32, 32, 4]
    e1 = np.concatenate([b["a"] for b in cache.batches(32, shuffle_seed=1)])
    e2 = np.concatenate([b["a"] for b in cache.batches(32, shuffle_seed=2)])
    assert shard.passes == 1  # later epochs never touch Ray Data again
    assert sorted(e1) == list(range(100)) and not np.array_equal(e1, e2)  # every row once, a new order per seed
    assert np.array_equal(e1, np.concatenate([b["a"] for b in cache.batches(32, shuffle_seed=1)]))  # seeded
    # too big for the budget (or 0): stream every pass
    small = ShardCache(_FakeShard(100), max_bytes=100)
    list(small.batches(32)), list(small.batches(32))
    assert not small.cached and small.shard.passes == 2
    assert not ShardCache(_FakeShard(10), max_bytes=0).cached


def test_shard_cache_from_a_table_gives_each_rank_an_equal_disjoint_share_with_nulls_as_ray_data_does():
    import pyarrow as pa

    from raysys.train.shard import ShardCache

    table = pa.table({"a": pa.array([float(i) if i % 7 else None for i in range(103)]),
                      "c": pa.array([f"k{i % 3}" if i % 5 else None for i in range(103)])})
    shards = [ShardCache.from_table(table, r, 4) for r in range(4)]
    rows = [np.concatenate([b["c"] for b in s.batches(8, shuffle_seed=r)]) for r, s in enumerate(shards)]
    assert [len(r) for r in rows] == [25] * 4 and all(s.cached for s in shards)  # 103 // 4 each, 3 left unused
    seen = np.concatenate([np.concatenate([b["a"] for b in s.batches(8)]) for s in shards])
    assert np.array_equal(seen[~np.isnan(seen)], [i for i in range(100) if i % 7])  # disjoint, in order, none twice
    assert np.isnan(seen[0]) and rows[0].dtype == object and None in rows[0]  # nulls: NaN and None, as Ray Data's
    for s in shards:  # a new seeded order per epoch over the same rows
        e1, e2 = (np.concatenate([b["a"] for b in s.batches(8, shuffle_seed=k)]) for k in (1, 2))
        assert not np.array_equal(e1, e2, equal_nan=True) and np.array_equal(np.sort(e1), np.sort(e2), equal_nan=True)
    assert ShardCache.from_table(table, 0, 4).load("train.num_workers") == 25
    empty = ShardCache.from_table(table.slice(0, 3), 1, 4)
    with pytest.raises(ValueError, match="train.num_workers"):
        empty.load("train.num_workers")


def test_ddp_broadcasts_buffers_only_when_training_can_change_them():
    """DDP's per-forward buffer broadcast is one extra collective per step: skipped for the teachers, whose
    only buffers are constant integer index offsets, kept for anything with float buffers (BatchNorm)."""
    from torch import nn

    from raysys.models import build_model
    from raysys.parallel.ddp import needs_buffer_broadcast

    mlp = build_model({"family": "mlp", "num_numeric": 3, "cardinalities": [3, 4], "num_classes": 3,
                       "hidden_dims": [8], "embed_dim": 2, "dropout": 0.0})
    ft = build_model({"family": "ft_transformer", "num_numeric": 3, "cardinalities": [3, 4], "num_classes": 3,
                      "d_model": 8, "num_blocks": 1, "num_heads": 2, "ffn_mult": 2.0, "dropout": 0.0})
    for model in (mlp, ft):
        assert list(model.buffers()) and not needs_buffer_broadcast(model)
    assert needs_buffer_broadcast(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    assert not needs_buffer_broadcast(nn.Linear(3, 3))


def test_pipeline_estimate_uses_the_heaviest_stage_not_an_even_split():
    """Stages split at whole blocks: the budget check counts the heaviest stage (what fits.py measures)."""
    import torch

    from raysys.models import build_model
    from raysys.parallel.pipeline import stage_sizes
    from raysys.train.trainer import teacher_size

    spec = {"family": "ft_transformer", "num_numeric": 3, "cardinalities": [3, 4], "num_classes": 3, "d_model": 16,
            "num_blocks": 3, "num_heads": 2, "ffn_mult": 2.0, "dropout": 0.0}
    with torch.device("meta"):
        sizes = stage_sizes(build_model(spec), 2)
    total = sum(p.numel() for p in build_model(spec).parameters())
    assert sum(sizes) == total and max(sizes) > -(-total // 2)  # 3 blocks over 2 stages cannot be even
    n, _, stage = teacher_size(spec, pp=2)
    assert (n, stage) == (total, max(sizes)) and teacher_size(spec)[2] == 0
    dims = ParallelDims(dp=1, pp=2, world_size=2)
    ideal = estimate_rank_bytes(total, "pipeline", dims)
    real = estimate_rank_bytes(total, "pipeline", dims, largest_stage_params=stage)
    assert ideal.total_bytes == 16 * -(-total // 2) and real.total_bytes == 16 * max(sizes)
    with pytest.raises(ValueError, match="max_worker_memory_gb"):  # fits the even split, not the real one
        check_memory_budget(total, "pipeline", dims, (ideal.total_bytes + real.total_bytes) / 2 / 2**30,
                            largest_stage_params=stage)


def test_prefetch_schedules_run_torchs_compute_order():
    from raysys.parallel.pipeline import compute_order

    assert compute_order("gpipe", 3, 2, 0) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]
    # 1F1B, 4 microbatches on 2 stages: stage 0 warms up with 2 forwards, the last stage with 1
    assert compute_order("1f1b", 4, 2, 0) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3),
                                               ("B", 2), ("B", 3)]
    assert compute_order("1f1b", 4, 2, 1) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2),
                                               ("F", 3), ("B", 3)]
    for sched, m, p in (("gpipe", 8, 4), ("1f1b", 8, 4), ("1f1b", 4, 4)):
        for s in range(p):
            order = compute_order(sched, m, p, s)
            assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
            # every backward comes after its own forward
            assert all(order.index(("F", i)) < order.index(("B", i)) for i in range(m))
