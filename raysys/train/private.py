"""DP-SGD in the teacher loop (`train.dp`, data parallel only): the model under Opacus's per-sample gradient hooks
and each rank's Poisson batches. Ray-free (torch.distributed and raysys.trust.dp).

Every step each rank draws each row of its in-memory shard with probability q = train.batch_size / (training rows
of all ranks), so the union over ranks is a Poisson sample of the whole split, which is what the RDP accounting
assumes (Opacus's DistributedUniformWithReplacementSampler does the same); one epoch is round(rows / batch) steps.
Each rank clips its rows' gradients; rank 0 adds the noise once; the sums are all-reduced and divided by the
expected global batch. The seeds per (run seed, epoch, rank) make a resumed run draw the same batches, and the
accounting is recomputed from the global step, so it survives restarts too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raysys.config import TrainConfig
from raysys.train.shard import ShardCache


def private_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, world: int):
    """(what runs the batches, the DP-SGD optimizer) for `model` and its `optimizer` (built over it)."""
    from raysys.trust.dp import private_training

    return private_training(model, optimizer, train.dp, expected_batch_size=train.batch_size / world,
                            distributed=world > 1)


def private_settings(train: TrainConfig) -> dict[str, Any] | None:
    """What the accounting of a run's steps rests on (saved in each checkpoint): DP-SGD's settings and the batch
    size (with the rows, the sampling rate). None without DP-SGD."""
    return None if train.dp is None else {**train.dp.model_dump(), "batch_size": train.batch_size}


def check_resumable_privacy(saved: dict[str, Any] | None, train: TrainConfig, path: str) -> None:
    """ValueError when resuming from the checkpoint at `path` would make the reported epsilon untrue: epsilon is
    recomputed from the step count at the current settings, so the steps already taken must have run under the
    same ones (a run without DP-SGD, or a sharded strategy's, has none)."""
    now = private_settings(train)
    if now is None or saved == now:
        return
    was = "without DP-SGD" if saved is None else f"with DP-SGD settings {saved}"
    raise ValueError(f"train.dp: cannot resume from {path}: its epochs were trained {was}, and the epsilon of the "
                     f"resumed run counts every step at the current settings {now}; resume with the same train.dp "
                     "and train.batch_size, or train from scratch (resume=False or another run_name)")


class PoissonBatches:
    """One rank's DP-SGD batches over its whole shard (read into memory once; collective: sums the row counts)."""

    def __init__(self, shard: ShardCache, train: TrainConfig, world: int):
        self.shard, self.dp, self.rows = shard, train.dp, shard.load("train.dp")
        total = torch.tensor([self.rows], dtype=torch.int64)
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self.total = int(total)
        if train.batch_size > self.total:
            raise ValueError(f"train.batch_size ({train.batch_size}) is above the {self.total} training rows: "
                             "DP-SGD samples each row with probability batch_size / rows; lower train.batch_size")
        from raysys.trust.dp import steps_per_epoch

        self.rate, self.steps = train.batch_size / self.total, steps_per_epoch(self.total, train.batch_size)

    def batches(self, seed: int) -> Iterator[dict[str, np.ndarray]]:
        from raysys.trust.dp import poisson_rows

        rng = np.random.default_rng(seed)
        for _ in range(self.steps):
            yield self.shard.take(poisson_rows(self.rows, self.rate, rng))

    def accounting(self, steps: int, epochs: int) -> dict[str, Any]:
        from raysys.trust.dp import dp_accounting

        return dp_accounting(self.dp, sample_rate=self.rate, steps=steps, epochs=epochs)
