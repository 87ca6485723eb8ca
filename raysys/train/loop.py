"""The per-worker teacher training loop run by `ray.train.torch.TorchTrainer` (one process per rank).

Ray Train has already initialised the gloo/nccl process group when `train_loop_per_worker` starts. The
loop rebuilds schema, preprocessor and model from plain JSON in `config` (nothing pickled crosses from
the driver but that dict), builds the `ParallelDims` mesh, applies `train.strategy` with
`raysys.parallel.parallelize` (ddp, zero1, zero2, zero3), builds the matching optimizer
(`build_optimizer`: AdamW, or ZeRO-1's partitioned AdamW) with AdamW's decoupled weight decay moved to a
step pre-hook over >= 2-D non-embedding weights (`raysys.train.schedule`), renices its threads to
`train.worker_niceness` (Ray starts workers at 15), and per epoch:

1. trains on this rank's shard of the "train" dataset (per-worker batch = global batch / world size;
   DDP averages gradients, so this is one optimizer step on the global batch), setting the lr of every
   step from the global step (`train.lr_schedule`: stateless, so a resume continues the curve);
2. validates on this rank's shard of "validation" and all-reduces the sums, so every rank reports the
   global loss and accuracy (Ray Train splits every dataset with `streaming_split(equal=True)`, which
   drops up to world_size - 1 rows so that DDP ranks run the same number of steps; the same applies
   to validation);
3. measures each rank's bytes of params, grads and optimizer state (`raysys.parallel.memory`) and adds
   the max over ranks and the per-rank lists to the metrics (`mem_max_*`, `mem_per_rank_*`);
4. calls `ray.train.report` on every rank (it is a barrier) with a checkpoint from
   `raysys.train.dcp.save_checkpoint`: rank 0 alone for ddp/zero1 (safetensors + JSON, ZeRO-1's state
   consolidated first), every rank its own DCP shard for zero2/zero3 (Ray merges them).

On a restart (worker failure with `FailureConfig(max_failures)`, or `train_teacher(resume=True)`)
`ray.train.get_checkpoint()` returns the latest reported checkpoint; the loop restores model, optimizer,
step counter and metrics history from it (whatever strategy and world size wrote it) and continues at
the next epoch. Each epoch re-seeds torch from
(seed, epoch, rank), so a resumed run draws the same dropout masks and shuffles as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
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
from raysys.parallel import (
    ParallelDims,
    StrategyConfig,
    build_optimizer,
    has_dtensor_params,
    parallelize,
    pipeline_runner,
    unwrap,
)
from raysys.parallel.memory import gather_rank_memory, memory_metrics, rank_memory
from raysys.train.checkpoint import read_meta
from raysys.train.dcp import restore_checkpoint, save_checkpoint
from raysys.train.schedule import decoupled_weight_decay, lr_at, set_lr

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


def _pad_to_common_count(batches: list, model: nn.Module) -> list:
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
        empty = (x_num[:0], x_cat[:0], torch.zeros(0, dtype=torch.int64))
    return batches + [empty] * missing


@torch.no_grad()
def evaluate_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                  ) -> tuple[float, int, int]:
    """(sum of cross-entropy, correct predictions, rows) over `batches`, for all-reducing."""
    # no DDP hooks or collectives in evaluation: ranks may hold different row counts (a sharded model
    # cannot avoid collectives, so there every rank runs as many forwards as the busiest one)
    model = unwrap(model)
    if dist.is_initialized() and has_dtensor_params(model):
        batches = _pad_to_common_count(list(batches), model)
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x_num, x_cat, y in batches:
        logits = model(x_num, x_cat)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return loss_sum, correct, n


class ShardCache:
    """This worker's shard of a split, streamed from Ray Data on the first pass and kept in memory after it
    when it fits in `max_bytes`: later epochs shuffle it in memory (a full permutation per epoch, seeded)
    instead of re-reading it through Ray Data. On small and medium data the per-epoch Ray Data iteration
    (split coordination, the local shuffle buffer) costs as much as the training steps; cached, the loop
    does what a plain torchrun loop does. Larger shards keep streaming (memory stays bounded).
    """

    def __init__(self, shard, max_bytes: float):
        self.shard = shard
        self.max_bytes = max_bytes
        self.cols: dict[str, np.ndarray] | None = None

    @property
    def cached(self) -> bool:
        return self.cols is not None

    @staticmethod
    def _nbytes(batch: dict[str, np.ndarray]) -> int:
        # object arrays (string categories) hold pointers: count ~64 B per Python string
        return sum(v.nbytes if v.dtype != object else 64 * v.size for v in batch.values())

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None):
        if self.cols is not None:
            n = len(next(iter(self.cols.values())))
            order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else None
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
                yield {c: v[idx] for c, v in self.cols.items()}
            return
        kwargs = ({} if shuffle_seed is None else
                  dict(local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=shuffle_seed))
        parts: list[dict[str, np.ndarray]] | None = [] if self.max_bytes > 0 else None
        size = 0
        for batch in self.shard.iter_batches(batch_size=batch_size, batch_format="numpy", **kwargs):
            if parts is not None:
                size += self._nbytes(batch)
                parts = parts + [batch] if size <= self.max_bytes else None
            yield batch
        if parts:
            self.cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


@torch.no_grad()
def _pipeline_eval_sums(runner, batches) -> tuple[float, int, int]:
    """`evaluate_sums` through a pipeline: every stage runs each batch, the last one scores it."""
    loss_sum, correct, n = 0.0, 0, 0
    for x_num, x_cat, y in batches:
        logits = runner.eval_logits(x_num, x_cat)
        if logits is not None:
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return loss_sum, correct, n


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
        padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in sizes_]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([p[:k] for p, k in zip(parts, sizes_)]))
    return tuple(out)


# Ray Train v2's controller collects each worker's `ray.train.report` once per health-check interval and a
# worker's result queue holds one report, so a report waits until the previous one has been taken. The
# driver's value of this variable reaches the controller and the workers (Ray Train's ENV_VARS_TO_PROPAGATE);
# `raysys.train.trainer.report_poll_interval` sets it from `train.report_poll_interval_s`.
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    try:
        return float(value) if value else None
    except ValueError:
        return None


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


class TestHooks:
    """Test-only observation of the workers (`test_dir` in the loop config, from RAYSYS_TRAIN_TEST_DIR):
    each rank writes its PID to `pid-rank<r>` so a test can SIGKILL it, appends one JSON line per epoch
    start and per step to `events-rank<r>.jsonl`, and sleeps `step_delay_s` per step so that a kill lands
    mid-epoch. Off (no files, no sleeps) unless the driver's environment sets the variable."""

    def __init__(self, config: dict[str, Any], rank: int):
        self.dir = Path(config["test_dir"]) if config.get("test_dir") else None
        self.delay = float(config.get("step_delay_s") or 0.0)
        self.rank = rank
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / f"pid-rank{rank}").write_text(str(os.getpid()))

    def event(self, **fields: Any) -> None:
        if self.dir is None:
            return
        with open(self.dir / f"events-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"rank": self.rank, "pid": os.getpid(), "t": time.time(), **fields}) + "\n")

    def step(self, epoch: int, step: int) -> None:
        if self.dir is None:
            return
        self.event(event="step", epoch=epoch, step=step)
        if self.delay:
            time.sleep(self.delay)


def renice_process(niceness: int) -> tuple[int, int]:
    """Set the nice value of every thread of this process (Linux nice values are per thread: the training
    thread, gloo's communication threads, torch's pools). Returns (threads changed, threads refused).

    Why: Ray starts worker processes at nice 15 (`RAY_worker_niceness`) to keep its raylet and GCS
    responsive; a training worker is then the first thing starved on a shared or busy machine, while a
    plain torchrun process runs at 0. Lowering a nice value needs CAP_SYS_NICE (root in most containers);
    without it the threads keep Ray's value and the refusal is counted, not raised.
    """
    changed = refused = 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: one process-wide value
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) != niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
                changed += 1
        except PermissionError:
            refused += 1
        except (OSError, AttributeError):  # a thread that just exited; no setpriority on this platform
            pass
    return changed, refused


