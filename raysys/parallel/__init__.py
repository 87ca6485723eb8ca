"""All parallelism lives here. No Ray.

    dims = ParallelDims.for_strategy("zero3", world_size=4)          # dp=4
    mesh = dims.build_mesh("cpu")                                     # named DeviceMesh ("dp",)
    cfg = StrategyConfig("zero3", lr=1e-3, weight_decay=1e-4)
    model = parallelize(model, dims, cfg, mesh=mesh)                  # tensor -> pipeline -> FSDP/DDP
    optimizer = build_optimizer(model, cfg, mesh=mesh)                # AdamW, or ZeRO-1's partitioned AdamW

Each strategy is one `apply_<strategy>(model, mesh, cfg)` function that logs one line on rank 0 when it
changes the model: `apply_ddp` (ddp.py), `apply_zero1` (zero.py), `apply_zero2` / `apply_zero3`
(fsdp.py); tensor and pipeline parallelism come from tensor.py / pipeline.py (a pipeline returns its
`PipelineRunner`). On one rank (or without a process group) every strategy is a no-op, so the same loop
runs single-process.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed
from torch import nn

from raysys.parallel.ddp import apply_ddp, rank, unwrap, world_size
from raysys.parallel.dims import DATA_PARALLEL, MODEL_PARALLEL, STRATEGIES, ParallelDims, StrategyConfig
from raysys.parallel.fsdp import apply_zero2, apply_zero3, fsdp_units, is_fsdp
from raysys.parallel.zero import apply_zero1, build_zero1_optimizer, full_optimizer_state, is_zero1

logger = logging.getLogger(__name__)

DATA_PARALLEL_APPLY = {"ddp": apply_ddp, "zero1": apply_zero1, "zero2": apply_zero2, "zero3": apply_zero3}


def _submesh(mesh, name: str):
    return mesh[name] if mesh is not None and name in (mesh.mesh_dim_names or ()) else None


def check_available(dims: ParallelDims, cfg: StrategyConfig | None = None) -> None:
    """ValueError when the degrees ask for a composition that does not work (before any worker starts)."""
    if dims.tp_enabled and dims.dp_enabled and cfg is not None and cfg.data_parallel in ("ddp", "zero1"):
        raise ValueError(f"train.strategy: {cfg.strategy!r} cannot replicate tensor-parallel shards "
                         f"(train.parallel.tp={dims.tp}, dp={dims.dp}); use strategy zero2 or zero3 (FSDP2 over "
                         f"the dp dimension), or 'tensor' (which uses zero3 there)")
    if dims.pp_enabled and dims.dp_enabled and cfg is not None and cfg.data_parallel != "ddp":
        raise ValueError(f"train.strategy: pipeline stages replicate over dp with DDP only (train.parallel.pp="
                         f"{dims.pp}, dp={dims.dp}); use strategy 'pipeline' or 'ddp' with train.parallel.pp > 1")


def apply_tensor(model: nn.Module, mesh, cfg: StrategyConfig) -> nn.Module:
    """Tensor parallelism over mesh["tp"] (raysys/parallel/tensor.py)."""
    from raysys.parallel.tensor import apply_tensor_parallel

    return apply_tensor_parallel(model, _submesh(mesh, "tp"))


def apply_pipeline(model: nn.Module, mesh, cfg: StrategyConfig, *, dp: bool = False):
    """This rank's stage of `model` over mesh["pp"] (raysys/parallel/pipeline.py), DDP-wrapped over the dp
    dimension when `dp`; returns the `PipelineRunner` (its `train_step` replaces the loop's)."""
    from raysys.parallel.pipeline import apply_pipeline_parallel

    dp_wrap = (lambda stage: apply_ddp(stage, mesh, cfg, label="DDP (per pipeline stage)")) if dp else None
    return apply_pipeline_parallel(model, mesh, cfg, dp_wrap=dp_wrap)


def pipeline_runner(model):
    """The `PipelineRunner` when `parallelize` split the model into pipeline stages, else None."""
    return model if getattr(model, "stage_module", None) is not None and hasattr(model, "train_step") else None


def is_pipeline_stage(model: nn.Module) -> bool:
    """True when `model` (or the module DDP wraps) is one pipeline stage: it holds a subset of the model's keys."""
    from raysys.parallel.pipeline import PipelineStageModule

    return isinstance(unwrap(model), PipelineStageModule)


@torch.no_grad()
def _sync_replicated(model: nn.Module, group) -> None:
    # tensor parallelism scatters rank 0's shards of the layers it splits, but leaves the others
    # (embeddings, head, norms) as they were on each rank: make those rank 0's too. They then stay equal,
    # because every tp rank runs the same rows and gets the same gradients for them.
    from torch.distributed.tensor import DTensor

    src = torch.distributed.get_global_rank(group, 0)
    for t in list(model.parameters()) + list(model.buffers()):
        if not isinstance(t, DTensor):
            torch.distributed.broadcast(t.data, src=src, group=group)


def parallelize(model: nn.Module, dims: ParallelDims | str, cfg: StrategyConfig | None = None, *, mesh=None,
                device_type: str = "cpu") -> nn.Module:
    """Apply, in this fixed order, tensor parallelism (tp > 1), the pipeline split (pp > 1), then the
    data-parallel flavour of `cfg.strategy` over dp (DDP, ZeRO-1's DDP, FSDP2 for ZeRO-2/3).

    With pp > 1 the result is this rank's `PipelineRunner` (see `pipeline_runner`), not a module: its
    `train_step` / `eval_logits` drive the schedule, `stage_module` holds the stage's parameters.

    `dims` may be a strategy name (then dp = world size). `mesh` defaults to `dims.build_mesh(device_type)`;
    pass the same mesh to `build_optimizer`. FSDP2 shards the model in place; DDP returns a wrapper
    (use `unwrap` for the single-device module).
    """
    if isinstance(dims, str):
        if dims not in STRATEGIES:
            raise ValueError(f"train.strategy: unknown strategy {dims!r}; choose one of {list(STRATEGIES)}")
        cfg = cfg or StrategyConfig(dims)
        dims = ParallelDims.for_strategy(dims, world_size())
    cfg = cfg or StrategyConfig("ddp")
    if dims.world_size <= 1 and world_size() <= 1:
        return model
    check_available(dims, cfg)
    if mesh is None:
        mesh = dims.build_mesh(device_type)
    if dims.tp_enabled:
        model = apply_tensor(model, mesh, cfg)
        _sync_replicated(model, mesh["tp"].get_group())
    if dims.pp_enabled:
        # the pipeline wraps each stage in DDP itself (the schedule syncs gradients once per step)
        return apply_pipeline(model, mesh, cfg, dp=dims.dp_enabled)
    if dims.dp_enabled:
        model = DATA_PARALLEL_APPLY[cfg.data_parallel](model, mesh, cfg)
    return model


def has_dtensor_params(model: nn.Module) -> bool:
    """True when parameters are DTensors (FSDP2 shards, tensor-parallel shards): forwards then run
    collectives, and checkpoints are sharded."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap(model).parameters())


def build_optimizer(model: nn.Module, cfg: StrategyConfig, *, mesh=None) -> torch.optim.Optimizer:
    """AdamW over the (parallelized) model's parameters; for ZeRO-1, `ZeroRedundancyOptimizer` partitioning
    the AdamW state over the dp ranks. Build it after `parallelize` (FSDP2 replaces parameters by shards)."""
    runner = pipeline_runner(model)
    if runner is not None:
        model = runner.stage_module
    if cfg.data_parallel == "zero1":
        return build_zero1_optimizer(model, mesh, cfg)
    return torch.optim.AdamW(unwrap(model).parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)


__all__ = ["DATA_PARALLEL", "MODEL_PARALLEL", "STRATEGIES", "ParallelDims", "StrategyConfig", "apply_ddp",
           "apply_pipeline", "apply_tensor", "apply_zero1", "apply_zero2", "apply_zero3", "build_optimizer",
           "check_available", "fsdp_units", "full_optimizer_state", "has_dtensor_params", "is_fsdp",
           "is_pipeline_stage", "is_zero1", "parallelize", "pipeline_runner", "rank", "unwrap", "world_size"]
