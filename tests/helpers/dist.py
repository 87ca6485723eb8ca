"""Shared pieces of the multi-rank (gloo) tests: one toy data stream that every rank and the
single-process reference draw identically, and how a rank process ends."""

from __future__ import annotations

import os
import sys
import time
from typing import NoReturn

import pytest
import torch
import torch.multiprocessing as mp

NUM_NUMERIC, CARDINALITIES, NUM_CLASSES = 6, (4, 3), 4


def toy_batches(steps: int, batch: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_num [steps, batch, 6], x_cat [steps, batch, 2], y [steps, batch]) from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(steps, batch, NUM_NUMERIC, generator=g)
    x_cat = torch.stack([torch.randint(0, c, (steps, batch), generator=g) for c in CARDINALITIES], -1)
    y = torch.randint(0, NUM_CLASSES, (steps, batch), generator=g)
    return x_num, x_cat, y


def exit_rank() -> NoReturn:
    """End a spawned rank whose work is done and on disk (call it after `destroy_process_group`), before its
    models are freed: freeing DDP's Reducer at interpreter teardown can deadlock (the main thread joins
    gloo's worker thread while holding the GIL that thread needs); benchmarks/_torchrun_ddp.py ends the
    same way."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, args: tuple, world: int, limit_s: float, what: str) -> None:
    """Run `fn(rank, *args)` on `world` spawned processes and wait for them (a rank's exception is raised here);
    past `limit_s` every rank is killed and the test fails naming `what`."""
    ctx = mp.spawn(fn, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish in {limit_s:.0f} s")
