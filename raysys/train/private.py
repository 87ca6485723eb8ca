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
