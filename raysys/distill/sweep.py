"""The distillation sweep: Ray Tune over (temperature, alpha[, lr, student width, depth]), one plain function
trainable per trial.

Why plain function trainables and not Ray Train inside each trial: Tune over a nested Train run
deadlocks on a 2-CPU box when a scheduler stops a trial early (ray-project/ray#54305, reproduced on
Ray 2.60). A student is small enough to train in one process, so each trial is `fit_student` under one
CPU and one torch thread, and ASHA can stop trials freely.

Search modes (`DistillConfig.search`):

- `grid`: `temperatures` x `alphas` for the fixed `student` architecture and `lr` (the tiny preset, tests).
- `optuna`: `OptunaSearch` (TPE, seeded) over temperature (log), alpha, lr (log), student width and depth,
  `num_samples` trials, usually with the `asha` scheduler stopping the weak ones early: by default its promotion
  variant (raysys.distill.asha: a trial waits at each rung and goes on only in the top 1/reduction_factor of the
  trials recorded there), or Tune's own stopping `ASHAScheduler` (`distill.asha_variant: stopping`).
- `random`: the same space sampled at random (the full-budget baseline of benchmarks/sweep.py).

Soft targets come once, before the sweep: the teacher's logits on the transfer set are computed with Ray
Data batch inference and stored as Parquet beside the data (raysys.distill.soft_targets); trials get
those arrays through the object store (`tune.with_parameters`) and never run the teacher.

Every epoch reports `val_accuracy` and `val_loss`; an epoch that improves the trial's `val_accuracy` (or ends at
a promotion ASHA rung, where the trial may wait and later go on) also reports a checkpoint: the student's weights
as `model.safetensors` (never pickle), `resume.safetensors` (optimizer and RNG state, from which a paused trial
is resumed and a failed one retried) and a `meta.json`.

After the sweep every finished trial's best checkpoint is measured (parameters, per-row latency at the
evaluation batch size: once per architecture, shared by its trials), the Pareto front of (accuracy up,
parameters down, latency down) is marked, and one student is chosen by a stated rule: the smallest (fewest
parameters) whose validation accuracy is within `accuracy_gap` of the teacher's; ties go to the more
accurate, then the faster. When no trial is that close, the most accurate one is chosen. The results
directory holds Tune's own files plus `summary.csv`, `summary.md` and `sweep_summary.json`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysys.config import PipelineConfig
from raysys.data import DatasetSchema, Preprocessor, read_split
from raysys.distill.kd import supports_hint
from raysys.distill.soft_targets import (
    SoftTargets,
    compute_soft_targets,
    compute_transfer_targets,
    read_soft_targets,
    read_transfer_targets,
)
from raysys.distill.student import EpochState, StudentData, fit_student
from raysys.models import build_model, model_spec, num_parameters, predict_logits
from raysys.sigint import keep_sigint_handler
from raysys.statefile import load_state, save_state

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
RESUME_FILE = "resume.safetensors"  # optimizer and RNG state after the checkpoint's epoch (raysys.statefile)
META_FILE = "meta.json"
METRIC = "val_accuracy"
MODE = "max"
SUMMARY_COLUMNS = ("trial_id", "temperature", "alpha", "lr", "hidden_dims", "num_parameters", "best_val_accuracy",
                   "best_epoch", "epochs_run", "stopped_early", "latency_ms_per_row", "pareto", "chosen", "error")


@dataclass
class SweepResult:
    """The outcome of `run_sweep`.

    best_config: the chosen trial's `{"temperature", "alpha", "lr", "hidden_dims"}`.
    best_val_accuracy: validation accuracy of `best_state_dict` (the best epoch of the chosen trial:
        each trial keeps its best-scoring checkpoint, so this is early stopping on validation accuracy).
    best_state_dict: the chosen student's weights, loaded from that checkpoint's safetensors file.
    student_spec: `raysys.models.model_spec` dict of the chosen student; `build_model(student_spec)` takes
        `best_state_dict`.
    trials: one dict per trial: `trial_id`, `temperature`, `alpha`, `lr`, `hidden_dims`, `num_parameters`,
        the last reported metrics (`epoch`, `val_accuracy`, `val_loss`, ...), `best_val_accuracy`,
        `best_epoch`, `epochs_run`, `stopped_early`, `latency_ms_per_row`, `pareto`, `chosen`, `error`, `path`.
    results_dir: the Tune experiment directory (under `cfg.run_dir`); `summary.csv`/`summary.md` live there.
    sweep_id: the experiment name (lineage of the registered student).
    """

    best_config: dict[str, Any]
    best_val_accuracy: float
    best_state_dict: dict[str, torch.Tensor]
    student_spec: dict[str, Any]
    trials: list[dict[str, Any]]
    results_dir: str
    best_epoch: int = 0
    best_checkpoint_path: str = ""
    teacher_val_accuracy: float = float("nan")
    scheduler: str = "fifo"
    search: str = "grid"
    sweep_id: str = ""
    selection_rule: str = ""
    pareto: list[str] = field(default_factory=list)
    teacher_num_parameters: int = 0
    soft_targets: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    max_concurrent_trials: int = 0
    summary_files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-serialisable values."""
        return {
            "sweep_id": self.sweep_id, "search": self.search, "scheduler": self.scheduler,
            "best_config": dict(self.best_config), "best_val_accuracy": self.best_val_accuracy,
            "best_epoch": self.best_epoch, "best_checkpoint_path": self.best_checkpoint_path,
            "teacher_val_accuracy": self.teacher_val_accuracy, "teacher_num_parameters": self.teacher_num_parameters,
            "student_spec": dict(self.student_spec), "selection_rule": self.selection_rule,
            "pareto": list(self.pareto), "trials": [dict(t) for t in self.trials],
            "results_dir": self.results_dir, "soft_targets": dict(self.soft_targets),
            "wall_seconds": self.wall_seconds, "max_concurrent_trials": self.max_concurrent_trials,
            "summary_files": dict(self.summary_files),
        }


