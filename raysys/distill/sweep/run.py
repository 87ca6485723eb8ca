"""`run_sweep`: the distillation sweep from the teacher to the chosen student, step by step."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from raysys.config import PipelineConfig
from raysys.data import DatasetSchema, Preprocessor
from raysys.distill.kd import supports_hint
from raysys.distill.student_data import StudentData, load_student_data
from raysys.distill.sweep.results import (
    Candidate,
    SweepResult,
    chosen_weights,
    collect_trials,
    pareto_front,
    select_student,
    sweep_privacy,
    write_summaries,
)
from raysys.distill.sweep.trial import METRIC, distill_trial
from raysys.distill.sweep.tuner import experiment_path, make_scheduler, max_concurrent, new_tuner
from raysys.models import build_model, model_spec, num_parameters
from raysys.sigint import keep_sigint_handler

log = logging.getLogger(__name__)


@dataclass
class _Plan:
    """What the sweep runs: its name, the students' base spec, trials in total and at once, the scheduler."""

    run_name: str
    base_spec: dict[str, Any]
    hints: bool
    total_trials: int
    concurrency: int
    scheduler: Any


def _check_resumable(cfg: PipelineConfig, run_name: str | None) -> None:
    from ray import tune

    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise ValueError(f"distill resume: {run_name!r} is not a sweep name; name the interrupted sweep's "
                         f"directory under run_dir (e.g. distill-20261123-021500)")
    if not tune.Tuner.can_restore(experiment_path(cfg, run_name)):
        raise ValueError(f"distill resume: no sweep {run_name!r} to go on with under {cfg.run_dir} (run_dir); "
                         f"check the name, or start a new sweep")


def _uses_hints(cfg: PipelineConfig, base_spec: dict[str, Any], teacher_model: nn.Module) -> bool:
    dc = cfg.distill
    if dc.hint_weight > 0 and not (supports_hint(teacher_model)
                                   and type(build_model(base_spec)) is type(teacher_model)):
        log.warning("distill.hint_weight=%g ignored: the hint loss needs a student of the teacher's family "
                    "(%s) with body/head features", dc.hint_weight, type(teacher_model).__name__)
        return False
    return dc.hint_weight > 0


def _plan(cfg: PipelineConfig, run_name: str | None, base_spec: dict[str, Any], hints: bool) -> _Plan:
    dc = cfg.distill
    if dc.search != "grid":
        log.info("distill: search=%s samples temperature/alpha/lr/width/depth; temperatures, alphas, lr and "
                 "student.hidden_dims of the config are not used", dc.search)
    concurrency = max_concurrent(cfg)
    total_trials = len(dc.temperatures) * len(dc.alphas) if dc.search == "grid" else dc.num_samples
    scheduler = make_scheduler(dc.scheduler, dc.num_epochs, dc.grace_period, dc.reduction_factor,
                               variant=dc.asha_variant, num_trials=total_trials, max_concurrent=concurrency)
    return _Plan(run_name or f"distill-{time.strftime('%Y%m%d-%H%M%S')}", base_spec, hints, total_trials,
                 concurrency, scheduler)


def _log_start(cfg: PipelineConfig, plan: _Plan, data: StudentData, teacher_val_acc: float) -> None:
    dc = cfg.distill
    log.info("distill: %d train rows, %d val rows; teacher val accuracy %.4f; search %s (%s), scheduler %s, "
             "%d trials at once", len(data.y), len(data.val_y), teacher_val_acc, dc.search,
             f"{len(dc.temperatures)} x {len(dc.alphas)} grid" if dc.search == "grid" else f"{dc.num_samples} samples",
             dc.scheduler if dc.scheduler == "fifo" else f"asha ({dc.asha_variant})", plan.concurrency)


def trial_resources(dc) -> dict[str, float]:
    """What each trial reserves: one CPU, and `distill.gpus_per_trial` of a GPU when set."""
    return {"cpu": 1, **({"gpu": dc.gpus_per_trial} if dc.gpus_per_trial else {})}


