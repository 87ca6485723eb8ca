"""The per-worker teacher training loop run by `ray.train.torch.TorchTrainer` (one process per rank).

Ray Train has already initialised the process group (gloo; with `train.use_gpu` NCCL for CUDA tensors and gloo
for CPU ones, each rank on its own GPU) when `train_loop_per_worker` starts. The
worker re-validates its `WorkerConfig` (plain JSON: nothing pickled crosses from the driver but the
optional test hooks), builds the `ParallelDims` mesh, applies `train.strategy` with
`raysys.parallel.parallelize`, builds the matching optimizer (AdamW, or ZeRO-1's partitioned AdamW) with
the decoupled weight decay moved to a step pre-hook over >= 2-D non-embedding weights, and per epoch:

1. trains on this rank's shard of "train" (per-worker batch = global batch / world size; DDP averages
   gradients, so this is one optimizer step on the global batch; with `train.dp`, DP-SGD's Poisson batches of
   expected global size train.batch_size instead: raysys.train.private), the lr of every step set from the
   global step (stateless, so a resume continues the curve);
2. validates on this rank's shard of "validation" and all-reduces the sums, so every rank reports the
   global loss and accuracy (Ray Train's `streaming_split(equal=True)` drops up to world_size - 1 rows so
   that DDP ranks run the same number of steps);
3. measures each rank's bytes of params, grads and optimizer state (`raysys.parallel.memory`);
4. reports on every rank (a barrier) with its part of the epoch's checkpoint (raysys.train.checkpoint).

On a restart (a worker failure under `FailureConfig(max_failures)`, or `train_teacher(resume=True)`) the
latest reported checkpoint restores model, optimizer, step counter and metrics history, whatever strategy
and world size wrote it, and training continues at the next epoch. Each epoch re-seeds torch from
(seed, epoch, rank), so a resumed run draws the same dropout masks and shuffles as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from raysys.models import build_model
from raysys.parallel import (
    ParallelDims,
    build_optimizer,
    has_dtensor_params,
    is_fsdp,
    parallelize,
    pipeline_runner,
    unwrap,
)
from raysys.parallel.memory import gather_rank_memory, gpu_memory_metrics, memory_metrics, rank_memory
from raysys.parallel.precision import autocast, resolve_precision
from raysys.train.checkpoint import read_meta, restore_checkpoint, save_checkpoint
from raysys.train.metrics import train_metrics
from raysys.train.private import PoissonBatches, check_resumable_privacy, private_model, private_settings
from raysys.train.process import report_poll_interval_s, setup_worker_process
from raysys.train.schedule import decoupled_weight_decay, lr_at, set_lr
from raysys.train.shard import ShardCache
from raysys.train.steps import (
    epoch_seed,
    evaluate_sums,
    gather_batch,
    pad_to_common_count,
    per_worker_batch_size,
    pipeline_eval_sums,
    to_device,
    to_tensors,
    train_step,
)
from raysys.train.worker_config import WorkerConfig, parallel_dims, strategy_config

logger = logging.getLogger(__name__)

# the smallest validation batch: evaluation holds no gradients, so larger batches only cost memory
MIN_EVAL_BATCH = 1024


class LoopHooks(Protocol):
    """Points where a caller can watch (or break) the loop; raysys.train.testing has the tests' hooks."""

    def on_worker_start(self, rank: int, world: int) -> None: ...

    def on_epoch_start(self, epoch: int, resumes: int) -> None: ...

    def on_step(self, epoch: int, step: int) -> None: ...

    def on_reported(self, epoch: int) -> None: ...


class NoHooks:
    """The default: every hook does nothing."""

    def on_worker_start(self, rank: int, world: int) -> None:
        pass

    def on_epoch_start(self, epoch: int, resumes: int) -> None:
        pass

    def on_step(self, epoch: int, step: int) -> None:
        pass

    def on_reported(self, epoch: int) -> None:
        pass


@dataclass
class ParallelModel:
    """This rank's parallelized teacher, its optimizer, and how its batches and losses are shared."""

    model: Any  # what runs the batches: the (DDP/FSDP) module, or this rank's PipelineRunner
    optimizer: torch.optim.Optimizer
    state_module: nn.Module  # what holds this rank's parameters (a pipeline's stage module)
    dims: ParallelDims
    strategy: str
    # tp then pp groups whose ranks run the union of their batches (so every rank of a replica holds the
    # same rows); a loss counts once per replica: on its last stage, divided by the tp ranks that computed it
    share_groups: list
    loss_weight: float
    # forwards run collectives: every rank must run as many (a pipeline's gathered batches are equal already)
    lockstep: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # what the forwards compute in (raysys.parallel.precision)
    autocast_forward: bool = False  # bf16 by autocast (not by FSDP2's MixedPrecisionPolicy)

    def amp(self):
        """The context every forward of this rank runs in (bf16 autocast, or nothing)."""
        return autocast(self.device.type, self.precision if self.autocast_forward else "fp32")

    @property
    def runner(self):
        return pipeline_runner(self.model)