def precompute_teacher_logits(teacher_model: nn.Module, x_num, x_cat, *, batch_size: int = 8192) -> np.ndarray:
    """The teacher's logits, float32 (n, classes), computed in eval mode in batches, in this process.

    The model's train/eval mode is restored afterwards so a caller that keeps training is unaffected.
    (The sweep uses Ray Data instead: `raysys.distill.soft_targets.compute_soft_targets`.)
    """
    was_training = teacher_model.training
    try:
        logits = predict_logits(teacher_model, x_num, x_cat, batch_size=batch_size)
    finally:
        teacher_model.train(was_training)
    return logits.detach().cpu().numpy().astype(np.float32, copy=False)


def load_student_data(cfg: PipelineConfig, preprocessor: Preprocessor, teacher_model: nn.Module, *,
                      hints: bool = False) -> tuple[StudentData, np.ndarray, SoftTargets]:
    """Train/validation arrays with the teacher's soft targets, computed once with Ray Data and stored as
    Parquet beside the data (reused when the same teacher's targets are already there).

    Returns `(data, teacher_val_logits, soft_targets)`; the validation logits only serve to report the
    teacher's own accuracy (the selection rule compares against it). With `distill.transfer_multiplier`
    > 0 the data also carries that many unlabeled MUNGE rows per training row with the teacher's logits
    (scored with Ray Data, stored beside the soft targets; `soft_targets.meta["transfer"]` says where).
    """
    targets = compute_soft_targets(cfg.data.root, preprocessor.schema, preprocessor, teacher_model,
                                   num_actors=cfg.distill.soft_target_actors, hints=hints)
    x_num, x_cat, y, t_logits, t_hints = read_soft_targets(targets, "train", preprocessor)
    vx_num, vx_cat, vy, t_val, _ = read_soft_targets(targets, "validation", preprocessor)
    transfer: dict[str, Any] = {}
    dc = cfg.distill
    if dc.transfer_multiplier > 0:
        num_rows = max(1, round(dc.transfer_multiplier * len(y)))
        path, seconds, reused = compute_transfer_targets(cfg.data.root, preprocessor.schema, preprocessor,
                                                         teacher_model, num_rows, seed=dc.seed,
                                                         num_actors=dc.soft_target_actors)
        tx_num, tx_cat, tx_logits = read_transfer_targets(path, preprocessor)
        transfer = dict(transfer_x_num=tx_num, transfer_x_cat=tx_cat, transfer_logits=tx_logits)
        targets.meta = {**targets.meta, "transfer": {"method": "munge", "num_rows": num_rows, "path": path,
                                                     "compute_seconds": round(seconds, 3), "reused": reused}}
    data = StudentData(x_num=x_num, x_cat=x_cat, y=y, teacher_logits=t_logits, val_x_num=vx_num,
                       val_x_cat=vx_cat, val_y=vy, teacher_hints=t_hints, **transfer)
    return data, t_val, targets


