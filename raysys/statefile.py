"""State trees in safetensors files, without pickle, written atomically.

A state tree is what `optimizer.state_dict()` returns, or any nest of dicts, lists and tuples holding
tensors and JSON values (a training run's resumable state: optimizer, RNG states, epoch). `save_state` puts
every tensor in a safetensors file keyed by its path (`state.3.exp_avg`) and the rest of the tree, which
refers to them, as JSON in the file's header, so tensors and structure are replaced together. Loading
never runs code from the file. Torch only: Ray trial actors import this without the training stack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# the header key of the JSON tree (named after its first use, optimizer state; part of the file format)
TREE_KEY = "raysys.optimizer_tree"


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a state tree into {path: tensor} and a JSON-able tree that refers to them.

    Dicts with int keys (an optimizer's per-parameter `state`), tuples (`betas`) and tensors are tagged so
    that `unflatten_state` rebuilds the exact structure (the one an optimizer's `load_state_dict` expects).
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
                return {"__int_keys__": {str(k): enc(v, f"{path}.{k}") for k, v in obj.items()}}
            raise TypeError(f"state: the dict at {path or '(root)'!r} has keys that are neither all str nor all "
                            f"int: {list(obj)[:5]}")
        if isinstance(obj, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"state: cannot store {type(obj).__name__} at {path!r} without pickle")

    tree = enc(state, "")
    return tensors, tree


def unflatten_state(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    """Inverse of `flatten_state`."""

    def dec(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                key = obj["__tensor__"]
                if key not in tensors:
                    raise ValueError(f"state: tensor {key!r} is missing from the file")
                return tensors[key]
            if set(obj) == {"__int_keys__"}:
                return {int(k): dec(v) for k, v in obj["__int_keys__"].items()}
            if set(obj) == {"__tuple__"}:
                return tuple(dec(v) for v in obj["__tuple__"])
            return {k: dec(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [dec(v) for v in obj]
        return obj

    return dec(tree)


def save_state(path: str | Path, state: Any) -> None:
    """Write a state tree to one safetensors file (atomically)."""
    tensors, tree = flatten_state(state)
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt",
                                                                                 TREE_KEY: json.dumps(tree)}))


def load_state(path: str | Path) -> Any:
    """The state tree `save_state` wrote to `path` (CPU tensors)."""
    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if TREE_KEY not in meta:
        raise ValueError(f"state: {str(path)!r} has no state structure in its header; not written by raysys")
    return unflatten_state(tensors, json.loads(meta[TREE_KEY]))


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write via `write(tmp)` to a temp name beside `path`, then rename over it (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