@dataclass
class Progress:
    """Where the run stands: restored from a checkpoint on a restart, advanced by every step and epoch."""

    start_epoch: int = 0
    global_step: int = 0
    resumes: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def elapsed_before(self) -> float:
        return float(self.history[-1]["elapsed_s"]) if self.history else 0.0


def worker_device(train) -> torch.device:
    """This rank's device: the CUDA device Ray Train gave it with `train.use_gpu` (it also made it current),
    else the CPU."""
    if not train.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)  # the current device: NCCL, FSDP2 and the pipeline stages allocate there
    return device


def build_parallel_model(wc: WorkerConfig, world: int, device: torch.device | None = None) -> ParallelModel:
    device = device if device is not None else torch.device("cpu")
    precision = resolve_precision(wc.train.mixed_precision, device.type, dp_sgd=wc.train.dp is not None)
    scfg = strategy_config(wc.train)
    scfg = dataclasses.replace(scfg, options=scfg.options + (("precision", precision),))
    dims = parallel_dims(wc.train, world)
    if wc.train.dp is not None:  # DP-SGD: plain data parallel through Opacus (the config refuses the rest)
        torch.manual_seed(wc.train.seed)
        module = build_model(wc.model_spec).to(device)
        runner, optimizer = private_model(module, build_optimizer(module, scfg), wc.train, world)
        return ParallelModel(model=runner, optimizer=optimizer, state_module=module, dims=dims,
                             strategy=scfg.strategy, share_groups=[], loss_weight=1.0, lockstep=False,
                             device=device, precision=precision)
    mesh = dims.build_mesh(device.type)
    torch.manual_seed(wc.train.seed)  # same init on every rank (DDP and FSDP also broadcast rank 0's weights)
    model = parallelize(build_model(wc.model_spec).to(device), dims, scfg, mesh=mesh)
    optimizer = build_optimizer(model, scfg, mesh=mesh)
    runner = pipeline_runner(model)
    share_groups = [mesh[d].get_group() for d, on in (("tp", dims.tp_enabled), ("pp", dims.pp_enabled)) if on]
    return ParallelModel(
        model=model, optimizer=optimizer, state_module=runner.stage_module if runner is not None else model,
        dims=dims, strategy=scfg.strategy, share_groups=share_groups,
        loss_weight=(1.0 / dims.tp) if runner is None or runner.is_last else 0.0,
        lockstep=world > 1 and runner is None and has_dtensor_params(model),
        # FSDP2 computes in bf16 by its MixedPrecisionPolicy (raysys.parallel.fsdp); everything else by autocast
        device=device, precision=precision, autocast_forward=not is_fsdp(unwrap(model)))


def restore_progress(pm: ParallelModel, wc: WorkerConfig, checkpoint, rank: int, world: int) -> Progress:
    """Progress from Ray Train's latest checkpoint of this run (any layout into any strategy and world size;
    collective, every rank reads it), or a fresh start when there is none."""
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as ckpt_dir:
        saved_spec = read_meta(ckpt_dir)["model_spec"]
        if saved_spec != wc.model_spec:
            raise ValueError(
                f"teacher: cannot resume from {checkpoint.path}: it holds a model with spec {saved_spec}, "
                f"but the config asks for {wc.model_spec}; train from scratch (resume=False) or use another run_name")
        check_resumable_privacy(read_meta(ckpt_dir)["extra"].get("dp"), wc.train, checkpoint.path)
        meta = restore_checkpoint(ckpt_dir, pm.state_module, pm.optimizer)
    # the config's hyperparameters win over the checkpoint's (equal after a failure; a deliberate resume may
    # change them): the lr is set from the schedule before every step, the weight decay by its hook
    progress = Progress(start_epoch=int(meta["epoch"]) + 1, global_step=int(meta["global_step"]),
                        resumes=int(meta["extra"]["resumes"]) + 1, history=list(meta["metrics"]))
    if rank == 0:
        was = meta["extra"]
        logger.info("teacher: resumed from %s (epoch %d done, step %d, saved by %s on %s workers); continuing "
                    "at epoch %d as %s on %d workers", checkpoint.path, progress.start_epoch - 1,
                    progress.global_step, was["strategy"], was["world_size"], progress.start_epoch, pm.strategy,
                    world)
    return progress


