"""The distillation sweep: a Ray Tune grid over temperature x alpha, one plain function trainable per trial.

Why plain function trainables and not Ray Train inside each trial: Tune over a nested Train run
deadlocks on a 2-CPU box when a scheduler stops a trial early (ray-project/ray#54305, reproduced on
Ray 2.60). A student is small enough to train in one process, so each trial is `fit_student` under one
CPU and one torch thread, and ASHA can stop trials freely.

The teacher runs once, in the driver: its logits on the training split are precomputed and shipped to
every trial through the object store (`tune.with_parameters`), so trials never load the teacher.
Every epoch reports `val_accuracy` and `val_loss`; an epoch that improves the trial's `val_accuracy` also
reports a checkpoint: the student's weights as `model.safetensors` (never pickle) plus a `meta.json`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysys.config import PipelineConfig
from raysys.data import DatasetSchema, Preprocessor, read_split
from raysys.distill.student import StudentData, fit_student
from raysys.models import build_model, model_spec, predict_logits

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
METRIC = "val_accuracy"
MODE = "max"


@dataclass
class SweepResult:
    """The outcome of `run_sweep`.

    best_config: `{"temperature": T, "alpha": a}` of the best trial.
    best_val_accuracy: validation accuracy of `best_state_dict` (the best epoch of the best trial:
        each trial keeps its best-scoring checkpoint, so this is early stopping on validation accuracy).
    best_state_dict: the student's weights, loaded from that checkpoint's safetensors file.
    student_spec: `raysys.models.model_spec` dict; `build_model(student_spec)` takes `best_state_dict`.
    trials: one dict per trial: `temperature`, `alpha`, the last reported metrics (`epoch`, `val_accuracy`,
        `val_loss`, `train_loss`, ...), `best_val_accuracy`, `epochs_run`, `stopped_early`, `error`, `path`.
    results_dir: the Tune experiment directory (under `cfg.run_dir`).
    """

    best_config: dict[str, float]
    best_val_accuracy: float
    best_state_dict: dict[str, torch.Tensor]
    student_spec: dict[str, Any]
    trials: list[dict[str, Any]]
    results_dir: str
    best_epoch: int = 0
    best_checkpoint_path: str = ""
    teacher_val_accuracy: float = float("nan")
    scheduler: str = "fifo"

    def summary(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-serialisable values."""
        return {
            "best_config": dict(self.best_config), "best_val_accuracy": self.best_val_accuracy,
            "best_epoch": self.best_epoch, "best_checkpoint_path": self.best_checkpoint_path,
            "teacher_val_accuracy": self.teacher_val_accuracy, "student_spec": dict(self.student_spec),
            "scheduler": self.scheduler, "trials": [dict(t) for t in self.trials],
            "results_dir": self.results_dir,
        }


def precompute_teacher_logits(teacher_model: nn.Module, x_num, x_cat, *, batch_size: int = 8192) -> np.ndarray:
    """The teacher's logits, float32 (n, classes), computed in eval mode in batches.

    The model's train/eval mode is restored afterwards so a caller that keeps training is unaffected.
    """
    was_training = teacher_model.training
    try:
        logits = predict_logits(teacher_model, x_num, x_cat, batch_size=batch_size)
    finally:
        teacher_model.train(was_training)
    return logits.detach().cpu().numpy().astype(np.float32, copy=False)


def load_student_data(cfg: PipelineConfig, preprocessor: Preprocessor, teacher_model: nn.Module
                      ) -> tuple[StudentData, np.ndarray]:
    """Train/validation arrays with the teacher's logits on the training rows.

    Returns `(data, teacher_val_logits)`; the latter only serves to report the teacher's own accuracy.
    """
    x_num, x_cat, y = preprocessor.transform_table(read_split(cfg.data.root, "train"))
    vx_num, vx_cat, vy = preprocessor.transform_table(read_split(cfg.data.root, "validation"))
    t_logits = precompute_teacher_logits(teacher_model, x_num, x_cat)
    t_val = precompute_teacher_logits(teacher_model, vx_num, vx_cat)
    data = StudentData(x_num=x_num, x_cat=x_cat, y=y, teacher_logits=t_logits,
                       val_x_num=vx_num, val_x_cat=vx_cat, val_y=vy)
    return data, t_val


