"""The "full" layout (ddp, zero1, one process): whole tensors in safetensors + JSON, written by rank 0.

- `model.safetensors`: the single-device state dict (any DDP `module.` prefix stripped), so the registry,
  distillation and serving load it into a plain model;
- `optimizer.safetensors` (optional): the optimizer's state tree (`raysys.statefile`: every tensor keyed
  by its path, the non-tensor rest as JSON in the header, replaced together);
- `meta.json` (raysys.train.checkpoint.meta), last.

ZeRO-1 first consolidates its partitioned AdamW state onto rank 0 in the plain-AdamW layout, so ddp and
zero1 checkpoints are the same thing. Loading never runs code from the files (no `torch.load`, no pickle).
`restore_full` loads a full checkpoint into any strategy: DDP/ZeRO-1 take it whole, FSDP2 / tensor
parallel ranks keep the slices of their own shards, a pipeline stage its own keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysys.parallel import full_optimizer_state, has_dtensor_params, is_pipeline_stage, rank, unwrap
from raysys.statefile import atomic_write, load_state, save_state
from raysys.train.checkpoint.meta import (
    LAYOUT_FULL,
    MODEL_FILE,
    OPTIMIZER_FILE,
    read_meta,
    weights_only_error,
    write_meta,
)

_DDP_PREFIX = "module."


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-device state dict of `model` (DDP unwrapped, `module.` prefixes stripped), on CPU.

    Tensors are detached, contiguous clones: safetensors refuses non-contiguous tensors and tensors that
    share storage, and the caller may keep training while the file is written.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in unwrap(model).state_dict().items():
        # a state dict taken from a DDP module directly (or one saved by other tools) carries the prefix
        while k.startswith(_DDP_PREFIX):
            k = k[len(_DDP_PREFIX):]
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def write_model_file(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """`model.safetensors` from a whole state dict."""
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write(directory / MODEL_FILE, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))


def save_training_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        *, epoch: int, global_step: int, model_spec: dict[str, Any],
                        metrics: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
                        optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write a full checkpoint of `model` (+ optimizer) from this process into `directory` (created if needed).

    `extra` holds JSON-able caller data (e.g. schema and preprocessor state). `optimizer_state` replaces
    `optimizer.state_dict()` (ZeRO-1's consolidated state).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_model_file(directory, model_state_dict(model))
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    if optimizer_state is not None:
        save_state(directory / OPTIMIZER_FILE, optimizer_state)
    write_meta(directory, layout=LAYOUT_FULL, has_optimizer=optimizer_state is not None, epoch=epoch,
               global_step=global_step, model_spec=model_spec, metrics=metrics, extra=extra)
    return directory


def save_full(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, **meta: Any) -> bool:
    """Collective (ZeRO-1 gathers its state to rank 0); rank 0 writes. Returns True on the rank that wrote."""
    opt_state = full_optimizer_state(optimizer)
    if rank() == 0:
        save_training_state(directory, model, optimizer, optimizer_state=opt_state, **meta)
    return rank() == 0


def _optimizer_state(directory: Path) -> dict[str, Any]:
    path = directory / OPTIMIZER_FILE
    if not path.exists():
        raise weights_only_error(directory)
    return load_state(path)


def load_training_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        *, strict: bool = True) -> dict[str, Any]:
    """Restore a full checkpoint into a whole model (and optimizer, when given) in place; return the meta dict.

    `model` may be DDP-wrapped (weights go into the inner module). The optimizer must have been built
    over the model's parameters in the same order as the one that was saved (ZeRO-1 takes the full state
    and keeps its own partition).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if meta["layout"] != LAYOUT_FULL:
        raise ValueError(f"checkpoint: {str(directory)!r} is {meta['layout']}; load it with restore_checkpoint")
    unwrap(model).load_state_dict(load_file(str(directory / MODEL_FILE), device="cpu"), strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state(directory))
    return meta


def fqn_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A plain `optimizer.state_dict()` (parameters by index, in `model.parameters()` order) keyed by
    parameter name instead, the layout `set_optimizer_state_dict` takes."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def restore_full(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a full checkpoint into `model` (+ `optimizer`) under whatever strategy they use now."""
    if has_dtensor_params(model):
        _load_into_shards(directory, model, optimizer)
    elif is_pipeline_stage(model):
        _load_into_stage(directory, unwrap(model), optimizer)
    else:
        load_training_state(directory, model, optimizer)


def _load_into_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """FSDP2 / tensor parallel: every rank reads the whole file and keeps the slices of its own shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(str(directory / MODEL_FILE), device="cpu"), options=opts)
    if optimizer is not None:
        names = [n for n, _ in model.named_parameters()]
        set_optimizer_state_dict(model, optimizer, fqn_optimizer_state(_optimizer_state(directory), names),
                                 options=opts)


def _load_into_stage(directory: Path, stage: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """A pipeline stage (a subset of the model's keys, under the model's names) from a full checkpoint."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from raysys.models import build_model

    full_model = load_file(str(directory / MODEL_FILE), device="cpu")
    stage.load_state_dict({k: full_model[k] for k in stage.state_dict()})
    if optimizer is None:
        return
    with torch.device("meta"):  # the index order of the saved state
        names = [n for n, _ in build_model(read_meta(directory)["model_spec"]).named_parameters()]
    fqn = fqn_optimizer_state(_optimizer_state(directory), names)
    own = {n for n, _ in stage.named_parameters()}
    groups = [{**g, "params": [n for n in g["params"] if n in own]} for g in fqn["param_groups"]]
    set_optimizer_state_dict(stage, optimizer, {"state": {k: v for k, v in fqn["state"].items() if k in own},
                                                "param_groups": groups})
