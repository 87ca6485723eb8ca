"""The loop's Ray-free steps: one optimizer step, evaluation sums, batches shared across tp/pp ranks, seeds.

Torch and raysys.parallel only, so unit tests and the torchrun benchmark peers run them without Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raysys.parallel import has_dtensor_params, unwrap


def to_tensors(x_num: np.ndarray, x_cat: np.ndarray, y: np.ndarray | None = None):
    out = (torch.from_numpy(np.ascontiguousarray(x_num, dtype=np.float32)),
           torch.from_numpy(np.ascontiguousarray(x_cat, dtype=np.int64)))
    if y is None:
        return out
    return (*out, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


def to_device(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The batch's tensors on `device` (as they are on the CPU; pinned-free copies on CUDA)."""
    if device.type == "cpu":
        return tensors
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x_num: torch.Tensor, x_cat: torch.Tensor,
               y: torch.Tensor, amp=contextlib.nullcontext) -> float:
    """One optimizer step on a batch; returns the batch's mean loss. `amp()`: the context of the forward
    (bf16 autocast under mixed precision, raysys.parallel.precision); the backward runs outside it.

    The loss is a mean over this rank's rows, and DDP averages gradients across ranks, so with equal
    shares per rank the update equals a single-process step on the whole global batch.
    """
    model.train()
    with amp():
        loss = F.cross_entropy(model(x_num, x_cat).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def pad_to_common_count(batches: list, model: nn.Module) -> list:
    """FSDP2 all-gathers parameters inside every forward, so every rank must run the same number of them:
    ranks with fewer validation batches add empty ones (a zero-row batch adds nothing to the sums)."""
    count = torch.tensor([len(batches)], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    missing = int(count) - len(batches)
    if not missing:
        return batches
    if batches:
        x_num, x_cat, y = batches[0]
        empty = (x_num[:0], x_cat[:0], y[:0])
    else:
        # no local batch to copy shapes from: ask the model's own input sizes (either family's layout)
        from raysys.parallel.pipeline import example_inputs

        x_num, x_cat = example_inputs(unwrap(model))
        device = next(unwrap(model).parameters()).device  # the rank's GPU when it trains on one
        empty = tuple(t.to(device) for t in (x_num[:0], x_cat[:0], torch.zeros(0, dtype=torch.int64)))
    return batches + [empty] * missing


def _add_sums(sums: tuple[float, int, int], logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    loss_sum, correct, n = sums
    logits = logits.float()  # bf16 under mixed precision: the sums in fp32
    return (loss_sum + float(F.cross_entropy(logits, y, reduction="sum")),
            correct + int((logits.argmax(1) == y).sum()), n + len(y))


@torch.no_grad()
def evaluate_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                  ) -> tuple[float, int, int]:
    """(sum of cross-entropy, correct predictions, rows) over `batches`, for all-reducing."""
    # no DDP hooks or collectives in evaluation: ranks may hold different row counts (a sharded model
    # cannot avoid collectives, so there every rank runs as many forwards as the busiest one)
    model = unwrap(model)
    if dist.is_initialized() and has_dtensor_params(model):
        batches = pad_to_common_count(list(batches), model)
    model.eval()
    sums = (0.0, 0, 0)
    for x_num, x_cat, y in batches:
        sums = _add_sums(sums, model(x_num, x_cat), y)
    return sums


@torch.no_grad()
def pipeline_eval_sums(runner, batches) -> tuple[float, int, int]:
    """`evaluate_sums` through a pipeline: every stage runs each batch, the last one scores it."""
    sums = (0.0, 0, 0)
    for x_num, x_cat, y in batches:
        logits = runner.eval_logits(x_num, x_cat)
        if logits is not None:
            sums = _add_sums(sums, logits, y)
    return sums


def gather_batch(group, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The concatenation of every group member's batch, on each of them (dim 0, in rank order).

    Tensor-parallel ranks must all run the same rows (their Linear shards combine partial results of one
    input), but Ray Data hands every worker its own shard: each tp rank contributes its batch and all
    run the union, so no row is dropped and the global batch stays dp x tp x local rows.
    """
    n = torch.tensor([tensors[0].shape[0]], dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    sizes_ = [int(x) for x in sizes]
    top = max(sizes_)
    out = []
    for t in tensors:
        padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in sizes_]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([p[:k] for p, k in zip(parts, sizes_)]))
    return tuple(out)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def per_worker_batch_size(global_batch: int, world: int) -> int:
    if global_batch < world:
        raise ValueError(f"train.batch_size ({global_batch}) must be at least train.num_workers ({world})")
    return global_batch // world