def rank_nodes(world: int) -> list[str]:
    """The Ray node ID of every rank, by rank (collective): where the ranks of a multi-node run landed."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return [str(x) for x in out]


class TeacherWorker:
    """One rank's run: its model, data shards and progress, and the steps of an epoch."""

    def __init__(self, wc: WorkerConfig, rank: int, world: int, hooks: LoopHooks, tables: dict[str, Any]):
        import ray.train

        self.wc, self.train, self.rank, self.world, self.hooks = wc, wc.train, rank, world, hooks
        self.local_batch = per_worker_batch_size(self.train.batch_size, world)
        if rank == 0 and self.train.batch_size % world:
            logger.warning("train.batch_size %d is not divisible by %d workers: the global batch is %d",
                           self.train.batch_size, world, self.local_batch * world)
        self.pre = wc.build_preprocessor()
        self.device = worker_device(self.train)
        self.pm = build_parallel_model(wc, world, self.device)
        self.progress = restore_progress(self.pm, wc, ray.train.get_checkpoint(), rank, world)
        # AdamW's decay, but only on >= 2-D non-embedding weights (a step pre-hook; the optimizer's own is 0), on
        # the optimizer that steps (DP-SGD's runs no hooks of its own: its inner AdamW does)
        decoupled_weight_decay(unwrap(self.pm.state_module),
                               getattr(self.pm.optimizer, "original_optimizer", self.pm.optimizer),
                               self.train.weight_decay)
        self.train_shard, self.val_shard = (self._shard(split, tables) for split in ("train", "validation"))
        self.poisson = PoissonBatches(self.train_shard, self.train, world) if self.train.dp is not None else None
        self.elapsed_before, self.run_start = self.progress.elapsed_before, time.perf_counter()
        self.dashboard = train_metrics(rank)
        self.rank_nodes = rank_nodes(world)

    def _shard(self, split: str, tables: dict[str, Any]) -> ShardCache:
        """This rank's share of `split`: sliced from the whole table in the object store when the driver put it
        there (small splits), else Ray Train's shard of the Ray Dataset."""
        import ray
        import ray.train

        if split in tables:
            return ShardCache.from_table(ray.get(tables[split]), self.rank, self.world)
        return ShardCache(ray.train.get_dataset_shard(split), self.train.cache_shard_mb * 2**20)

    def run(self) -> None:
        for epoch in range(self.progress.start_epoch, self.train.num_epochs):
            self.hooks.on_epoch_start(epoch, self.progress.resumes)
            train_sums, train_s = self.train_epoch(epoch)
            # after a step, so gradients and optimizer state exist: what each rank really holds
            mem = memory_metrics(gather_rank_memory(rank_memory(unwrap(self.pm.state_module), self.pm.optimizer)))
            val_sums = self.validate()
            mem.update(gpu_memory_metrics(self.device))  # the CUDA allocator's epoch peak per rank (nothing on CPU)
            metrics = {**self.epoch_metrics(epoch, train_sums, val_sums, train_s), **mem}
            self.progress.history.append(metrics)
            self.log_epoch(metrics)
            if self.dashboard is not None:
                self.dashboard.record_epoch(self.wc.run_name, metrics)
            self.report(epoch, metrics)
            self.hooks.on_reported(epoch)

    def _shared(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for group in self.pm.share_groups:
            batch = gather_batch(group, *batch)
        return batch

    def train_epoch(self, epoch: int) -> tuple[tuple[float, float], float]:
        """((loss sum, rows) weighted per replica, this rank's training seconds) of one pass over the shard."""
        pm, seed = self.pm, epoch_seed(self.train.seed, epoch, self.rank)
        torch.manual_seed(seed)
        if self.world > 1:
            # every rank starts the epoch's clock together: samples/s is global rows over the slowest rank's
            # training time, not that plus the skew left by the last epoch's validation and checkpoint
            dist.barrier()
        t0 = time.perf_counter()
        loss_sum, n_train = 0.0, 0.0
        batches = (self.poisson.batches(seed) if self.poisson is not None
                   else self.train_shard.batches(self.local_batch, shuffle_seed=seed))
        for batch in batches:
            x_num, x_cat, y = self._shared(*to_device(to_tensors(*self.pre.transform_batch(batch)), self.device))
            set_lr(pm.optimizer, lr_at(self.progress.global_step, self.wc.total_steps, self.train.lr,
                                       self.train.lr_schedule, self.train.warmup_fraction))
            if pm.runner is not None:
                if len(y) % pm.runner.num_microbatches:
                    continue  # a last partial batch that does not split into equal microbatches (same on all ranks)
                with pm.amp():
                    loss = pm.runner.train_step(pm.optimizer, x_num, x_cat, y) or 0.0
            else:
                loss = train_step(pm.model, pm.optimizer, x_num, x_cat, y, amp=pm.amp)
            loss_sum += loss * len(y) * pm.loss_weight if len(y) else 0.0  # an empty DP-SGD batch's mean is nan
            n_train += len(y) * pm.loss_weight
            self.progress.global_step += 1
            self.hooks.on_step(epoch, self.progress.global_step)
        return (loss_sum, n_train), time.perf_counter() - t0

    def validate(self) -> tuple[float, float, float]:
        """(loss sum, correct, rows) of this rank's validation shard, weighted per replica."""
        pm = self.pm
        batches = (to_device(to_tensors(*self.pre.transform_batch(b)), self.device)
                   for b in self.val_shard.batches(max(MIN_EVAL_BATCH, self.local_batch)))
        if pm.lockstep:
            batches = pad_to_common_count(list(batches), pm.model)
        for group in pm.share_groups:
            batches = [gather_batch(group, *b) for b in batches]
        with pm.amp():
            sums = (pipeline_eval_sums(pm.runner, batches) if pm.runner is not None
                    else evaluate_sums(pm.state_module, batches))  # the plain module (DP-SGD's hooks idle, no_grad)
        return tuple(s * pm.loss_weight for s in sums)

    def epoch_metrics(self, epoch: int, train_sums: tuple[float, float], val_sums: tuple[float, float, float],
                      train_s: float) -> dict[str, Any]:
        """The epoch's global metrics: sums all-reduced, samples/s over the slowest rank's training time."""
        sums = torch.tensor([*train_sums, *val_sums], dtype=torch.float64)
        slowest = torch.tensor([train_s], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        loss_sum, n_train, val_loss_sum, val_correct, n_val = sums.tolist()
        return {
            "epoch": epoch,
            "train_loss": loss_sum / max(n_train, 1),
            "val_loss": val_loss_sum / n_val if n_val else math.nan,
            "val_accuracy": val_correct / n_val if n_val else math.nan,
            "samples_per_s": n_train / max(float(slowest), 1e-9),
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self.run_start),
            "resumes": self.progress.resumes,
            "strategy": self.pm.strategy,
            "world_size": self.world,
            "rank_nodes": self.rank_nodes,  # each rank's Ray node ID (they move when a lost node's ranks restart)
            "report_poll_interval_s": report_poll_interval_s(),
            # DP-SGD's epsilon so far (raysys.workflow.trust_stage.privacy_of puts the last one on the card)
            **({"dp": self.poisson.accounting(self.progress.global_step, epoch + 1)} if self.poisson else {}),
        }

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        if self.rank == 0:
            logger.info("teacher epoch %d/%d: train_loss %.4f val_loss %.4f val_accuracy %.4f (%.0f samples/s, "
                        "max per-rank state %.1f MiB)", metrics["epoch"] + 1, self.train.num_epochs,
                        metrics["train_loss"], metrics["val_loss"], metrics["val_accuracy"],
                        metrics["samples_per_s"], metrics["mem_max_total_bytes"] / 2**20)

    def report(self, epoch: int, metrics: dict[str, Any]) -> None:
        """`ray.train.report` on every rank (a barrier) with the files this rank wrote of the epoch's checkpoint:
        rank 0 alone for a full checkpoint, every rank its own DCP shard for a sharded one (Ray merges them)."""
        import ray.train

        dims = self.pm.dims
        extra = {"resumes": self.progress.resumes, "schema": self.wc.dataset_schema.model_dump(mode="json"),
                 "preprocessor": self.wc.preprocessor, "run_name": self.wc.run_name, "world_size": self.world,
                 "strategy": self.pm.strategy, "parallel": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp},
                 "dp": private_settings(self.train)}  # what a resume must keep for the epsilon to stay true
        with tempfile.TemporaryDirectory(prefix="raysys-ckpt-") as tmp:
            wrote = save_checkpoint(tmp, self.pm.state_module, self.pm.optimizer, epoch=epoch,
                                    global_step=self.progress.global_step, model_spec=self.wc.model_spec,
                                    metrics=self.progress.history, extra=extra,
                                    export_model=epoch == self.train.num_epochs - 1)
            ckpt = ray.train.Checkpoint.from_directory(tmp) if wrote else None
            # the upload is synchronous, so `tmp` may go afterwards
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")


def train_loop_per_worker(config: dict[str, Any], hooks: LoopHooks | None = None,
                          tables: dict[str, Any] | None = None) -> None:
    """Ray Train's entry point on every worker; `config` is a `WorkerConfig` dump (`model_dump(mode="json")`),
    `tables` the object refs of the splits the driver put in the object store whole (the others are Ray
    Train's dataset shards)."""
    import ray.train

    wc = WorkerConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_worker_process(wc.train, rank)
    hooks = hooks if hooks is not None else NoHooks()
    hooks.on_worker_start(rank, world)
    TeacherWorker(wc, rank, world, hooks, tables or {}).run()