def check_trial_gpus(dc, cluster: dict[str, float]) -> None:
    """ValueError naming distill.gpus_per_trial when the cluster (`ray.cluster_resources()`) cannot hold one trial's
    share, or the soft-target actors' (`distill.soft_target_actors` of them at once): Tune and Ray Data would
    otherwise wait for GPUs forever."""
    if not dc.gpus_per_trial:
        return
    have = float(cluster.get("GPU", 0.0))
    if have < dc.gpus_per_trial:
        raise ValueError(f"distill.gpus_per_trial: {dc.gpus_per_trial:g} of a GPU per trial, but this Ray cluster has "
                         f"{have:g} GPUs; set distill.gpus_per_trial: 0 (CPU trials) or join a cluster with GPU nodes")
    if have < dc.gpus_per_trial * dc.soft_target_actors:
        raise ValueError(f"distill.gpus_per_trial: {dc.soft_target_actors} soft-target actors (distill."
                         f"soft_target_actors) x {dc.gpus_per_trial:g} GPU need {dc.gpus_per_trial * dc.soft_target_actors:g}"
                         f" GPUs, but this Ray cluster has {have:g}; lower distill.soft_target_actors or gpus_per_trial")


def _tune(cfg: PipelineConfig, plan: _Plan, data: StudentData, resume: bool, callbacks: Sequence = ()):
    """Run (or go on with) the trials; Tune's ResultGrid."""
    from ray import tune

    dc = cfg.distill
    fixed = {"student_spec": plan.base_spec, "num_epochs": dc.num_epochs, "batch_size": dc.batch_size,
             "seed": dc.seed, "hint_weight": dc.hint_weight if plan.hints else 0.0,
             "dp": dc.dp.model_dump() if dc.dp is not None else None,
             # a trial paused at a rung goes on from that epoch's checkpoint when promoted
             "checkpoint_epochs": list(getattr(plan.scheduler, "rungs", [])),
             "device": "cuda" if dc.gpus_per_trial else "cpu"}
    trainable = tune.with_resources(tune.with_parameters(distill_trial, data=data, fixed=fixed), trial_resources(dc))
    if resume:
        # Tune's experiment state (its own pickled files in the run directory) brings back the search, the
        # scheduler and every trial; the trainable, which holds the data, is handed over again
        tuner = tune.Tuner.restore(experiment_path(cfg, plan.run_name), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
        log.info("distill: going on with sweep %s", plan.run_name)
    else:
        log.info("distill: sweep %s; if it is interrupted, `raysys distill --resume-sweep %s` goes on with it",
                 plan.run_name, plan.run_name)
        tuner = new_tuner(cfg, trainable, plan.scheduler, plan.concurrency, plan.total_trials, plan.run_name,
                          callbacks)
    with keep_sigint_handler(), warnings.catch_warnings():
        # a retried or resumed trial replays the epochs after its checkpoint; Optuna keeps the values it was
        # told first and warns about every replayed step
        warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=")
        return tuner.fit()


def _choose(cfg: PipelineConfig, plan: _Plan, trials: list[dict[str, Any]], candidates: list[Candidate],
            teacher_val_acc: float) -> tuple[SweepResult, Candidate]:
    """Mark the Pareto front, pick the student by the rule, and load its weights."""
    dc = cfg.distill
    rows = [cand.row for cand in candidates]
    for i in pareto_front(rows):
        rows[i]["pareto"] = True
    chosen, rule = select_student(rows, teacher_val_acc, dc.accuracy_gap)
    best = candidates[chosen]
    best.row["chosen"] = True
    best_config = {"temperature": best.row["temperature"], "alpha": best.row["alpha"], "lr": best.row["lr"],
                   "hidden_dims": list(best.spec["hidden_dims"])}
    res = SweepResult(
        best_config=best_config, best_val_accuracy=float(best.metrics[METRIC]), best_state_dict=chosen_weights(best),
        student_spec=best.spec, trials=trials, results_dir="", best_epoch=int(best.metrics.get("epoch", 0)),
        best_checkpoint_path=best.checkpoint.path, teacher_val_accuracy=teacher_val_acc, scheduler=dc.scheduler,
        search=dc.search, sweep_id=plan.run_name, selection_rule=rule,
        pareto=[str(r["trial_id"]) for r in rows if r["pareto"]], max_concurrent_trials=plan.concurrency,
        privacy=sweep_privacy(best, trials),
    )
    return res, best


def run_sweep(cfg: PipelineConfig, schema: DatasetSchema, preprocessor: Preprocessor, teacher_model: nn.Module,
              *, run_name: str | None = None, resume: bool = False, callbacks: Sequence = ()) -> SweepResult:
    """Distil `teacher_model` into students with Ray Tune (see raysys.distill.sweep for modes and the rule).

    Starts a local Ray when none is connected. Raises RuntimeError when every trial failed; a partial
    failure is logged and shown in `trials[*]["error"]`.
    `resume=True` goes on with the interrupted sweep `run_name` under `cfg.run_dir` (its driver died: a
    killed job, a lost head node): finished trials are kept, the others go on from their latest checkpoints,
    and the search continues from Tune's saved experiment state (Tune's own files, snapshotted about every
    10 s), promotion ASHA from its rungs saved with it (`asha.SchedulerState`; Tune's stopping ASHA starts
    afresh). The sweep keeps the search space and trial count it was started with; run it with the same config.
    `callbacks`: more Tune callbacks for a new sweep (an experiment logger, say), run in this driver beside
    raysys's progress log; a resumed sweep keeps those it was started with (Tune's saved state).
    """
    import ray

    t_start = time.perf_counter()
    if not ray.is_initialized():
        ray.init()
    check_trial_gpus(cfg.distill, ray.cluster_resources())
    if resume:
        _check_resumable(cfg, run_name)
    base_spec = model_spec(schema, cfg.distill.student)
    hints = _uses_hints(cfg, base_spec, teacher_model)
    data, t_val, targets = load_student_data(cfg, preprocessor, teacher_model, hints=hints)
    teacher_val_acc = float((t_val.argmax(1) == data.val_y).mean())
    plan = _plan(cfg, run_name, base_spec, hints)
    _log_start(cfg, plan, data, teacher_val_acc)
    grid = _tune(cfg, plan, data, resume, callbacks)

    trials, candidates = collect_trials(grid, base_spec, data.val_x_num, data.val_x_cat, cfg.distill.evaluation,
                                        cfg.distill.num_epochs)
    failed = [t for t in trials if t["error"]]
    if not candidates:
        raise RuntimeError(f"distill: no trial produced a checkpoint; errors: {[t['error'] for t in failed]}")
    if failed:
        log.warning("distill: %d of %d trials failed: %s", len(failed), len(trials), failed[0]["error"])
    res, best = _choose(cfg, plan, trials, candidates, teacher_val_acc)
    res.results_dir = grid.experiment_path
    res.teacher_num_parameters = num_parameters(teacher_model)
    res.soft_targets = targets.summary()
    # what precomputing saved: every trial epoch would otherwise have run the teacher over the transfer set
    res.soft_targets["teacher_passes_avoided"] = max(0, sum(t["epochs_run"] for t in trials) - 1)
    res.wall_seconds = round(time.perf_counter() - t_start, 2)
    try:
        write_summaries(res, best.row)
    except OSError as err:  # the sweep's outcome does not depend on the browsable copy
        log.warning("distill: could not write the summary table under %s: %s", res.results_dir, err)
    log.info("distill: chose %s (%d parameters, val accuracy %.4f; teacher %.4f, %d parameters); Pareto front %s",
             res.best_config, best.row["num_parameters"], res.best_val_accuracy, teacher_val_acc,
             res.teacher_num_parameters, res.pareto)
    return res
