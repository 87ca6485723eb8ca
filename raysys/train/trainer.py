"""Teacher training with Ray Train: `train_teacher(cfg, schema, preprocessor) -> TeacherResult`.

Wiring only: the Parquet splits reach the workers as in-memory tables or Ray Datasets (`_split_inputs`),
`TorchTrainer` runs `train_loop_per_worker` on `cfg.train.num_workers` workers (CPU processes on gloo, or with
`train.use_gpu` one GPU each on NCCL + gloo; the parallel strategy is applied in the loop by `raysys.parallel`),
and the last reported checkpoint becomes the result.

Re-running a run name (what Ray Train v2 does, and what we chose)
------------------------------------------------------------------
Ray Train v2 has no `Trainer.restore`; instead, when `RunConfig(name, storage_path)` points at an
experiment directory that already holds a `checkpoint_manager_snapshot.json`, the controller loads it
and `ray.train.get_checkpoint()` returns that run's latest checkpoint (see
`ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py`, `_maybe_load_state_from_storage`).
A second plain call with the same name would therefore silently continue the old run, or, if it had
finished, train nothing at all. So:

- `train_teacher(..., resume=False)` (the default) always trains from scratch: it uses
  `<run_dir>/<run_name>` when that is free and otherwise a new `<run_name>_<timestamp>` directory next
  to it. Nothing is deleted. `TeacherResult.run_name` says which directory was used.
- `train_teacher(..., resume=True)` uses `<run_dir>/<run_name>` exactly: it continues that run from its
  latest checkpoint (model, AdamW state, step, metrics history) at the next epoch, trains from scratch
  when there is none, and returns the stored result without training when all epochs are done. Raising
  `train.num_epochs` and resuming trains the extra epochs.

Within one call, worker failures are retried `train.max_failures` times, each retry resuming from the
latest checkpoint (same mechanism).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs
import torch
from torch import nn

from raysys.config import PipelineConfig, TrainConfig
from raysys.data.dataset import DRIVER_READ_MAX_BYTES, Preprocessor, parquet_bytes, read_blocks, split_files
from raysys.data.schema import DatasetSchema
from raysys.models import build_model, model_spec
from raysys.parallel import StrategyConfig, check_available, fsdp_units
from raysys.parallel.memory import MemoryEstimate, check_memory_budget
from raysys.sigint import keep_sigint_handler
from raysys.train.checkpoint import META_FILE, is_checkpoint_dir, load_model_state, read_meta
from raysys.train.loop import LoopHooks, train_loop_per_worker
from raysys.train.private import check_resumable_privacy
from raysys.train.process import report_poll_interval
from raysys.train.progress import EpochWatcher
from raysys.train.worker_config import WorkerConfig, parallel_dims, worker_config

logger = logging.getLogger(__name__)

# a split is materialized when PARQUET_EXPANSION x its Parquet bytes fit in this fraction of the free
# object store memory (both splits together then take at most 2 x this fraction)
MATERIALIZE_FRACTION = 0.2
# the process group of GPU workers (torch's per-device backends; Ray's TorchConfig passes it through)
GPU_BACKEND = "cpu:gloo,cuda:nccl"
PARQUET_EXPANSION = 4.0


@dataclass
class TeacherResult:
    """A trained teacher: the final epoch's checkpoint directory and the per-epoch metrics."""

    checkpoint_dir: str
    model_spec: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    run_name: str = ""
    run_path: str = ""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's weights (safetensors, CPU)."""
        return load_model_state(self.checkpoint_dir)

    def load_model(self) -> nn.Module:
        """A fresh single-device teacher with the trained weights, in eval mode."""
        model = build_model(self.model_spec)
        model.load_state_dict(self.state_dict())
        return model.eval()

    @property
    def final_metrics(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path) -> TeacherResult:
        """Rebuild a result from a checkpoint directory (e.g. one from an earlier run)."""
        meta = read_meta(path)
        return cls(checkpoint_dir=str(path), model_spec=meta["model_spec"], metrics=meta["metrics"],
                   run_name=meta["extra"].get("run_name") or "")


