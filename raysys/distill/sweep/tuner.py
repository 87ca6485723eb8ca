"""The Tune side of the sweep: scheduler, search algorithm and space, concurrency, and the `Tuner`.

Search modes (`DistillConfig.search`):

- `grid`: `temperatures` x `alphas` for the fixed `student` architecture and `lr` (the tiny preset, tests).
- `optuna`: `OptunaSearch` (TPE, seeded) over temperature (log), alpha, lr (log), student width and depth,
  `num_samples` trials, usually with the `asha` scheduler stopping the weak ones early: by default its promotion
  variant (raysys.distill.asha: a trial waits at each rung and goes on only in the top 1/reduction_factor of the
  trials recorded there), or Tune's own stopping `ASHAScheduler` (`distill.asha_variant: stopping`).
- `random`: the same space sampled at random (the full-budget baseline of benchmarks/sweep.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raysys.config import PipelineConfig
from raysys.distill.sweep.trial import METRIC, MODE

log = logging.getLogger(__name__)


def make_scheduler(name: str, num_epochs: int, grace_period: int = 1, reduction_factor: int = 3, *,
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


def search(cfg: PipelineConfig, concurrency: int, scheduler=None) -> tuple[dict[str, Any], Any, int]:
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


def max_concurrent(cfg: PipelineConfig) -> int:
    """`distill.max_concurrent_trials`, or `default_concurrency` for the connected cluster when unset."""
    import ray

    if cfg.distill.max_concurrent_trials is not None:
        return cfg.distill.max_concurrent_trials
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = len(nodes) == 1 and nodes[0].get("NodeID") == ray.get_runtime_context().get_node_id()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return default_concurrency(ray.cluster_resources().get("CPU", 1), single_local_node=local, host_cores=cores)


def storage_path(run_dir: str) -> str:
    # Tune needs an absolute local path (or a URI, which pyarrow.fs resolves on a cluster)
    if "://" in run_dir:
        return run_dir
    path = Path(run_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def experiment_path(cfg: PipelineConfig, run_name: str) -> str:
    """Where Tune keeps the sweep `run_name` (a local path or a URI)."""
    return f"{storage_path(cfg.run_dir).rstrip('/')}/{run_name}"


def _pause_callbacks(scheduler) -> list:
    from raysys.distill.asha import KeepResultsOnPause, PromotionASHA, SchedulerState

    return [KeepResultsOnPause(scheduler), SchedulerState(scheduler)] if isinstance(scheduler, PromotionASHA) else []


def new_tuner(cfg: PipelineConfig, trainable, scheduler, concurrency: int, total_trials: int, run_name: str,
              callbacks: Sequence = ()):
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter, Searcher

    from raysys.distill.sweep.progress import SweepProgress

    dc = cfg.distill
    space, search_alg, num_samples = search(cfg, concurrency, scheduler)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples,
                                    # generators and our limiter carry their own limit (see search)
                                    max_concurrent_trials=concurrency if isinstance(search_alg, Searcher) and not
                                    isinstance(search_alg, ConcurrencyLimiter) else None,
                                    # a new trial takes over a finished (or ASHA-stopped) trial's actor:
                                    # no process start, torch import or data fetch per trial
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=run_name, storage_path=storage_path(cfg.run_dir),
            # progress as one log line per trial (see progress.py); Tune's own tables with --verbose (DEBUG)
            verbose=1 if log.isEnabledFor(logging.DEBUG) else 0,
            callbacks=[SweepProgress(total_trials, dc.num_epochs, dc.max_trial_failures), *_pause_callbacks(scheduler),
                       *callbacks],
            # a failed trial (lost node, killed process) is retried from its latest checkpoint
            failure_config=tune.FailureConfig(max_failures=dc.max_trial_failures),
            # trials checkpoint only on improvement (see trial.py), so all are kept: few and small
            checkpoint_config=tune.CheckpointConfig(checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
        ),
    )
