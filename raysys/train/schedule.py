"""Learning-rate schedule and selective weight decay for the teacher loop. Stateless, so resume-safe.

- `lr_at(step, total_steps, base_lr, schedule, warmup_fraction)`: the lr of optimizer step `step` (0-based,
  global over epochs). "cosine": linear warm-up over the first ceil(warmup_fraction x total) steps, then a
  half cosine from `base_lr` down to 0 at `total_steps`; "constant": `base_lr` throughout (no warm-up).
  The loop sets every param group's lr from the global step before each optimizer step, so a resumed run
  (which restores the global step) continues on the same curve with no scheduler state to checkpoint.
- `decoupled_weight_decay(model, optimizer, weight_decay)`: AdamW's decoupled decay applied only to
  weights of >= 2 dimensions that are not embeddings (Linear / attention matrices), as in nanoGPT and
  the FT-Transformer paper; biases, norms, the CLS token and feature embeddings / tokenizer weights are
  not decayed. It runs as a step pre-hook, with the group's current lr, exactly where AdamW multiplies
  parameters by (1 - lr x wd) before its update; the optimizer itself then has weight_decay 0. A hook
  rather than two param groups keeps one group everywhere: ZeRO-1's even flat shard, the DCP
  checkpoints and their reshard across strategies all assume a single group.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

SCHEDULES = ("constant", "cosine")
# modules whose weights are lookup tables / per-feature embeddings, never decayed
EMBEDDING_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
EMBEDDING_NAME_HINTS = ("Embedding", "Tokenizer")


def total_steps(num_rows: int, batch_size: int, num_epochs: int) -> int:
    """Optimizer steps of a run: ceil(rows / global batch) x epochs."""
    if batch_size < 1 or num_epochs < 1:
        raise ValueError(f"total_steps: batch_size ({batch_size}) and num_epochs ({num_epochs}) must be >= 1")
    return max(1, math.ceil(max(num_rows, 0) / batch_size)) * num_epochs


def warmup_steps(total: int, warmup_fraction: float) -> int:
    return math.ceil(warmup_fraction * total) if warmup_fraction > 0 else 0


def lr_at(step: int, total: int, base_lr: float, schedule: str = "cosine", warmup_fraction: float = 0.05) -> float:
    """The learning rate of 0-based optimizer step `step` out of `total`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule: unknown {schedule!r}; choose one of {list(SCHEDULES)}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"train.warmup_fraction: {warmup_fraction} must be in [0, 1)")
    if schedule == "constant":
        return base_lr
    total = max(1, int(total))
    warm = warmup_steps(total, warmup_fraction)
    if step < warm:
        return base_lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, EMBEDDING_MODULES) or any(h in type(module).__name__ for h in EMBEDDING_NAME_HINTS)


def decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters to weight-decay: >= 2-D, trainable, not owned (at any depth) by an embedding/tokenizer."""
    skip: set[int] = set()
    for module in model.modules():
        if _is_embedding(module):
            skip.update(id(p) for p in module.parameters())
    out, seen = [], set()
    for p in model.parameters():
        if id(p) in seen or id(p) in skip or not p.requires_grad or p.ndim < 2:
            continue
        seen.add(id(p))
        out.append(p)
    return out


def decoupled_weight_decay(model: nn.Module, optimizer, weight_decay: float) -> Callable[[], None] | None:
    """Decay `decay_parameters(model)` by (1 - lr x weight_decay) right before every `optimizer.step()`,
    with the lr of the optimizer's first group at that moment (all groups share it). Sets the optimizer's
    own weight_decay to 0. Returns a function removing the hook (None when weight_decay is 0).

    Build it on the parallelized model after `build_optimizer` (FSDP2 replaces parameters by shards;
    decaying a DTensor shard decays just this rank's part, as AdamW would).
    """
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    if not weight_decay:
        return None
    params = decay_parameters(model)

    def hook(*_args, **_kwargs) -> None:
        lr = float(optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            for p in params:
                if p.grad is not None:  # AdamW skips (and so does not decay) parameters without a gradient
                    p.mul_(1.0 - lr * weight_decay)

    handle = optimizer.register_step_pre_hook(hook)
    return handle.remove
