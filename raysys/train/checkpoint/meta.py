"""What a checkpoint directory is: its file names, its `meta.json`, and which layout a model is saved in.

`meta.json` is written last (atomically): a directory with one is complete. It names the layout, the last
completed epoch, the global step, the model spec, the metrics history and the caller's JSON extras.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch import nn

from raysys.parallel import has_dtensor_params, is_pipeline_stage
from raysys.statefile import atomic_write

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
FORMAT = "raysys.train.checkpoint/1"
# "full": whole tensors in safetensors, written by rank 0 (raysys.train.checkpoint.full);
# "sharded": a DCP checkpoint under dcp/, every rank writing its shard (raysys.train.checkpoint.sharded)
LAYOUT_FULL, LAYOUT_SHARDED = "full", "sharded"
DCP_DIR = "dcp"
DCP_METADATA = ".metadata"


def layout_for(model: nn.Module) -> str:
    """The layout `model` is saved in: sharded when no single rank holds all of it (DTensor parameters from
    FSDP2 or tensor parallelism, or one pipeline stage), full otherwise (ddp, zero1, one process)."""
    return LAYOUT_SHARDED if has_dtensor_params(model) or is_pipeline_stage(model) else LAYOUT_FULL


def write_meta(directory: Path, *, layout: str, has_optimizer: bool, epoch: int, global_step: int,
               model_spec: dict[str, Any], metrics: list[dict[str, Any]] | None = None,
               extra: dict[str, Any] | None = None) -> None:
    """Write `meta.json`; call it after every other file of the checkpoint is in place.

    `epoch` is the last completed epoch (0-based): a run resumed from this checkpoint starts at `epoch + 1`.
    """
    meta = {
        "format": FORMAT,
        "layout": layout,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "model_spec": model_spec,
        "metrics": list(metrics or []),
        "has_optimizer": has_optimizer,
        "saved_unix": time.time(),
        "extra": extra or {},
    }
    text = json.dumps(meta, indent=2)
    atomic_write(directory / META_FILE, lambda tmp: tmp.write_text(text))


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {str(path)!r} not found; is {str(directory)!r} a checkpoint dir?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {str(path)!r} has format {meta.get('format')!r}; expected {FORMAT!r}")
    return meta


def checkpoint_layout(directory: str | Path) -> str:
    """"full" or "sharded"."""
    return read_meta(directory)["layout"]


def is_checkpoint_dir(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / META_FILE).exists() and ((d / MODEL_FILE).exists() or (d / DCP_DIR / DCP_METADATA).exists())


def weights_only_error(directory: Path) -> FileNotFoundError:
    return FileNotFoundError(f"checkpoint: {str(directory / OPTIMIZER_FILE)!r} not found; this checkpoint holds "
                             f"weights only")
