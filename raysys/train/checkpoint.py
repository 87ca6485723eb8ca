"""Training-state checkpoints: the "full" layout (safetensors + JSON, no pickle) and the meta file of both.

The "full" layout (ddp, zero1; `layout: "full"` in meta.json) is written here by rank 0. The "sharded"
layout (zero2, zero3) keeps its tensors in a DCP directory `dcp/` written by every rank (see
raysys.train.dcp, which also restores either layout into any strategy) plus the same `meta.json`, and
its final checkpoint also carries the consolidated `model.safetensors`.

A full checkpoint directory holds

- `model.safetensors`: the single-device state dict (any DDP `module.` prefix stripped), so the
  registry, distillation and serving can load it into a plain model;
- `optimizer.safetensors` (optional): every tensor of `optimizer.state_dict()` keyed by its path
  (`state.3.exp_avg`), with the non-tensor rest (param_groups hyperparameters, int step counts) as a
  JSON tree in the file's header metadata, so tensors and the structure that refers to them are
  replaced together;
- `meta.json`: epoch, global step, model spec, per-epoch metrics history and caller extras.

Loading a full checkpoint never runs code from the files (no `torch.load`, no pickle); DCP's sharded
files are pickled by torch and are trusted internal state (raysys.train.dcp). Each file is written to a temporary
name and `os.replace`d into place, and `meta.json` is written last: a directory with a `meta.json` is
complete, which is what `is_checkpoint_dir` checks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysys.parallel import unwrap
from raysys.statefile import atomic_write, load_state, save_state

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
FORMAT = "raysys.train.checkpoint/1"
# `layout` in meta.json: "full" = model.safetensors + optimizer.safetensors written by rank 0 (ddp, zero1);
# "sharded" = a DCP checkpoint under dcp/ written by every rank (zero2, zero3), see raysys.train.dcp
LAYOUT_FULL, LAYOUT_SHARDED = "full", "sharded"
DCP_DIR = "dcp"
DCP_METADATA = ".metadata"
_DDP_PREFIX = "module."


# ----------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------
def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-device state dict of `model` (DDP unwrapped, `module.` prefixes stripped), on CPU.

    Tensors are detached, contiguous clones: safetensors refuses non-contiguous tensors and tensors that
    share storage, and the caller may keep training while the file is written.
    """
    sd = unwrap(model).state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        # a state dict taken from a DDP module directly (or one saved by other tools) carries the prefix
        while k.startswith(_DDP_PREFIX):
            k = k[len(_DDP_PREFIX):]
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def load_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict stored in a checkpoint directory (CPU tensors).

    A sharded (DCP) checkpoint without an exported `model.safetensors` is consolidated in this process
    (see `raysys.train.dcp.consolidate_model_state`)."""
    path = Path(directory) / MODEL_FILE
    if not path.exists():
        if (Path(directory) / DCP_DIR / DCP_METADATA).exists():
            from raysys.train.dcp import consolidate_model_state

            return consolidate_model_state(directory)
        raise FileNotFoundError(f"checkpoint: {str(path)!r} not found; is {str(directory)!r} a checkpoint dir?")
    return load_file(str(path), device="cpu")


# ----------------------------------------------------------------------------------------------------
# optimizer: tensors <-> safetensors, the rest <-> a JSON tree (raysys.statefile)
# ----------------------------------------------------------------------------------------------------
def save_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer | dict[str, Any]) -> None:
    save_state(path, optimizer if isinstance(optimizer, dict) else optimizer.state_dict())


def load_optimizer_state(path: str | Path) -> dict[str, Any]:
    return load_state(path)


# ----------------------------------------------------------------------------------------------------
# whole training state
# ----------------------------------------------------------------------------------------------------
def save_training_state(directory: str | Path, model: nn.Module | None, optimizer: torch.optim.Optimizer | None = None,
                        *, epoch: int, global_step: int, model_spec: dict[str, Any],
                        metrics: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
                        optimizer_state: dict[str, Any] | None = None, layout: str = LAYOUT_FULL,
                        model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model (+ optimizer) state and `meta.json` into `directory` (created if needed).

    `epoch` is the last completed epoch (0-based); a run resumed from this checkpoint starts at
    `epoch + 1`. `extra` holds JSON-able caller data (e.g. schema and preprocessor state).
    `optimizer_state` replaces `optimizer.state_dict()` (ZeRO-1's consolidated state) and `model_state`
    the model's state dict (one already gathered from shards); with `model=None` and no `model_state` only
    `meta.json` is written (a sharded checkpoint, whose tensors DCP wrote under `dcp/`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model is not None or model_state is not None:
        sd = model_state_dict(model) if model_state is None else {
            k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
        atomic_write(directory / MODEL_FILE, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    if optimizer_state is None and optimizer is not None and layout == LAYOUT_FULL:
        optimizer_state = optimizer.state_dict()
    if optimizer_state is not None:
        save_optimizer_state(directory / OPTIMIZER_FILE, optimizer_state)
    meta = {
        "format": FORMAT,
        "layout": layout,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "model_spec": model_spec,
        "metrics": list(metrics or []),
        "has_optimizer": optimizer_state is not None or (layout == LAYOUT_SHARDED and optimizer is not None),
        "saved_unix": time.time(),
        "extra": extra or {},
    }
    text = json.dumps(meta, indent=2)
    # meta.json last: its presence marks a complete checkpoint
    atomic_write(directory / META_FILE, lambda tmp: tmp.write_text(text))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {str(path)!r} not found; is {str(directory)!r} a checkpoint dir?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {str(path)!r} has format {meta.get('format')!r}; expected {FORMAT!r}")
    return meta


def is_checkpoint_dir(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / META_FILE).exists() and ((d / MODEL_FILE).exists() or (d / DCP_DIR / DCP_METADATA).exists())


def load_training_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        *, strict: bool = True) -> dict[str, Any]:
    """Restore model (and optimizer, when given) from `directory` in place; return the meta dict.

    `model` may be DDP-wrapped (weights go into the inner module). The optimizer must have been built
    over the model's parameters in the same order as the one that was saved.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    unwrap(model).load_state_dict(load_model_state(directory), strict=strict)
    if optimizer is not None:
        opt_path = directory / OPTIMIZER_FILE
        if not opt_path.exists():
            raise FileNotFoundError(f"checkpoint: {str(opt_path)!r} not found; this checkpoint holds weights only")
        optimizer.load_state_dict(load_optimizer_state(opt_path))
    return meta
