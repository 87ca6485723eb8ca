"""Mixed precision, one setting for every strategy. No Ray.

`train.mixed_precision` is "auto" (bf16 on CUDA, fp32 on CPU: the CPU equivalence tests keep their fp32
tolerance), "bf16" or "fp32"; `resolve_precision` turns it into what a rank runs. bf16 means:

- ddp, zero1, tensor and pipeline stages: the forward (and so the backward) under `torch.autocast(device, bf16)`;
  parameters, gradients and AdamW state stay fp32, and DDP all-reduces fp32 gradients;
- zero2/zero3 (FSDP2): `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: each unit's parameters are
  all-gathered and computed in bf16, gradients reduce-scattered in fp32 into the fp32 sharded parameters that
  AdamW steps. The forward then runs without autocast (FSDP2 casts the inputs of each unit itself).

DP-SGD (train.dp) stays in fp32: Opacus computes and clips per-row gradients in the parameters' dtype.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(setting: str, device_type: str, *, dp_sgd: bool = False) -> str:
    """'bf16' or 'fp32' for a rank on `device_type` ('cpu' or 'cuda') under `setting` (train.mixed_precision)."""
    if setting not in PRECISIONS:
        raise ValueError(f"train.mixed_precision: must be one of {list(PRECISIONS)}, got {setting!r}")
    if dp_sgd:
        return "fp32"
    if setting == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return setting


def fsdp_mp_policy(precision: str):
    """FSDP2's MixedPrecisionPolicy for `precision` (None for fp32: FSDP2's default, everything in fp32)."""
    if precision != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def autocast(device_type: str, precision: str):
    """The context a forward runs in: bf16 autocast on `device_type`, or nothing for fp32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
