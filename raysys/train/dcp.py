"""Checkpoints for every strategy, resumable under another world size or strategy.

Two layouts, named by `layout` in `meta.json` (see raysys.train.checkpoint):

- **full** (ddp, zero1): rank 0 writes `model.safetensors` + `optimizer.safetensors` (no pickle). ZeRO-1
  first consolidates its partitioned AdamW state onto rank 0, in the plain-AdamW layout, so ddp and zero1
  checkpoints are the same thing.
- **sharded** (zero2, zero3): every rank writes its own shard with `torch.distributed.checkpoint` (DCP)
  under `dcp/`: `__<rank>_0.distcp` files plus a `.metadata` file from rank 0, keyed by canonical
  parameter names (`get_model_state_dict` / `get_optimizer_state_dict`), so DCP can re-slice them for any
  other sharding on load. Under Ray Train each rank writes into its own local directory and reports it;
  Ray merges the ranks' files into one checkpoint directory. The final epoch also exports the
  consolidated `model.safetensors` (gathered to rank 0) for the registry.

`restore_checkpoint` loads either layout into any strategy: full -> FSDP broadcasts nothing (every rank
reads the file and keeps its shard), sharded -> DDP/ZeRO-1 or one process reads the whole tensors out of
the shards. So a zero3 run on 4 workers resumes on 2 workers, or as ddp, or in one process.

Trust: DCP's `.metadata` (and the `.distcp` headers) are written with `pickle` by torch, so loading a
sharded checkpoint can run code from its files. Checkpoints are trusted internal state: they live in the
run directory this job wrote. The registry, which is shared and must be safe to load from anyone, only
ever holds the consolidated safetensors export (`TeacherResult.state_dict()` / `export_safetensors`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raysys.parallel import full_optimizer_state, has_dtensor_params, is_zero1, rank, unwrap
from raysys.statefile import atomic_write
from raysys.train.checkpoint import (
    DCP_DIR,
    DCP_METADATA,
    LAYOUT_FULL,
    LAYOUT_SHARDED,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    load_optimizer_state,
    read_meta,
    save_training_state,
)

logger = logging.getLogger(__name__)


def checkpoint_layout(directory: str | Path) -> str:
    """"full" or "sharded" (meta.json's `layout`; checkpoints from before it existed are full)."""
    meta = read_meta(directory)
    return meta.get("layout", LAYOUT_FULL)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int,
                    global_step: int, model_spec: dict[str, Any], metrics: list[dict[str, Any]] | None = None,
                    extra: dict[str, Any] | None = None, export_model: bool = False,
                    sharded: bool | None = None) -> bool:
    """Write this rank's part of a checkpoint into `directory` (collective: every rank calls it).

    Sharded layout when parameters are DTensors (FSDP2 and/or tensor parallel) or `sharded` (a pipeline
    stage: `model` holds only this stage's keys), full otherwise. `export_model` additionally writes the
    consolidated `model.safetensors` for a sharded checkpoint (a full one always has it). `directory` may
    be shared by all ranks or local to each (under Ray Train every rank reports its own directory).
    Returns True when this rank wrote files there (and so must report them).
    """
    directory = Path(directory)
    meta_kw = dict(epoch=epoch, global_step=global_step, model_spec=model_spec, metrics=metrics, extra=extra)
    if sharded is None:
        sharded = has_dtensor_params(model)
    if not sharded:
        opt_state = full_optimizer_state(optimizer)  # collective for ZeRO-1
        if rank() == 0:
            save_training_state(directory, model, optimizer, optimizer_state=opt_state, layout=LAYOUT_FULL,
                                **meta_kw)
        return rank() == 0

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
        save_training_state(directory, None, optimizer, model_state=full, layout=LAYOUT_SHARDED, **meta_kw)
    _barrier()  # no rank reports (or returns) before the checkpoint is whole
    return True