def _storage_path(run_dir: str) -> str:
    # Tune needs an absolute local path (or a URI, which pyarrow.fs resolves on a cluster)
    if "://" in run_dir:
        return run_dir
    path = Path(run_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _distill_trial(config: dict[str, Any], data: StudentData, fixed: dict[str, Any]) -> None:
    """One Tune trial: a plain function trainable (see the module docstring for why not Ray Train)."""
    from ray import tune

    # a trial reserves one CPU; more intra-op threads would only fight the other trials for cores
    torch.set_num_threads(1)
    params = {**fixed, **config}
    best = [float("-inf")]

    def report(metrics: dict[str, Any], state_dict: dict[str, torch.Tensor] | None) -> None:
        # Metrics every epoch, a checkpoint only when val_accuracy improved: the sweep only ever wants
        # each trial's best epoch, and a checkpoint per epoch with num_to_keep=1 would force an
        # experiment-state snapshot on every report (Tune warns that this becomes a bottleneck).
        if state_dict is None or metrics[METRIC] <= best[0]:
            tune.report(metrics)
            return
        best[0] = metrics[METRIC]
        with tempfile.TemporaryDirectory(prefix="raysys-student-") as d:
            save_file(state_dict, os.path.join(d, WEIGHTS_FILE))
            meta = {"student_spec": params["student_spec"], "temperature": params["temperature"],
                    "alpha": params["alpha"], "metrics": metrics}
            Path(d, META_FILE).write_text(json.dumps(meta, indent=2))
            # report() copies the directory to the trial's storage before it returns
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    fit_student(params, data, report)


def _scheduler(name: str, num_epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if name == "fifo":
        return FIFOScheduler()
    if name == "asha":
        # metric/mode come from TuneConfig (setting them in both places is an error in Tune);
        # one report per epoch, so training_iteration counts epochs
        grace = 1 if num_epochs < 4 else 2
        return ASHAScheduler(time_attr="training_iteration", max_t=num_epochs, grace_period=grace,
                             reduction_factor=2)
    raise ValueError(f"distill.scheduler: unknown scheduler {name!r}; choose 'fifo' or 'asha'")


def _load_weights(checkpoint) -> dict[str, torch.Tensor]:
    with checkpoint.as_directory() as d:
        return load_file(os.path.join(d, WEIGHTS_FILE))


def run_sweep(cfg: PipelineConfig, schema: DatasetSchema, preprocessor: Preprocessor, teacher_model: nn.Module,
              *, run_name: str = "distill") -> SweepResult:
    """Distil `teacher_model` into students over `cfg.distill.temperatures` x `cfg.distill.alphas`.

    Starts a local Ray (Tune's default) when none is connected. Raises RuntimeError when every trial
    failed; a partial failure is logged and shown in `trials[*]["error"]`.
    """
    from ray import tune

    dc = cfg.distill
    spec = model_spec(schema, dc.student)
    data, t_val = load_student_data(cfg, preprocessor, teacher_model)
    teacher_val_acc = float((t_val.argmax(1) == data.val_y).mean())
    log.info("distill: %d train rows, %d val rows; teacher val accuracy %.4f; grid %d x %d, scheduler %s",
             len(data.y), len(data.val_y), teacher_val_acc, len(dc.temperatures), len(dc.alphas), dc.scheduler)

    fixed = {"student_spec": spec, "num_epochs": dc.num_epochs, "batch_size": dc.batch_size, "lr": dc.lr,
             "seed": dc.seed}
    trainable = tune.with_resources(tune.with_parameters(_distill_trial, data=data, fixed=fixed), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={"temperature": tune.grid_search(list(dc.temperatures)),
                     "alpha": tune.grid_search(list(dc.alphas))},
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, scheduler=_scheduler(dc.scheduler, dc.num_epochs),
                                    num_samples=1, max_concurrent_trials=dc.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=run_name, storage_path=_storage_path(cfg.run_dir), verbose=1,
            # trials checkpoint only on improvement (see _distill_trial), so all are kept: few and small
            checkpoint_config=tune.CheckpointConfig(checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
        ),
    )
    grid = tuner.fit()

    trials: list[dict[str, Any]] = []
    best = None  # (val_accuracy, -val_loss, checkpoint, metrics, config)
    for result in grid:
        conf = {"temperature": float(result.config["temperature"]), "alpha": float(result.config["alpha"])}
        last = {k: v for k, v in (result.metrics or {}).items()
                if k in ("epoch", "train_loss", "train_soft", "train_hard", "val_loss", "val_accuracy")}
        row: dict[str, Any] = {**conf, **last, "epochs_run": int(last.get("epoch", 0)),
                               "error": None if result.error is None else repr(result.error)[:500],
                               "path": result.path}
        row["stopped_early"] = result.error is None and row["epochs_run"] < dc.num_epochs
        ckpts = [(c, m) for c, m in (result.best_checkpoints or []) if METRIC in m]
        if ckpts:
            c, m = max(ckpts, key=lambda cm: (cm[1][METRIC], -cm[1].get("val_loss", 0.0)))
            row["best_val_accuracy"] = float(m[METRIC])
            key = (float(m[METRIC]), -float(m.get("val_loss", 0.0)))
            if best is None or key > best[0]:
                best = (key, c, m, conf)
        else:
            row["best_val_accuracy"] = None
        trials.append(row)
    trials.sort(key=lambda r: (r["temperature"], r["alpha"]))
    failed = [t for t in trials if t["error"]]
    if best is None:
        raise RuntimeError(f"distill: no trial produced a checkpoint; errors: {[t['error'] for t in failed]}")
    if failed:
        log.warning("distill: %d of %d trials failed: %s", len(failed), len(trials), failed[0]["error"])

    _, ckpt, metrics, conf = best
    state = _load_weights(ckpt)
    build_model(spec).load_state_dict(state)  # fail here, not in the registry, if the weights do not fit
    return SweepResult(best_config=conf, best_val_accuracy=float(metrics[METRIC]), best_state_dict=state,
                       student_spec=spec, trials=trials, results_dir=grid.experiment_path,
                       best_epoch=int(metrics.get("epoch", 0)), best_checkpoint_path=ckpt.path,
                       teacher_val_accuracy=teacher_val_acc, scheduler=dc.scheduler)
