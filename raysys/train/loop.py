"""The per-worker teacher training loop run by `ray.train.torch.TorchTrainer` (one process per rank).

Ray Train has already initialised the gloo/nccl process group when `train_loop_per_worker` starts. The
loop rebuilds schema, preprocessor and model from plain JSON in `config` (nothing pickled crosses from
the driver but that dict), wraps the model with `raysys.parallel`, and per epoch:

1. trains on this rank's shard of the "train" dataset (per-worker batch = global batch / world size;
   DDP averages gradients, so this is one optimizer step on the global batch);
2. validates on this rank's shard of "validation" and all-reduces the sums, so every rank reports the
   global loss and accuracy (Ray Train splits every dataset with `streaming_split(equal=True)`, which
   drops up to world_size - 1 rows so that DDP ranks run the same number of steps; the same applies
   to validation);
3. calls `ray.train.report` on every rank (it is a barrier), rank 0 alone attaching a checkpoint
   written with `raysys.train.checkpoint` (safetensors + JSON, no pickle).

On a restart (worker failure with `FailureConfig(max_failures)`, or `train_teacher(resume=True)`)
`ray.train.get_checkpoint()` returns the latest reported checkpoint; the loop restores model, optimizer,
step counter and metrics history from it and continues at the next epoch. Each epoch re-seeds torch from
(seed, epoch, rank), so a resumed run draws the same dropout masks and shuffles as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raysys.data.dataset import Preprocessor
from raysys.data.schema import DatasetSchema
from raysys.models import build_model
from raysys.parallel import parallelize, unwrap
from raysys.train.checkpoint import load_training_state, read_meta, save_training_state

logger = logging.getLogger(__name__)

# keys of one epoch's metrics, in report order
METRIC_KEYS = ("epoch", "train_loss", "val_loss", "val_accuracy", "samples_per_s", "elapsed_s", "resumes")


class InjectedFailure(RuntimeError):
    """Raised by the test-only fault injection (`fail_at_epoch` in the loop config)."""


# ----------------------------------------------------------------------------------------------------
# Ray-free pieces (unit-tested on their own)
# ----------------------------------------------------------------------------------------------------
def to_tensors(x_num: np.ndarray, x_cat: np.ndarray, y: np.ndarray | None = None):
    out = (torch.from_numpy(np.ascontiguousarray(x_num, dtype=np.float32)),
           torch.from_numpy(np.ascontiguousarray(x_cat, dtype=np.int64)))
    if y is None:
        return out
    return (*out, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x_num: torch.Tensor, x_cat: torch.Tensor,
               y: torch.Tensor) -> float:
    """One optimizer step on a batch; returns the batch's mean loss.

    The loss is a mean over this rank's rows, and DDP averages gradients across ranks, so with equal
    shares per rank the update equals a single-process step on the whole global batch.
    """
    model.train()
    loss = F.cross_entropy(model(x_num, x_cat), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                  ) -> tuple[float, int, int]:
    """(sum of cross-entropy, correct predictions, rows) over `batches`, for all-reducing."""
    model = unwrap(model)  # no DDP hooks or collectives in evaluation: ranks may hold different row counts
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x_num, x_cat, y in batches:
        logits = model(x_num, x_cat)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return loss_sum, correct, n


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def per_worker_batch_size(global_batch: int, world: int) -> int:
    if global_batch < world:
        raise ValueError(f"train.batch_size ({global_batch}) must be at least train.num_workers ({world})")
    return global_batch // world


def _ensure_log_handler() -> None:
    # Ray worker processes have no logging handlers: without one, rank 0's INFO lines would vanish.
    # Leave the process alone when something (the driver in local mode, a user config) handles them.
    root = logging.getLogger("raysys")
    if not root.hasHandlers():
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)


def _maybe_inject_failure(config: dict[str, Any], epoch: int, rank: int, world: int) -> None:
    """Test-only: the last rank raises at the start of epoch `fail_at_epoch`, once per marker file."""
    fail_at = config.get("fail_at_epoch")
    if fail_at is None or epoch != int(fail_at) or rank != world - 1:
        return
    marker = config.get("fail_marker")
    if marker:
        if Path(marker).exists():
            return
        Path(marker).write_text(f"failed at epoch {epoch} on rank {rank}\n")
    raise InjectedFailure(f"injected failure at epoch {epoch} on rank {rank} (fail_at_epoch in the loop config)")


# ----------------------------------------------------------------------------------------------------
# the Ray Train entry point
# ----------------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """TorchTrainer loop. `config` keys: model_spec, schema, preprocessor (JSON dicts), strategy,
    num_epochs, batch_size (global), lr, weight_decay, seed, threads_per_worker; optional run_name,
    fail_at_epoch + fail_marker (tests only)."""
    import ray.train

    _ensure_log_handler()
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = int(config.get("seed", 0))
    num_epochs = int(config["num_epochs"])
    local_batch = per_worker_batch_size(int(config["batch_size"]), world)
    if rank == 0 and int(config["batch_size"]) % world:
        logger.warning("train.batch_size %d is not divisible by %d workers: the global batch is %d",
                       config["batch_size"], world, local_batch * world)

    schema = DatasetSchema.model_validate(config["schema"])
    pre = Preprocessor.from_dict(schema, config["preprocessor"])
    spec = dict(config["model_spec"])

    torch.manual_seed(seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(config["lr"]),
                                  weight_decay=float(config["weight_decay"]))

    start_epoch, global_step, resumes = 0, 0, 0
    history: list[dict[str, Any]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # every rank loads the same files before DDP wrapping, so optimizer states agree too
        with checkpoint.as_directory() as ckpt_dir:
            saved_spec = read_meta(ckpt_dir)["model_spec"]
            if saved_spec != spec:
                raise ValueError(
                    f"teacher: cannot resume from {checkpoint.path}: it holds a model with spec {saved_spec}, "
                    f"but the config asks for {spec}; train from scratch (resume=False) or use another run_name")
            meta = load_training_state(ckpt_dir, model, optimizer)
        # the config's hyperparameters win over the checkpoint's (equal after a failure; a deliberate
        # resume may change them)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = float(config["lr"]), float(config["weight_decay"])
        start_epoch = int(meta["epoch"]) + 1
        global_step = int(meta["global_step"])
        history = list(meta["metrics"])
        resumes = int(meta["extra"].get("resumes", 0)) + 1
        if rank == 0:
            logger.info("teacher: resumed from %s (epoch %d done, step %d); continuing at epoch %d",
                        checkpoint.path, start_epoch - 1, global_step, start_epoch)

    model = parallelize(model, str(config.get("strategy", "ddp")))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    elapsed_before = float(history[-1]["elapsed_s"]) if history else 0.0
    run_start = time.perf_counter()

    for epoch in range(start_epoch, num_epochs):
        _maybe_inject_failure(config, epoch, rank, world)
        torch.manual_seed(epoch_seed(seed, epoch, rank))
        t0 = time.perf_counter()
        loss_sum, n_train = 0.0, 0
        for batch in train_shard.iter_batches(
                batch_size=local_batch, batch_format="numpy",
                local_shuffle_buffer_size=4 * local_batch, local_shuffle_seed=epoch_seed(seed, epoch, rank)):
            x_num, x_cat, y = to_tensors(*pre.transform_batch(batch))
            loss_sum += train_step(model, optimizer, x_num, x_cat, y) * len(y)
            n_train += len(y)
            global_step += 1
        train_s = time.perf_counter() - t0

        val_batches = (to_tensors(*pre.transform_batch(b))
                       for b in val_shard.iter_batches(batch_size=max(1024, local_batch), batch_format="numpy"))
        val_loss_sum, val_correct, n_val = evaluate_sums(model, val_batches)

        sums = torch.tensor([loss_sum, n_train, val_loss_sum, val_correct, n_val], dtype=torch.float64)
        slowest = torch.tensor([train_s], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        loss_sum, n_train, val_loss_sum, val_correct, n_val = sums.tolist()
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(n_train, 1),
            "val_loss": val_loss_sum / n_val if n_val else math.nan,
            "val_accuracy": val_correct / n_val if n_val else math.nan,
            "samples_per_s": n_train / max(float(slowest), 1e-9),
            "elapsed_s": elapsed_before + (time.perf_counter() - run_start),
            "resumes": resumes,
        }
        history.append(metrics)
        if rank == 0:
            logger.info("teacher epoch %d/%d: train_loss %.4f val_loss %.4f val_accuracy %.4f (%.0f samples/s)",
                        epoch + 1, num_epochs, metrics["train_loss"], metrics["val_loss"],
                        metrics["val_accuracy"], metrics["samples_per_s"])

        with tempfile.TemporaryDirectory(prefix="raysys-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                save_training_state(tmp, model, optimizer, epoch=epoch, global_step=global_step, model_spec=spec,
                                    metrics=history,
                                    extra={"resumes": resumes, "schema": config["schema"],
                                           "preprocessor": config["preprocessor"],
                                           "run_name": config.get("run_name"), "world_size": world})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            # every rank reports (a barrier); the upload is synchronous, so `tmp` may go afterwards
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
