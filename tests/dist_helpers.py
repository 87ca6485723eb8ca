"""Shared pieces of the multi-rank (gloo) tests: one toy data stream that every rank and the
single-process reference draw identically."""

from __future__ import annotations

import torch

NUM_NUMERIC, CARDINALITIES, NUM_CLASSES = 6, (4, 3), 4


def toy_batches(steps: int, batch: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_num [steps, batch, 6], x_cat [steps, batch, 2], y [steps, batch]) from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(steps, batch, NUM_NUMERIC, generator=g)
    x_cat = torch.stack([torch.randint(0, c, (steps, batch), generator=g) for c in CARDINALITIES], -1)
    y = torch.randint(0, NUM_CLASSES, (steps, batch), generator=g)
    return x_num, x_cat, y