def strategy_config(config: dict[str, Any]) -> StrategyConfig:
    return StrategyConfig(str(config.get("strategy", "ddp")), lr=float(config["lr"]),
                          weight_decay=float(config["weight_decay"]),
                          options=(("zero1_partition", str(config.get("zero1_partition", "even"))),
                                   ("pipeline_schedule", str(config.get("pipeline_schedule") or "1f1b")),
                                   *((("num_microbatches", int(config["num_microbatches"])),)
                                     if config.get("num_microbatches") else ())))


def parallel_dims(config: dict[str, Any], world: int) -> ParallelDims:
    p = config.get("parallel") or {}
    return ParallelDims.for_strategy(str(config.get("strategy", "ddp")), world, dp=p.get("dp"), tp=p.get("tp"),
                                     pp=p.get("pp"))


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
    parallel ({dp, tp, pp} or None), zero1_partition, cache_shard_mb, num_epochs, batch_size (global), lr,
    weight_decay, seed, threads_per_worker; optional worker_niceness, lr_schedule ("constant" when absent), warmup_fraction,
    total_steps (the schedule's length, ceil(train rows / batch) x epochs; a schedule without it is
    constant), run_name, fail_at_epoch + fail_marker, test_dir +
    step_delay_s (tests only)."""
    import ray.train

    _ensure_log_handler()
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("worker_niceness") is not None:
        changed, refused = renice_process(int(config["worker_niceness"]))
        if refused and rank == 0:
            logger.warning("teacher: could not set train.worker_niceness=%s on %d threads (needs CAP_SYS_NICE); "
                           "they keep Ray's worker niceness", config["worker_niceness"], refused)
    seed = int(config.get("seed", 0))
    num_epochs = int(config["num_epochs"])
    local_batch = per_worker_batch_size(int(config["batch_size"]), world)
    if rank == 0 and int(config["batch_size"]) % world:
        logger.warning("train.batch_size %d is not divisible by %d workers: the global batch is %d",
                       config["batch_size"], world, local_batch * world)

    schema = DatasetSchema.model_validate(config["schema"])
    pre = Preprocessor.from_dict(schema, config["preprocessor"])
    spec = dict(config["model_spec"])

    hooks = TestHooks(config, rank)
    hooks.event(event="worker_start", world=world)
    scfg = strategy_config(config)
    dims = parallel_dims(config, world)
    mesh = dims.build_mesh(str(config.get("device_type", "cpu")))
    torch.manual_seed(seed)  # same init on every rank (DDP and FSDP also broadcast rank 0's weights)
    model = parallelize(build_model(spec), dims, scfg, mesh=mesh)
    optimizer = build_optimizer(model, scfg, mesh=mesh)
    # pipeline: `model` is this rank's PipelineRunner; its stage module holds the parameters (and the
    # model's own key names, so checkpoints of all stages together are the model's state dict)
    runner = pipeline_runner(model)
    state_module = runner.stage_module if runner is not None else model
    # tensor and pipeline parallel: the tp and pp ranks of one replica run the union of their batches
    # (gather_batch, tp first then pp, so every rank of the replica holds the same rows); a loss counts
    # once per replica: on its last stage, divided by the tp ranks that all computed it
    share_groups = [mesh[d].get_group() for d, on in (("tp", dims.tp_enabled), ("pp", dims.pp_enabled)) if on]
    counts = (1.0 / dims.tp) if runner is None or runner.is_last else 0.0
    # forwards run collectives: equal counts everywhere (a pipeline's gathered batches are equal already)
    lockstep = world > 1 and runner is None and has_dtensor_params(model)

    start_epoch, global_step, resumes = 0, 0, 0
    history: list[dict[str, Any]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # any layout into any strategy and world size (raysys.train.dcp); collective, every rank reads
        with checkpoint.as_directory() as ckpt_dir:
            saved = read_meta(ckpt_dir)
            saved_spec = saved["model_spec"]
            if saved_spec != spec:
                raise ValueError(
                    f"teacher: cannot resume from {checkpoint.path}: it holds a model with spec {saved_spec}, "
                    f"but the config asks for {spec}; train from scratch (resume=False) or use another run_name")
            meta = restore_checkpoint(ckpt_dir, state_module, optimizer)
        # the config's hyperparameters win over the checkpoint's (equal after a failure; a deliberate
        # resume may change them): the lr is set from the schedule before every step, the weight decay
        # by the hook below
        start_epoch = int(meta["epoch"]) + 1
        global_step = int(meta["global_step"])
        history = list(meta["metrics"])
        resumes = int(meta["extra"].get("resumes", 0)) + 1
        if rank == 0:
            was = saved.get("extra", {})
            logger.info("teacher: resumed from %s (epoch %d done, step %d, saved by %s on %s workers); continuing "
                        "at epoch %d as %s on %d workers", checkpoint.path, start_epoch - 1, global_step,
                        was.get("strategy", "ddp"), was.get("world_size", "?"), start_epoch, scfg.strategy, world)
    # AdamW's decay, but only on >= 2-D non-embedding weights (a step pre-hook; the optimizer's own is 0)
    decoupled_weight_decay(unwrap(state_module), optimizer, float(config["weight_decay"]))
    base_lr, schedule = float(config["lr"]), str(config.get("lr_schedule") or "constant")
    warmup = float(config.get("warmup_fraction") or 0.0)
    steps_total = int(config.get("total_steps") or 0)
    if schedule != "constant" and steps_total < 1:
        if rank == 0:
            logger.warning("teacher: lr_schedule %r needs total_steps in the loop config; using a constant lr", schedule)
        schedule = "constant"
    cache_bytes = float(config.get("cache_shard_mb", 512)) * 2**20
    train_shard = ShardCache(ray.train.get_dataset_shard("train"), cache_bytes)
    val_shard = ShardCache(ray.train.get_dataset_shard("validation"), cache_bytes)
    elapsed_before = float(history[-1]["elapsed_s"]) if history else 0.0
    run_start = time.perf_counter()

    for epoch in range(start_epoch, num_epochs):
        _maybe_inject_failure(config, epoch, rank, world)
        hooks.event(event="epoch_start", epoch=epoch, resumes=resumes)
        torch.manual_seed(epoch_seed(seed, epoch, rank))
        if world > 1:
            # every rank starts the epoch's clock together: samples/s is global rows over the slowest rank's
            # training time, not that plus the skew left by the last epoch's validation and checkpoint
            dist.barrier()
        t0 = time.perf_counter()
        loss_sum, n_train = 0.0, 0
        for batch in train_shard.batches(local_batch, shuffle_seed=epoch_seed(seed, epoch, rank)):
            x_num, x_cat, y = to_tensors(*pre.transform_batch(batch))
            for group in share_groups:
                x_num, x_cat, y = gather_batch(group, x_num, x_cat, y)
            # stateless: from the global step alone, so a resumed run continues on the same curve
            set_lr(optimizer, lr_at(global_step, steps_total, base_lr, schedule, warmup))
            if runner is not None:
                if len(y) % runner.num_microbatches:
                    continue  # a last partial batch that does not split into equal microbatches (same on all ranks)
                loss = runner.train_step(optimizer, x_num, x_cat, y) or 0.0
            else:
                loss = train_step(model, optimizer, x_num, x_cat, y)
            loss_sum += loss * len(y) * counts
            n_train += len(y) * counts
            global_step += 1
            hooks.step(epoch, global_step)
        train_s = time.perf_counter() - t0
        # after a step, so gradients and optimizer state exist: what each rank really holds
        mem = memory_metrics(gather_rank_memory(rank_memory(unwrap(state_module), optimizer)))

        val_batches = (to_tensors(*pre.transform_batch(b))
                       for b in val_shard.batches(max(1024, local_batch)))
        if lockstep:
            val_batches = _pad_to_common_count(list(val_batches), model)
        for group in share_groups:
            val_batches = [gather_batch(group, *b) for b in val_batches]
        if runner is not None:
            val_loss_sum, val_correct, n_val = _pipeline_eval_sums(runner, val_batches)
        else:
            val_loss_sum, val_correct, n_val = evaluate_sums(model, val_batches)
        val_loss_sum, val_correct, n_val = val_loss_sum * counts, val_correct * counts, n_val * counts

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
            "strategy": scfg.strategy,
            "world_size": world,
            # the controller's report-collection interval, as Ray Train handed it to this worker (None: Ray's 2 s)
            "report_poll_interval_s": _env_float(REPORT_POLL_ENV),
            **mem,
        }
        history.append(metrics)
        if rank == 0:
            logger.info("teacher epoch %d/%d: train_loss %.4f val_loss %.4f val_accuracy %.4f (%.0f samples/s, "
                        "max per-rank state %.1f MiB)", epoch + 1, num_epochs, metrics["train_loss"],
                        metrics["val_loss"], metrics["val_accuracy"], metrics["samples_per_s"],
                        metrics["mem_max_total_bytes"] / 2**20)

        with tempfile.TemporaryDirectory(prefix="raysys-ckpt-") as tmp:
            # full layout: rank 0 writes; sharded (zero2/zero3): every rank writes its DCP shard into its own
            # directory and reports it, and Ray Train merges them into one checkpoint directory
            wrote = save_checkpoint(
                tmp, state_module, optimizer, sharded=True if runner is not None else None, epoch=epoch, global_step=global_step, model_spec=spec, metrics=history,
                extra={"resumes": resumes, "schema": config["schema"], "preprocessor": config["preprocessor"],
                       "run_name": config.get("run_name"), "world_size": world, "strategy": scfg.strategy,
                       "parallel": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp}},
                # a pipeline's stages cannot gather on one rank: its export consolidates from DCP later
                export_model=epoch == num_epochs - 1 and runner is None)
            ckpt = ray.train.Checkpoint.from_directory(tmp) if wrote else None
            # every rank reports (a barrier); the upload is synchronous, so `tmp` may go afterwards
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
            hooks.event(event="reported", epoch=epoch)