def _storage_path(run_dir: str) -> str:
    # Tune needs an absolute local path (or a URI, which pyarrow.fs resolves on a cluster)
    if "://" in run_dir:
        return run_dir
    path = Path(run_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def trial_spec(base_spec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The student spec of a trial: `base_spec` with `student_width` x `student_depth` hidden layers when
    the trial samples the architecture."""
    if "student_width" in params or "student_depth" in params:
        if "hidden_dims" not in base_spec:
            raise ValueError(f"distill.student.family: the search samples MLP widths and depths (student_widths, "
                             f"student_depths), which a {base_spec.get('family')!r} student does not have; use "
                             f"family: mlp, or search: grid")
        width = int(params.get("student_width", base_spec["hidden_dims"][0]))
        depth = int(params.get("student_depth", len(base_spec["hidden_dims"])))
        return {**base_spec, "hidden_dims": [width] * depth}
    return dict(base_spec)


def _distill_trial(config: dict[str, Any], data: StudentData, fixed: dict[str, Any]) -> None:
    """One Tune trial: a plain function trainable (see the module docstring for why not Ray Train).

    A trial that Tune retries after a failure (a lost node, a killed process: `distill.max_trial_failures`)
    goes on from its latest checkpoint, as the uninterrupted trial would (`fit_student(resume=...)`).
    """
    from ray import tune

    # a trial reserves one CPU; more intra-op threads would only fight the other trials for cores
    torch.set_num_threads(1)
    # the trial's checkpoints are listed in the sweep's summary: Ray's INFO line per checkpoint, forwarded
    # from every trial to the driver's console, is noise
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    params = {**fixed, **config}
    params["student_spec"] = trial_spec(fixed["student_spec"], config)
    checkpoint_epochs = set(fixed.get("checkpoint_epochs", ()))
    best = [float("-inf")]
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = json.loads(Path(d, META_FILE).read_text())
            resume = {**load_state(Path(d, RESUME_FILE)), "weights": load_file(str(Path(d, WEIGHTS_FILE)))}
        best[0] = float(meta.get("best_so_far", meta["metrics"][METRIC]))
        # promoted by ASHA from the rung it was paused at, or retried after a failure
        log.info("distill: trial goes on after epoch %d of its checkpoint", resume["epoch"])

    def report(metrics: dict[str, Any], state: EpochState) -> None:
        # Metrics every epoch, a checkpoint only when val_accuracy improved (and at the promotion ASHA's
        # rungs, where a trial may be paused and later resumed): the sweep only ever wants each trial's best
        # epoch, and a checkpoint per epoch with num_to_keep=1 would force an experiment-state snapshot on
        # every report (Tune warns that this becomes a bottleneck). A retried trial replays the epochs after
        # its last checkpoint.
        if metrics[METRIC] <= best[0] and state.epoch not in checkpoint_epochs:
            tune.report(metrics)
            return
        best[0] = max(best[0], metrics[METRIC])
        with tempfile.TemporaryDirectory(prefix="raysys-student-") as d:
            save_file(state.weights, os.path.join(d, WEIGHTS_FILE))
            save_state(os.path.join(d, RESUME_FILE), state.resumable())
            meta = {"student_spec": params["student_spec"], "temperature": params["temperature"],
                    "alpha": params["alpha"], "lr": params["lr"], "metrics": metrics, "best_so_far": best[0]}
            Path(d, META_FILE).write_text(json.dumps(meta, indent=2))
            # report() copies the directory to the trial's storage before it returns
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    fit_student(params, data, report, resume=resume)


def _progress(total: int, num_epochs: int, max_failures: int, every_s: float = 30.0):
    """A Tune callback that logs one line per finished (or retried) trial and a status line at most every
    `every_s` seconds, in place of Tune's console tables (a result table per trial: ~20 lines each, thousands
    for a real sweep)."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self) -> None:
            self.t0 = self.last = time.monotonic()
            self.best: dict[str, float] = {}  # trial id -> best val_accuracy so far

        @staticmethod
        def _epochs(trial) -> int:
            return int((trial.last_result or {}).get("training_iteration", 0))

        def _best(self) -> str:
            return f"{max(self.best.values()):.4f}" if self.best else "-"

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if result.get(METRIC) is not None:
                self.best[trial.trial_id] = max(self.best.get(trial.trial_id, float("-inf")), float(result[METRIC]))

        @staticmethod
        def _done(trials, trial=None) -> int:
            # counted from the trials, not by this callback: a resumed sweep starts with some already done
            return sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + (trial is not None)

        def _finished(self, trials, trial, how: str) -> None:
            conf = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
            acc = self.best.get(trial.trial_id)
            log.info("distill: trial %d/%d %s %s after %d/%d epochs, best val_accuracy %s (sweep best %s; %.0fs) "
                     "[%s]", self._done(trials, trial), total, trial.trial_id, how, self._epochs(trial), num_epochs,
                     "-" if acc is None else f"{acc:.4f}", self._best(), time.monotonic() - self.t0, conf)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._finished(trials, trial, "finished" if self._epochs(trial) >= num_epochs else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._finished(trials, trial, "FAILED")

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            log.warning("distill: trial %s failed after %d epochs (failure %d of at most %d retried); retrying "
                        "it from its latest checkpoint", trial.trial_id, self._epochs(trial), trial.num_failures,
                        max_failures)

        def on_step_end(self, iteration, trials, **info) -> None:
            now = time.monotonic()
            if now - self.last >= every_s:
                self.last = now
                running = sum(t.status == "RUNNING" for t in trials)
                log.info("distill: %d/%d trials done, %d running; sweep best val_accuracy %s (%.0fs)",
                         self._done(trials), total, running, self._best(), now - self.t0)

    return SweepProgress()


def _scheduler(name: str, num_epochs: int, grace_period: int = 1, reduction_factor: int = 3, *,
               variant: str = "stopping", num_trials: int = 1, max_concurrent: int = 1):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if name == "fifo":
        return FIFOScheduler()
    if name == "asha" and variant == "promotion":
        from raysys.distill.asha import PromotionASHA

        return PromotionASHA(max_t=num_epochs, grace_period=max(1, min(grace_period, num_epochs)),
                             reduction_factor=reduction_factor, num_trials=num_trials, max_concurrent=max_concurrent)
    if name == "asha":
        # metric/mode come from TuneConfig (setting them in both places is an error in Tune);
        # one report per epoch, so training_iteration counts epochs
        return ASHAScheduler(time_attr="training_iteration", max_t=num_epochs,
                             grace_period=max(1, min(grace_period, num_epochs)), reduction_factor=reduction_factor)
    raise ValueError(f"distill.scheduler: unknown scheduler {name!r}; choose 'fifo' or 'asha'")


def _search(cfg: PipelineConfig, concurrency: int, scheduler=None) -> tuple[dict[str, Any], Any, int]:
    """(param_space, search_alg, num_samples) for `cfg.distill.search`, at most `concurrency` trials
    at once. With the promotion ASHA `scheduler` the limit does not count the trials it paused at a rung."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from raysys.distill.asha import (
        PauseAwareLimiter,
        PauseAwareSearchGenerator,
        PauseAwareVariantGenerator,
        PromotionASHA,
    )

    promotion = isinstance(scheduler, PromotionASHA)

    def variants(**kwargs):
        # a search *generator*: Tune ignores TuneConfig.max_concurrent_trials for it (it only wraps Searchers
        # such as OptunaSearch in a ConcurrencyLimiter), so the limit goes here
        if promotion:
            return PauseAwareVariantGenerator(scheduler, max_concurrent=concurrency, **kwargs)
        return BasicVariantGenerator(max_concurrent=concurrency, **kwargs)

    dc = cfg.distill
    if dc.search == "grid":
        space = {"temperature": tune.grid_search(list(dc.temperatures)), "alpha": tune.grid_search(list(dc.alphas)),
                 "lr": dc.lr}
        return space, variants(), 1
    space = {"temperature": tune.loguniform(*dc.temperature_range), "alpha": tune.uniform(*dc.alpha_range),
             "lr": tune.loguniform(*dc.lr_range), "student_width": tune.choice(list(dc.student_widths)),
             "student_depth": tune.choice(list(dc.student_depths))}
    if dc.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # metric/mode come from TuneConfig; a seeded TPE sampler makes the suggestions repeatable
        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=dc.seed))
        if not promotion:
            return space, searcher, dc.num_samples
        # Tune's own ConcurrencyLimiter (TuneConfig.max_concurrent_trials) would count paused trials
        return (space, PauseAwareSearchGenerator(PauseAwareLimiter(searcher, concurrency, scheduler), scheduler),
                dc.num_samples)
    if dc.search == "random":
        return space, variants(random_state=dc.seed), dc.num_samples
    raise ValueError(f"distill.search: unknown search {dc.search!r}; choose 'grid', 'optuna' or 'random'")


def default_concurrency(cluster_cpus: float, *, single_local_node: bool, host_cores: int) -> int:
    """Trials at once when `distill.max_concurrent_trials` is unset: one per CPU of the cluster.

    A trial trains with one torch thread under one logical CPU. On a multi-node cluster that is the cluster's
    logical CPUs (Ray's default is one per core). On a one-node cluster on this host it is also capped at the
    host's cores: a local Ray may be started with more logical CPUs than cores (raysys does, as Tune over Ray
    Train needs them), and one-thread trials beyond the cores add no throughput, only a process start-up each
    (~3 s of imports: torch, Tune) and fewer finished rungs for ASHA to decide on.
    """
    n = max(1, int(cluster_cpus))
    return min(n, max(1, host_cores)) if single_local_node else n


def _max_concurrent(cfg: PipelineConfig) -> int:
    """`distill.max_concurrent_trials`, or `default_concurrency` for the connected cluster when unset."""
    import ray

    if cfg.distill.max_concurrent_trials is not None:
        return cfg.distill.max_concurrent_trials
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = len(nodes) == 1 and nodes[0].get("NodeID") == ray.get_runtime_context().get_node_id()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return default_concurrency(ray.cluster_resources().get("CPU", 1), single_local_node=local, host_cores=cores)


def _load_weights(checkpoint) -> dict[str, torch.Tensor]:
    with checkpoint.as_directory() as d:
        return load_file(os.path.join(d, WEIGHTS_FILE))


def pareto_front(rows: list[dict[str, Any]], objectives: tuple[tuple[str, str], ...] = (
        ("best_val_accuracy", "max"), ("num_parameters", "min"), ("latency_ms_per_row", "min"))) -> list[int]:
    """Indices of the rows no other row dominates (at least as good on every objective, better on one)."""
    def vec(r: dict[str, Any]) -> tuple[float, ...]:
        return tuple(float(r[k]) if m == "max" else -float(r[k]) for k, m in objectives)

    vs = [vec(r) for r in rows]
    front = []
    for i, v in enumerate(vs):
        dominated = any(all(a >= b for a, b in zip(w, v)) and any(a > b for a, b in zip(w, v))
                        for j, w in enumerate(vs) if j != i)
        if not dominated:
            front.append(i)
    return front


def select_student(rows: list[dict[str, Any]], teacher_val_accuracy: float, accuracy_gap: float
                   ) -> tuple[int, str]:
    """Index of the chosen row and the rule, in words (see the module docstring)."""
    if not rows:
        raise ValueError("select_student: no candidate trials")
    floor = teacher_val_accuracy - accuracy_gap
    rule = (f"smallest student (fewest parameters) with val accuracy >= teacher val accuracy "
            f"{teacher_val_accuracy:.4f} - gap {accuracy_gap:g} = {floor:.4f}; ties: higher accuracy, then lower "
            "latency; if none qualifies: the most accurate")
    eligible = [i for i, r in enumerate(rows) if r["best_val_accuracy"] >= floor - 1e-12]
    if eligible:
        i = min(eligible, key=lambda i: (rows[i]["num_parameters"], -rows[i]["best_val_accuracy"],
                                         rows[i]["latency_ms_per_row"]))
        return i, rule
    i = max(range(len(rows)), key=lambda i: (rows[i]["best_val_accuracy"], -rows[i]["num_parameters"],
                                             -rows[i]["latency_ms_per_row"]))
    return i, rule + " (none qualified)"


def _fmt_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "x".join(str(x) for x in v)
    return str(v)


def summary_table(trials: list[dict[str, Any]]) -> tuple[str, str]:
    """(CSV text, Markdown text) of the trials, one row each, sorted by parameters then accuracy."""
    rows = sorted(trials, key=lambda t: (t.get("num_parameters") or 0, -(t.get("best_val_accuracy") or 0.0)))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for t in rows:
        w.writerow([_fmt_cell(t.get(c)) for c in SUMMARY_COLUMNS])
    md = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for t in rows:
        cells = []
        for c in SUMMARY_COLUMNS:
            v = t.get(c)
            if c in ("pareto", "chosen", "stopped_early"):
                v = "yes" if v else ""
            cells.append(_fmt_cell(v).replace("|", "/")[:80])
        md.append("| " + " | ".join(cells) + " |")
    return buf.getvalue(), "\n".join(md) + "\n"


def _write_text(directory: str, name: str, text: str) -> str:
    if "://" in directory:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(directory)
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write(text.encode())
        return f"{directory}/{name}"
    p = Path(directory) / name
    p.write_text(text)
    return str(p)


def _experiment_path(cfg: PipelineConfig, run_name: str) -> str:
    """Where Tune keeps the sweep `run_name` (a local path or a URI)."""
    return f"{_storage_path(cfg.run_dir).rstrip('/')}/{run_name}"


def _pause_callbacks(scheduler) -> list:
    from raysys.distill.asha import KeepResultsOnPause, PromotionASHA, SchedulerState

    return [KeepResultsOnPause(scheduler), SchedulerState(scheduler)] if isinstance(scheduler, PromotionASHA) else []


def _new_tuner(cfg: PipelineConfig, trainable, scheduler, concurrency: int, total_trials: int, run_name: str):
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter, Searcher

    dc = cfg.distill
    space, search_alg, num_samples = _search(cfg, concurrency, scheduler)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples,
                                    # generators and our limiter carry their own limit (see _search)
                                    max_concurrent_trials=concurrency if isinstance(search_alg, Searcher) and not
                                    isinstance(search_alg, ConcurrencyLimiter) else None,
                                    # a new trial takes over a finished (or ASHA-stopped) trial's actor:
                                    # no process start, torch import or data fetch per trial
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=run_name, storage_path=_storage_path(cfg.run_dir),
            # progress as one log line per trial (see _progress); Tune's own tables with --verbose (DEBUG)
            verbose=1 if log.isEnabledFor(logging.DEBUG) else 0,
            callbacks=[_progress(total_trials, dc.num_epochs, dc.max_trial_failures), *_pause_callbacks(scheduler)],
            # a failed trial (lost node, killed process) is retried from its latest checkpoint
            failure_config=tune.FailureConfig(max_failures=dc.max_trial_failures),
            # trials checkpoint only on improvement (see _distill_trial), so all are kept: few and small
            checkpoint_config=tune.CheckpointConfig(checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
        ),
    )


def run_sweep(cfg: PipelineConfig, schema: DatasetSchema, preprocessor: Preprocessor, teacher_model: nn.Module,
              *, run_name: str | None = None, resume: bool = False) -> SweepResult:
    """Distil `teacher_model` into students with Ray Tune (see the module docstring for modes and the rule).

    Starts a local Ray when none is connected. Raises RuntimeError when every trial failed; a partial
    failure is logged and shown in `trials[*]["error"]`.
    `resume=True` goes on with the interrupted sweep `run_name` under `cfg.run_dir` (its driver died: a
    killed job, a lost head node): finished trials are kept, the others go on from their latest checkpoints,
    and the search continues from Tune's saved experiment state (Tune's own files, snapshotted about every
    10 s), promotion ASHA from its rungs saved with it (`asha.SchedulerState`; Tune's stopping ASHA starts
    afresh). The sweep keeps the search space and trial count it was started with; run it with the same config.
    """
    import ray
    from ray import tune

    from raysys.evaluate import measure_latency, torch_threads

    t_start = time.perf_counter()
    if not ray.is_initialized():
        ray.init()
    dc = cfg.distill
    if resume:
        if not run_name or "/" in run_name or run_name in (".", ".."):
            raise ValueError(f"distill resume: {run_name!r} is not a sweep name; name the interrupted sweep's "
                             f"directory under run_dir (e.g. distill-20261123-021500)")
        if not tune.Tuner.can_restore(_experiment_path(cfg, run_name)):
            raise ValueError(f"distill resume: no sweep {run_name!r} to go on with under {cfg.run_dir} (run_dir); "
                             f"check the name, or start a new sweep")
    base_spec = model_spec(schema, dc.student)
    hints = dc.hint_weight > 0
    if hints and not (supports_hint(teacher_model) and type(build_model(base_spec)) is type(teacher_model)):
        log.warning("distill.hint_weight=%g ignored: the hint loss needs a student of the teacher's family "
                    "(%s) with body/head features", dc.hint_weight, type(teacher_model).__name__)
        hints = False
    data, t_val, targets = load_student_data(cfg, preprocessor, teacher_model, hints=hints)
    teacher_val_acc = float((t_val.argmax(1) == data.val_y).mean())
    if dc.search != "grid":
        log.info("distill: search=%s samples temperature/alpha/lr/width/depth; temperatures, alphas, lr and "
                 "student.hidden_dims of the config are not used", dc.search)
    run_name = run_name or f"distill-{time.strftime('%Y%m%d-%H%M%S')}"
    concurrency = _max_concurrent(cfg)
    total_trials = len(dc.temperatures) * len(dc.alphas) if dc.search == "grid" else dc.num_samples
    scheduler = _scheduler(dc.scheduler, dc.num_epochs, dc.grace_period, dc.reduction_factor,
                           variant=dc.asha_variant, num_trials=total_trials, max_concurrent=concurrency)
    log.info("distill: %d train rows, %d val rows; teacher val accuracy %.4f; search %s (%s), scheduler %s, "
             "%d trials at once", len(data.y), len(data.val_y), teacher_val_acc, dc.search,
             f"{len(dc.temperatures)} x {len(dc.alphas)} grid" if dc.search == "grid" else f"{dc.num_samples} samples",
             dc.scheduler if dc.scheduler == "fifo" else f"asha ({dc.asha_variant})", concurrency)

    fixed = {"student_spec": base_spec, "num_epochs": dc.num_epochs, "batch_size": dc.batch_size, "seed": dc.seed,
             "hint_weight": dc.hint_weight if hints else 0.0,
             # a trial paused at a rung goes on from that epoch's checkpoint when promoted
             "checkpoint_epochs": list(getattr(scheduler, "rungs", []))}
    trainable = tune.with_resources(tune.with_parameters(_distill_trial, data=data, fixed=fixed), {"cpu": 1})
    if resume:
        # Tune's experiment state (its own pickled files in the run directory) brings back the search, the
        # scheduler and every trial; the trainable, which holds the data, is handed over again
        tuner = tune.Tuner.restore(_experiment_path(cfg, run_name), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
        log.info("distill: going on with sweep %s", run_name)
    else:
        log.info("distill: sweep %s; if it is interrupted, `raysys distill --resume-sweep %s` goes on with it",
                 run_name, run_name)
        tuner = _new_tuner(cfg, trainable, scheduler, concurrency, total_trials, run_name)
    with keep_sigint_handler(), warnings.catch_warnings():
        # a retried or resumed trial replays the epochs after its checkpoint; Optuna keeps the values it was
        # told first and warns about every replayed step
        warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=")
        grid = tuner.fit()

    trials: list[dict[str, Any]] = []
    candidates: list[tuple[dict[str, Any], Any, dict[str, Any], dict[str, Any]]] = []  # row, ckpt, metrics, spec
    vx_num, vx_cat = data.val_x_num, data.val_x_cat
    # latency belongs to the architecture (the same layers cost the same whatever their weights): measured once
    # per student spec, so the Pareto front and the choice's tie-break never turn on timing noise between
    # trials of one architecture
    latency_of: dict[str, float] = {}
    with torch_threads(1):  # latency as a one-thread trial/replica sees it, comparable across trials
        for result in grid:
            conf = result.config
            spec = trial_spec(base_spec, conf)
            last = {k: v for k, v in (result.metrics or {}).items()
                    if k in ("epoch", "train_loss", "train_soft", "train_hard", "val_loss", "val_accuracy")}
            row: dict[str, Any] = {
                "trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name,
                "temperature": float(conf["temperature"]), "alpha": float(conf["alpha"]), "lr": float(conf["lr"]),
                "hidden_dims": list(spec["hidden_dims"]), "num_parameters": None, **last,
                "epochs_run": int(last.get("epoch", 0)),
                "error": None if result.error is None else repr(result.error)[:500], "path": result.path,
                "best_val_accuracy": None, "best_epoch": None, "latency_ms_per_row": None,
                "pareto": False, "chosen": False,
            }
            row["stopped_early"] = result.error is None and row["epochs_run"] < dc.num_epochs
            ckpts = [(c, m) for c, m in (result.best_checkpoints or []) if METRIC in m]
            if ckpts:
                c, m = max(ckpts, key=lambda cm: (cm[1][METRIC], -cm[1].get("val_loss", 0.0)))
                row["best_val_accuracy"] = float(m[METRIC])
                row["best_epoch"] = int(m.get("epoch", 0))
                model = build_model(spec)
                model.load_state_dict(_load_weights(c))
                row["num_parameters"] = num_parameters(model)
                arch = json.dumps(spec, sort_keys=True)
                if arch not in latency_of:
                    latency_of[arch] = measure_latency(
                        model, vx_num, vx_cat, batch_size=dc.evaluation.latency_batch_size,
                        repeats=max(5, min(dc.evaluation.latency_repeats, 50)), warmup=3)["per_row_in_batch_ms"]
                row["latency_ms_per_row"] = latency_of[arch]
                candidates.append((row, c, m, spec))
            trials.append(row)
    trials.sort(key=lambda r: str(r["trial_id"]))
    failed = [t for t in trials if t["error"]]
    if not candidates:
        raise RuntimeError(f"distill: no trial produced a checkpoint; errors: {[t['error'] for t in failed]}")
    if failed:
        log.warning("distill: %d of %d trials failed: %s", len(failed), len(trials), failed[0]["error"])

    rows = [cand[0] for cand in candidates]
    for i in pareto_front(rows):
        rows[i]["pareto"] = True
    chosen, rule = select_student(rows, teacher_val_acc, dc.accuracy_gap)
    row, ckpt, metrics, spec = candidates[chosen]
    row["chosen"] = True
    state = _load_weights(ckpt)
    build_model(spec).load_state_dict(state)  # fail here, not in the registry, if the weights do not fit
    best_config = {"temperature": row["temperature"], "alpha": row["alpha"], "lr": row["lr"],
                   "hidden_dims": list(spec["hidden_dims"])}
    res = SweepResult(
        best_config=best_config, best_val_accuracy=float(metrics[METRIC]), best_state_dict=state, student_spec=spec,
        trials=trials, results_dir=grid.experiment_path, best_epoch=int(metrics.get("epoch", 0)),
        best_checkpoint_path=ckpt.path, teacher_val_accuracy=teacher_val_acc, scheduler=dc.scheduler,
        search=dc.search, sweep_id=run_name, selection_rule=rule,
        pareto=[str(r["trial_id"]) for r in rows if r["pareto"]],
        teacher_num_parameters=num_parameters(teacher_model), soft_targets=targets.summary(),
        max_concurrent_trials=concurrency,
    )
    # what precomputing saved: every trial epoch would otherwise have run the teacher over the transfer set
    epochs = sum(t["epochs_run"] for t in trials)
    res.soft_targets["teacher_passes_avoided"] = max(0, epochs - 1)
    csv_text, md_text = summary_table(trials)
    md_head = (f"# distillation sweep {run_name}\n\nsearch `{dc.search}`, scheduler `{dc.scheduler}`, "
               f"{len(trials)} trials, teacher val accuracy {teacher_val_acc:.4f} "
               f"({res.teacher_num_parameters} parameters)\n\nselection rule: {rule}\n\n"
               f"chosen: trial `{row['trial_id']}` {best_config}, val accuracy {res.best_val_accuracy:.4f}, "
               f"{row['num_parameters']} parameters\n\n")
    res.wall_seconds = round(time.perf_counter() - t_start, 2)
    try:
        res.summary_files = {"csv": _write_text(res.results_dir, "summary.csv", csv_text),
                             "markdown": _write_text(res.results_dir, "summary.md", md_head + md_text)}
        res.summary_files["json"] = _write_text(res.results_dir, "sweep_summary.json",
                                                json.dumps(res.summary(), indent=2, default=str))
    except OSError as err:  # the sweep's outcome does not depend on the browsable copy
        log.warning("distill: could not write the summary table under %s: %s", res.results_dir, err)
    log.info("distill: chose %s (%d parameters, val accuracy %.4f; teacher %.4f, %d parameters); Pareto front %s",
             best_config, row["num_parameters"], res.best_val_accuracy, teacher_val_acc, res.teacher_num_parameters,
             res.pareto)
    return res


def split_raw_columns(cfg: PipelineConfig, schema: DatasetSchema, split: str) -> dict[str, np.ndarray]:
    """Raw feature columns of a split by name (slice metrics need the values before preprocessing)."""
    table = read_split(cfg.data.root, split, [f.name for f in schema.features])
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