def fqn_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A plain `optimizer.state_dict()` (parameters by index, in `model.parameters()` order) keyed by
    parameter name instead, the layout `set_optimizer_state_dict` takes."""
    groups = []
    for g in state["param_groups"]:
        groups.append({**g, "params": [names[i] for i in g["params"]]})
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def restore_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
                       ) -> dict[str, Any]:
    """Load a checkpoint of either layout into `model` (+ `optimizer`), whatever strategy and world size
    they use now; returns the meta dict. Collective when a process group is initialised.

    Call it after `parallelize` and `build_optimizer`. The optimizer must be AdamW over the same
    parameters (in the same order) as the one saved.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    layout = meta.get("layout", LAYOUT_FULL)
    if optimizer is not None and not meta.get("has_optimizer", True):
        raise FileNotFoundError(f"checkpoint: {str(directory / OPTIMIZER_FILE)!r} not found; this checkpoint holds "
                                f"weights only")
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if layout == LAYOUT_FULL:
        from safetensors.torch import load_file

        full_model = load_file(str(directory / MODEL_FILE), device="cpu")
        full_opt = load_optimizer_state(directory / OPTIMIZER_FILE) if optimizer is not None else None
        if has_dtensor_params(model):
            # every rank holds the whole file and keeps the slice of its own shards
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, full_model, options=opts)
            if optimizer is not None:
                names = [n for n, _ in model.named_parameters()]
                set_optimizer_state_dict(model, optimizer, fqn_optimizer_state(full_opt, names), options=opts)
        elif set(unwrap(model).state_dict()) < set(full_model):
            _load_full_into_stage(unwrap(model), optimizer, full_model, full_opt, meta["model_spec"])
        else:
            unwrap(model).load_state_dict(full_model)
            if optimizer is not None:
                optimizer.load_state_dict(full_opt)  # ZeRO-1 keeps its own partition of the full state
        return meta

    if layout != LAYOUT_SHARDED:
        raise ValueError(f"checkpoint: {str(directory / META_FILE)!r} has unknown layout {layout!r}")
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(directory / DCP_DIR))
    target = model if has_dtensor_params(model) else unwrap(model)
    opt = optimizer
    if optimizer is not None and is_zero1(optimizer):
        # ZeRO-1 is not understood by get/set_optimizer_state_dict: read into a plain AdamW over the same
        # parameters, then hand ZeRO-1 the full state (it keeps its partition)
        opt = torch.optim.AdamW(target.parameters(), **{k: v for k, v in optimizer.param_groups[0].items()
                                                         if k in ("lr", "weight_decay", "betas", "eps")})
    state: dict[str, Any] = {"model": get_model_state_dict(target)}
    if opt is not None:
        state["optim"] = get_optimizer_state_dict(target, opt)
    dcp.load(state, storage_reader=reader)
    set_model_state_dict(target, state["model"])
    if opt is not None:
        set_optimizer_state_dict(target, opt, state["optim"])
        if opt is not optimizer:
            optimizer.load_state_dict(opt.state_dict())
    return meta


def _load_full_into_stage(stage: nn.Module, optimizer, full_model: dict[str, torch.Tensor],
                          full_opt: dict[str, Any] | None, spec: dict[str, Any]) -> None:
    """A pipeline stage (a subset of the model's keys, under the model's names) from a full checkpoint."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from raysys.models import build_model

    stage.load_state_dict({k: full_model[k] for k in stage.state_dict()})
    if optimizer is None:
        return
    with torch.device("meta"):
        names = [n for n, _ in build_model(spec).named_parameters()]  # the index order of the saved state
    fqn = fqn_optimizer_state(full_opt, names)
    own = {n for n, _ in stage.named_parameters()}
    groups = [{**g, "params": [n for n in g["params"] if n in own]} for g in fqn["param_groups"]]
    set_optimizer_state_dict(stage, optimizer, {"state": {k: v for k, v in fqn["state"].items() if k in own},
                                                "param_groups": groups})


def consolidate_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The whole single-device model state of a sharded checkpoint, read in this process (no process group
    needed). Reads the trusted DCP files (pickle); see the module docstring."""
    import torch.distributed.checkpoint as dcp

    from raysys.models import build_model

    directory = Path(directory)
    meta = read_meta(directory)
    model = build_model(meta["model_spec"])
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dcp.load({"model": sd}, storage_reader=dcp.FileSystemReader(str(directory / DCP_DIR)), no_dist=True)
    return sd


def export_safetensors(directory: str | Path, out: str | Path | None = None) -> Path:
    """Write the consolidated `model.safetensors` of a checkpoint (default: into the checkpoint itself)
    and return its path; the registry stores this file, never the DCP shards."""
    from safetensors.torch import save_file

    directory = Path(directory)
    out = Path(out) if out is not None else directory / MODEL_FILE
    if out.exists() and out == directory / MODEL_FILE:
        return out
    sd = {k: v.contiguous() for k, v in consolidate_model_state(directory).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    return out


def describe(directory: str | Path) -> dict[str, Any]:
    """Layout, epoch, world size and files of a checkpoint (for logs and `raysys` output)."""
    directory = Path(directory)
    meta = read_meta(directory)
    files = sorted(p.name for p in (directory / DCP_DIR).iterdir()) if (directory / DCP_DIR).exists() else []
    return {"layout": meta.get("layout", LAYOUT_FULL), "epoch": meta["epoch"],
            "world_size": meta.get("extra", {}).get("world_size"), "strategy": meta.get("extra", {}).get("strategy"),
            "dcp_files": files, "has_metadata": DCP_METADATA in files,
            "has_model_safetensors": (directory / MODEL_FILE).exists(), "format": meta["format"]}