def storage_path(run_dir: str) -> str:
    """`cfg.run_dir` as Ray Train's storage path: URIs unchanged, local paths made absolute (Ray requires it)."""
    return run_dir if "://" in run_dir else os.path.abspath(run_dir)


def choose_run_name(storage: str, run_name: str, *, resume: bool) -> str:
    """The experiment directory name under `storage` (see the module docstring for the policy)."""
    if not run_name or "/" in run_name or run_name in {".", ".."}:
        raise ValueError(f"run_name: {run_name!r} must be a non-empty directory name without '/'")
    if resume:
        return run_name
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)

    def taken(name: str) -> bool:
        return fs.get_file_info(f"{base.rstrip('/')}/{name}").type != pyarrow.fs.FileType.NotFound

    if not taken(run_name):
        return run_name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, i = f"{run_name}_{stamp}", 1
    while taken(candidate):
        i += 1
        candidate = f"{run_name}_{stamp}-{i}"
    logger.info("teacher: run %r already exists under %s; training from scratch as %r (resume=True continues it)",
                run_name, storage, candidate)
    return candidate


def _check_resumable(storage: str, name: str, spec: dict[str, Any], train: TrainConfig | None = None) -> None:
    """Fail fast on the driver when resuming a run whose checkpoints hold another architecture, or were trained
    under other DP-SGD settings than `train`'s (in the workers the same checks would be retried
    `train.max_failures` times first)."""
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    run = f"{base.rstrip('/')}/{name}"
    infos = fs.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True))
    ckpts = sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                   and i.base_name.startswith("checkpoint_epoch_"))
    if not ckpts:
        return
    try:
        with fs.open_input_stream(f"{ckpts[-1]}/{META_FILE}") as f:
            meta = json.loads(f.read().decode())
        saved = meta["model_spec"]
    except (FileNotFoundError, OSError, KeyError, ValueError):
        return  # incomplete checkpoint: Ray resumes from the one its snapshot names, the loop re-checks
    if train is not None:
        check_resumable_privacy((meta.get("extra") or {}).get("dp"), train, f"{run}/{ckpts[-1].rsplit('/', 1)[-1]}")
    if saved != spec:
        raise ValueError(f"resume: run {name!r} under {storage} was trained with model spec {saved}, but the "
                         f"config gives {spec} (teacher.*); use resume=False or another run_name")


