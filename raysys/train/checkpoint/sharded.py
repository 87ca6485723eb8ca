"""The "sharded" layout (zero2, zero3, tensor, pipeline): `torch.distributed.checkpoint` (DCP) under `dcp/`.

Every rank writes its own shard (`__<rank>_0.distcp`, plus `.metadata` from rank 0), keyed by canonical
parameter names (`get_model_state_dict` / `get_optimizer_state_dict`), so DCP can re-slice them for any
other sharding on load: a zero3 run on 4 workers resumes on 2, or as ddp, or in one process. Under Ray
Train each rank writes into its own local directory and reports it; Ray merges the ranks' files into one
checkpoint directory. The final epoch can also export the consolidated `model.safetensors` (gathered to
rank 0) for the registry.

Trust: DCP's `.metadata` (and the `.distcp` headers) are written with `pickle` by torch, so loading a
sharded checkpoint can run code from its files. Checkpoints are trusted internal state: they live in the
run directory this job wrote. The registry, which must be safe to load from anyone, only ever holds the
consolidated safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raysys.parallel import has_dtensor_params, is_zero1, rank, unwrap
from raysys.train.checkpoint.full import write_model_file
from raysys.train.checkpoint.meta import DCP_DIR, LAYOUT_SHARDED, read_meta, write_meta


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, export_model: bool,
                 **meta: Any) -> None:
    """Collective: this rank's DCP shard into `directory/dcp`, rank 0 `meta.json` (and, with `export_model`,
    the consolidated `model.safetensors`). Returns once every rank has written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    (directory / DCP_DIR).mkdir(parents=True, exist_ok=True)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory / DCP_DIR)))
    full = None
    if export_model:
        # gathered to rank 0 only (cpu_offload with full_state_dict leaves the other ranks empty)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        if full is not None:
            write_model_file(directory, full)
        write_meta(directory, layout=LAYOUT_SHARDED, has_optimizer=True, **meta)
    _barrier()  # no rank reports (or returns) before the checkpoint is whole


def restore_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint into `model` (+ `optimizer`), re-sliced for their current sharding."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    target = model if has_dtensor_params(model) else unwrap(model)
    opt = optimizer
    if optimizer is not None and is_zero1(optimizer):
        # get/set_optimizer_state_dict do not understand ZeRO-1: read into a plain AdamW over the same
        # parameters, then hand ZeRO-1 the full state (it keeps its partition)
        opt = torch.optim.AdamW(target.parameters(), **{k: v for k, v in optimizer.param_groups[0].items()
                                                         if k in ("lr", "weight_decay", "betas", "eps")})
    state: dict[str, Any] = {"model": get_model_state_dict(target)}
    if opt is not None:
        state["optim"] = get_optimizer_state_dict(target, opt)
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory / DCP_DIR)))
    set_model_state_dict(target, state["model"])
    if opt is not None:
        set_optimizer_state_dict(target, opt, state["optim"])
        if opt is not optimizer:
            optimizer.load_state_dict(opt.state_dict())


def consolidate_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The whole single-device model state of a sharded checkpoint, read in this process (no process group
    needed). Reads the trusted DCP files (pickle); see the module docstring."""
    import torch.distributed.checkpoint as dcp

    from raysys.models import build_model

    directory = Path(directory)
    model = build_model(read_meta(directory)["model_spec"])
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dcp.load({"model": sd}, storage_reader=dcp.FileSystemReader(str(directory / DCP_DIR)), no_dist=True)
    return sd
