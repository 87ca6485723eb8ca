"""ZeRO-2 / ZeRO-3 with FSDP2 (`torch.distributed.fsdp.fully_shard`) on an explicit `DeviceMesh`.

Each block (a transformer block, or a hidden Linear of the MLP) becomes one FSDP unit, then the root
takes what is left (embeddings, head), as torchtitan does: a unit's parameters are all-gathered just
before its forward and its gradients reduce-scattered right after its backward, so only one unit is
unsharded at a time. Parameters, gradients and AdamW state are all sharded (dim-0, DTensor `Shard(0)`)
at rest. `reshard_after_forward=True` (ZeRO-3) frees each unit's gathered parameters after forward and
gathers them again in backward; `False` (ZeRO-2) keeps them from forward to backward, trading memory for
one all-gather per unit per step.

Uses FSDP2 only: FSDP1 (`FullyShardedDataParallel`) does not work on CPU/gloo with its default
`device_id`, and `ray.train.torch.prepare_model(parallel_strategy="fsdp")` refuses CPU.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from raysys.parallel.ddp import dp_size, rank
from raysys.parallel.precision import fsdp_mp_policy

logger = logging.getLogger(__name__)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks that each become an FSDP unit: `model.blocks` / `model.layers` (transformers), else the
    parameterised layers of `model.body` (the MLP); the root wraps everything else."""
    for name in ("blocks", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
            return list(blocks)
    body = getattr(model, "body", None)
    if isinstance(body, nn.Sequential):
        return [m for m in body if any(True for _ in m.parameters(recurse=False))]
    return []


def _dp_mesh(mesh):
    names = mesh.mesh_dim_names or ()
    return mesh["dp"] if "dp" in names and len(names) > 1 else mesh


def apply_fsdp(model: nn.Module, mesh, cfg=None, *, reshard_after_forward: bool) -> nn.Module:
    """Shard `model` in place over the mesh's dp dimension (per block, then the root); returns it."""
    from torch.distributed.fsdp import fully_shard

    if mesh is None or dp_size(mesh) <= 1:
        return model
    dp_mesh = _dp_mesh(mesh)
    _sync_module_states(model, dp_mesh.get_group())
    units = fsdp_units(model)
    precision = cfg.option("precision", "fp32") if cfg is not None else "fp32"
    extra = {"mp_policy": policy} if (policy := fsdp_mp_policy(precision)) is not None else {}
    for unit in units:
        fully_shard(unit, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, **extra)
    # FSDP2 keeps the root's parameters unsharded after forward anyway (backward needs them at once)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, **extra)
    if rank() == 0:
        logger.info("parallel: %s applied (FSDP2 fully_shard, reshard_after_forward=%s, %s) over %d ranks, "
                    "%d block units + root", "ZeRO-3" if reshard_after_forward else "ZeRO-2",
                    reshard_after_forward, precision, dp_mesh.size(), len(units))
    return model


@torch.no_grad()
def _sync_module_states(model: nn.Module, group) -> None:
    # fully_shard keeps each rank's own slice of its local weights: without this, ranks seeded differently
    # would assemble a model nobody initialised. DDP does the same broadcast at construction.
    src = dist.get_global_rank(group, 0)
    for t in list(model.parameters()) + list(model.buffers()):
        # tensor-parallel DTensors: this rank's shard, the same slice on the dp peers of this tp rank
        local = t.to_local() if hasattr(t, "to_local") else t.data
        dist.broadcast(local.detach(), src=src, group=group)


def apply_zero2(model: nn.Module, mesh, cfg=None) -> nn.Module:
    return apply_fsdp(model, mesh, cfg, reshard_after_forward=False)


def apply_zero3(model: nn.Module, mesh, cfg=None) -> nn.Module:
    return apply_fsdp(model, mesh, cfg, reshard_after_forward=True)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
