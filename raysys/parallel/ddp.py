"""Data parallelism: torch DistributedDataParallel over whatever process group is initialised.

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


def apply_ddp(model: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap `model` in DDP when a process group with more than one rank is initialised.

    On one rank (or with no process group) the model comes back unchanged, so the same training code
    runs single-process. DDP broadcasts rank 0's parameters at construction, so every rank starts from
    the same weights even if they were seeded differently, and averages gradients in backward: each
    rank's loss must be a mean over its own (equal-sized) share of the global batch.
    """
    n = world_size()
    if n <= 1:
        return model
    if isinstance(model, DistributedDataParallel):
        return model
    # CPU/gloo here; on GPU the caller moves the model first and DDP uses the parameters' device.
    wrapped = DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)
    if rank() == 0:
        logger.info("parallel: DDP applied over %d ranks (backend %s)", n, dist.get_backend())
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The single-device module inside a DDP wrapper (the model itself when not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