def teacher_size(spec: dict[str, Any], pp: int = 1) -> tuple[int, int, int]:
    """(parameters, parameters of the largest FSDP unit, parameters of the heaviest of `pp` pipeline stages
    (0 when pp == 1)) of a teacher, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(spec)
    units = fsdp_units(model)
    largest = max([sum(p.numel() for p in u.parameters()) for u in units] or [0])
    stage = 0
    if pp > 1:
        from raysys.parallel.pipeline import stage_sizes

        stage = max(stage_sizes(model, pp))
    return sum(p.numel() for p in model.parameters()), largest, stage


def check_train_config(cfg: PipelineConfig, schema: DatasetSchema) -> MemoryEstimate:
    """Driver-side checks before any worker starts: strategy and degrees, and the per-worker memory budget
    (`train.max_worker_memory_gb`). Raises ValueError naming the field and a fix."""
    dims = parallel_dims(cfg.train, cfg.train.num_workers)
    # a composition that cannot work fails here, not in every worker max_failures times
    check_available(dims, StrategyConfig(cfg.train.strategy))
    n, largest, stage = teacher_size(model_spec(schema, cfg.teacher), dims.pp)
    est = check_memory_budget(n, cfg.train.strategy, dims, cfg.train.max_worker_memory_gb,
                              largest_unit_params=largest, largest_stage_params=stage)
    logger.info("teacher: %s parameters; %s on %d workers (dp=%d tp=%d pp=%d): ~%.1f MiB of params + grads + "
                "AdamW state per worker (estimate)", f"{n:,}", cfg.train.strategy, dims.world_size, dims.dp,
                dims.tp, dims.pp, est.total_bytes / 2**20)
    return est


def _local_paths(files: list[str]) -> list[str]:
    # Ray Data's read tasks run in other processes with other working directories
    return [f if "://" in f else os.path.abspath(f) for f in files]


def _split_inputs(cfg: PipelineConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """How each split reaches the workers: (Ray Datasets for `TorchTrainer(datasets=)`, object refs of whole
    Arrow tables for the loop), by size.

    - Up to DRIVER_READ_MAX_BYTES of local Parquet, when the object store has room and every worker's share fits
      `train.cache_shard_mb`: read here (`read_blocks`, milliseconds) and put in the object store as one table;
      each worker slices its equal share (`ShardCache.from_table`) and shuffles it in memory from the first
      epoch. No Ray Data on this path: its split coordinators (an actor per split, polled for every block) and
      Ray 2.60's Parquet reader actors cost seconds of start-up per run, and wake up on the cores the ranks
      train on.
    - Larger, when it fits the object store: read and materialized by Ray Data, split by Ray Train.
    - Larger still: streamed from Parquet every epoch, so memory stays bounded.
    """
    import ray
    import ray.data

    datasets: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    budget = ray.available_resources().get("object_store_memory", 0.0) * MATERIALIZE_FRACTION
    for split in ("train", "validation"):
        files = _local_paths(split_files(cfg.data.root, split))
        local = not any("://" in f for f in files)
        on_disk = parquet_bytes(files) if local else 0
        # Parquet is compressed: assume the in-memory Arrow blocks are a few times larger
        in_memory = on_disk * PARQUET_EXPANSION
        share_fits = in_memory / cfg.train.num_workers <= cfg.train.cache_shard_mb * 2**20
        if local and on_disk <= DRIVER_READ_MAX_BYTES and in_memory <= budget and share_fits:
            logger.info("teacher: the %s split (%.1f MiB of Parquet) goes to the workers as one in-memory table",
                        split, on_disk / 2**20)
            tables[split] = ray.put(pa.concat_tables(read_blocks(files)))
        elif local and in_memory <= budget:
            logger.info("teacher: materializing the %s split (%.1f MiB of Parquet) in the object store", split,
                        on_disk / 2**20)
            datasets[split] = ray.data.read_parquet(files).materialize()
        else:
            logger.info("teacher: streaming the %s split from Parquet (%.1f MiB, too large to materialize)", split,
                        on_disk / 2**20)
            datasets[split] = ray.data.read_parquet(files)
    return datasets, tables


def train_teacher(cfg: PipelineConfig, schema: DatasetSchema, preprocessor: Preprocessor, *,
                  run_name: str = "teacher", resume: bool = False, hooks: LoopHooks | None = None) -> TeacherResult:
    """Train the teacher on `cfg.data.root` with Ray Train: `cfg.train.strategy` over `cfg.train.num_workers`
    workers (CPU, or one GPU each with `train.use_gpu`), after `check_train_config` (degrees, compositions, the
    `train.max_worker_memory_gb` budget) and `check_gpu_request` have passed on the driver.

    Starts a local Ray if none is running (or joins `RAY_ADDRESS`). Results and checkpoints go under
    `cfg.run_dir/<run name>`; `resume` is explained in the module docstring. `hooks` (tests:
    raysys.train.testing) travel to every worker. Raises `ray.train.TrainingFailedError` when workers fail
    more than `train.max_failures` times.
    """
    import ray

    check_train_config(cfg, schema)
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS when set, else a local Ray
    check_gpu_request(cfg.train, ray.cluster_resources())
    storage = storage_path(cfg.run_dir)
    name = choose_run_name(storage, run_name, resume=resume)
    wc = worker_config(cfg, schema, preprocessor, name)
    if resume:
        _check_resumable(storage, name, wc.model_spec, cfg.train)
    trainer = _torch_trainer(cfg, wc, storage, hooks)
    logger.info("teacher: training %s on %d workers x %g CPUs%s, %d epochs, run %s/%s", wc.model_spec["family"],
                cfg.train.num_workers, cfg.train.cpus_per_worker, " + 1 GPU" if cfg.train.use_gpu else "",
                cfg.train.num_epochs, storage, name)
    with (report_poll_interval(cfg.train.report_poll_interval_s), keep_sigint_handler(),
          EpochWatcher(storage, name, cfg.train.num_epochs)):
        result = trainer.fit()
    return _teacher_result(result, name)


def _torch_trainer(cfg: PipelineConfig, wc: WorkerConfig, storage: str, hooks: LoopHooks | None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if hooks is not None:
        logger.warning("teacher: the workers run with loop hooks %r", hooks)
    datasets, tables = _split_inputs(cfg)
    # the refs travel inside the train function; the driver owns the tables for as long as fit() runs
    loop = functools.partial(train_loop_per_worker, hooks=hooks, tables=tables)
    tc = cfg.train
    return TorchTrainer(
        loop,
        train_loop_config=wc.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     accelerator_type=tc.accelerator_type if tc.use_gpu else None,
                                     resources_per_worker=_worker_resources(tc)),
        # on GPUs: NCCL for the CUDA tensors (gradients, FSDP2's gathers, pipeline activations), gloo for the few
        # CPU-side collectives (epoch sums, memory figures, rank nodes); on CPU gloo alone (Ray's default)
        torch_config=TorchConfig(backend=GPU_BACKEND if tc.use_gpu else None, timeout_s=tc.timeout_s),
        run_config=RunConfig(
            name=wc.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train logs every rank's report at INFO; rank 0 logs one line per epoch itself
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets or None,
    )


def _worker_resources(tc) -> dict[str, float]:
    """What each Ray Train worker reserves: `train.cpus_per_worker` CPUs and `train.resources_per_worker` (the GPU
    comes from ScalingConfig(use_gpu=True))."""
    return {"CPU": tc.cpus_per_worker, **tc.resources_per_worker}


def check_gpu_request(tc, cluster: dict[str, float]) -> None:
    """With `train.use_gpu`, a ValueError naming the key when the cluster's resources (`ray.cluster_resources()`)
    cannot give each worker a GPU (of `train.accelerator_type`): Ray Train would otherwise wait for them forever."""
    if not tc.use_gpu:
        return
    gpus = float(cluster.get("GPU", 0.0))
    if gpus < tc.num_workers:
        raise ValueError(
            f"train.use_gpu: one GPU per worker for {tc.num_workers} workers, but this Ray cluster has {gpus:g} GPU(s); "
            f"set train.use_gpu: false to train on CPUs, set train.num_workers <= {int(gpus)}, or join a cluster with "
            f"GPU nodes (on an autoscaling cluster, keep that many GPU workers up: min_workers)")
    if tc.accelerator_type and not cluster.get(f"accelerator_type:{tc.accelerator_type}"):
        kinds = sorted(k.split(":", 1)[1] for k in cluster if k.startswith("accelerator_type:"))
        raise ValueError(f"train.accelerator_type: no {tc.accelerator_type!r} GPUs in this Ray cluster (it has "
                         f"{kinds or 'none labelled'}); set one of those or remove train.accelerator_type")


def _teacher_result(result, name: str) -> TeacherResult:
    """The fit's last reported checkpoint as a `TeacherResult` (downloaded when the storage is remote)."""
    if result.checkpoint is None:
        raise RuntimeError(f"teacher: run {name!r} finished without reporting a checkpoint; see {result.path}")
    ckpt = result.checkpoint
    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        ckpt_dir = ckpt.path
    else:
        # remote storage (s3://, gs://): the contract is a local directory, so download it
        ckpt_dir = ckpt.to_directory(tempfile.mkdtemp(prefix=f"raysys-{name}-"))
    if not is_checkpoint_dir(ckpt_dir):
        raise RuntimeError(f"teacher: {ckpt_dir!r} is not a raysys checkpoint (no meta.json with "
                           f"model.safetensors or dcp/)")
    out = TeacherResult.from_checkpoint_dir(ckpt_dir)
    out.run_name, out.run_path = name, str(result.path)
    if out.metrics:
        last = out.metrics[-1]
        logger.info("teacher: done, epoch %d val_accuracy %.4f, checkpoint %s", last["epoch"], last["val_accuracy"],
                    ckpt_dir)
    return out
