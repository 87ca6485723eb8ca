"""Data parallelism: torch DistributedDataParallel over the mesh's `dp` process group.

No Ray here: Ray Train (or torchrun, or a test's `torch.multiprocessing` ranks) initialises the
process group; this module only wraps the model.
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


def world_size() -> int:
    """Ranks in the default process group (1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default process group (0 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def dp_group(mesh) -> dist.ProcessGroup | None:
    """The data-parallel process group of `mesh` (its `dp` dimension); None means the default group."""
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    return (mesh["dp"] if "dp" in names and len(names) > 1 else mesh).get_group()


def dp_size(mesh) -> int:
    if mesh is None:
        return world_size()
    names = mesh.mesh_dim_names or ()
    return (mesh["dp"] if "dp" in names and len(names) > 1 else mesh).size()


def needs_buffer_broadcast(model: nn.Module) -> bool:
    """Whether DDP must keep buffers in sync every forward: some buffer can change in training (floating
    point, e.g. BatchNorm running statistics). Integer buffers (index offsets, counters derived from the
    spec) are identical on every rank once built and never need it."""
    return any(b.is_floating_point() or b.is_complex() for b in model.buffers())


def apply_ddp(model: nn.Module, mesh=None, cfg=None, *, find_unused_parameters: bool = False,
              label: str = "DDP") -> nn.Module:
    """Wrap `model` in DDP over the mesh's dp group when it has more than one rank.

    On one rank (or with no process group) the model comes back unchanged, so the same training code
    runs single-process. DDP broadcasts rank 0's parameters at construction, so every rank starts from
    the same weights even if they were seeded differently, and averages gradients in backward: each
    rank's loss must be a mean over its own (equal-sized) share of the global batch.
    """
    n = dp_size(mesh)
    if n <= 1 or isinstance(model, DistributedDataParallel):
        return model
    # CPU/gloo here; on GPU the caller moves the model first and DDP uses the parameters' device.
    # DDP re-broadcasts rank 0's buffers before EVERY forward (one more collective per step: ~14% of a
    # demo-teacher step on 2 gloo ranks, py-spy). Our teachers' only buffers are constant integer index
    # offsets, equal on every rank by construction: broadcast only buffers training can change. (torch 2.13's
    # forward_sync_buffers, which replaces broadcast_buffers, still syncs buffers once at construction.)
    wrapped = DistributedDataParallel(model, process_group=dp_group(mesh),
                                      find_unused_parameters=find_unused_parameters,
                                      forward_sync_buffers=needs_buffer_broadcast(model))
    if rank() == 0:
        logger.info("parallel: %s applied over %d ranks (backend %s)", label, n, dist.get_backend())
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The single-device module inside a DDP wrapper (the model itself when not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
