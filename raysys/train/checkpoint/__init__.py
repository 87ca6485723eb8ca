"""Training checkpoints: one interface over two on-disk layouts, resumable under another strategy or world size.

    save_checkpoint(directory, model, optimizer, epoch=..., global_step=..., model_spec=...)  # every rank
    meta = restore_checkpoint(directory, model, optimizer)   # either layout into any strategy, any world size
    state = load_model_state(directory)                      # the whole single-device state dict, on CPU

`meta.layout_for` decides the layout from the model alone: "full" (`full.py`: safetensors written by rank
0, no pickle) when ranks hold whole parameters (ddp, zero1, one process), "sharded" (`sharded.py`: DCP,
every rank its shard) when they do not (FSDP2, tensor parallel, a pipeline stage). `meta.json` names the
layout, so loading needs no hint. Every layout's final checkpoint can carry the consolidated
`model.safetensors`, the only file the registry ever takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from raysys.parallel import is_pipeline_stage
from raysys.train.checkpoint.full import (
    load_training_state,
    model_state_dict,
    restore_full,
    save_full,
    save_training_state,
)
from raysys.train.checkpoint.meta import (
    DCP_DIR,
    DCP_METADATA,
    LAYOUT_FULL,
    LAYOUT_SHARDED,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    checkpoint_layout,
    is_checkpoint_dir,
    layout_for,
    read_meta,
    weights_only_error,
)
from raysys.train.checkpoint.sharded import consolidate_model_state, restore_sharded, save_sharded


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int,
                    global_step: int, model_spec: dict[str, Any], metrics: list[dict[str, Any]] | None = None,
                    extra: dict[str, Any] | None = None, export_model: bool = False) -> bool:
    """Write this rank's part of a checkpoint into `directory` (collective: every rank calls it).

    `export_model` also writes the consolidated `model.safetensors` into a sharded checkpoint (a full one
    always has it; a pipeline's stages cannot gather on one rank, so theirs is consolidated from DCP when
    loaded). `directory` may be shared by all ranks or local to each (under Ray Train every rank reports
    its own). Returns True when this rank wrote files there (and so must report them).
    """
    directory = Path(directory)
    meta = dict(epoch=epoch, global_step=global_step, model_spec=model_spec, metrics=metrics, extra=extra)
    if layout_for(model) == LAYOUT_FULL:
        return save_full(directory, model, optimizer, **meta)
    save_sharded(directory, model, optimizer, export_model=export_model and not is_pipeline_stage(model), **meta)
    return True


def restore_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
                       ) -> dict[str, Any]:
    """Load a checkpoint of either layout into `model` (+ `optimizer`), whatever strategy and world size
    they use now; returns the meta dict. Collective when a process group is initialised.

    Call it after `parallelize` and `build_optimizer`. The optimizer must be AdamW over the same
    parameters (in the same order) as the one saved.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if optimizer is not None and not meta["has_optimizer"]:
        raise weights_only_error(directory)
    if meta["layout"] == LAYOUT_FULL:
        restore_full(directory, model, optimizer)
    elif meta["layout"] == LAYOUT_SHARDED:
        restore_sharded(directory, model, optimizer)
    else:
        raise ValueError(f"checkpoint: {str(directory / META_FILE)!r} has unknown layout {meta['layout']!r}")
    return meta


def load_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict stored in a checkpoint directory (CPU tensors); a sharded checkpoint without an
    exported `model.safetensors` is consolidated from its DCP shards in this process."""
    path = Path(directory) / MODEL_FILE
    if path.exists():
        return load_file(str(path), device="cpu")
    if (Path(directory) / DCP_DIR / DCP_METADATA).exists():
        return consolidate_model_state(directory)
    raise FileNotFoundError(f"checkpoint: {str(path)!r} not found; is {str(directory)!r} a checkpoint dir?")


__all__ = ["LAYOUT_FULL", "LAYOUT_SHARDED", "META_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "checkpoint_layout",
           "consolidate_model_state", "is_checkpoint_dir", "layout_for", "load_model_state", "load_training_state",
           "model_state_dict", "read_meta", "restore_checkpoint", "save_checkpoint", "save_training_state"]
