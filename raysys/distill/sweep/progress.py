"""The sweep's console progress: one log line per finished (or retried) trial and a status line at most
every `every_s` seconds (the first at once), in place of Tune's console tables (a result table per trial: ~20 lines each,
thousands for a real sweep)."""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

from raysys.distill.sweep.trial import METRIC

log = logging.getLogger(__name__)


class SweepProgress(Callback):
    def __init__(self, total: int, num_epochs: int, max_failures: int, every_s: float = 30.0):
        self.total, self.num_epochs, self.max_failures, self.every_s = total, num_epochs, max_failures, every_s
        self.t0 = time.monotonic()
        self.last = self.t0 - every_s  # the first step logs the status line: the sweep's size, at once
        self.best: dict[str, float] = {}  # trial id -> best val_accuracy so far

    @staticmethod
    def _epochs(trial) -> int:
        return int((trial.last_result or {}).get("training_iteration", 0))

    def _best(self) -> str:
        return f"{max(self.best.values()):.4f}" if self.best else "-"

    @staticmethod
    def _done(trials, trial=None) -> int:
        # counted from the trials, not by this callback: a resumed sweep starts with some already done
        return sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + (trial is not None)

    def _finished(self, trials, trial, how: str) -> None:
        conf = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        acc = self.best.get(trial.trial_id)
        log.info("distill: trial %d/%d %s %s after %d/%d epochs, best val_accuracy %s (sweep best %s; %.0fs) "
                 "[%s]", self._done(trials, trial), self.total, trial.trial_id, how, self._epochs(trial),
                 self.num_epochs, "-" if acc is None else f"{acc:.4f}", self._best(), time.monotonic() - self.t0,
                 conf, extra=self._progress(self._done(trials, trial)))

    def _progress(self, done: int) -> dict:
        """`extra=` for the CLI's progress bar of the distill stage (raysys.cli.progress): trials done."""
        return {"raysys_progress": {"task": "distill", "event": "advance", "completed": done, "total": self.total}}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get(METRIC) is not None:
            self.best[trial.trial_id] = max(self.best.get(trial.trial_id, float("-inf")), float(result[METRIC]))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finished(trials, trial, "finished" if self._epochs(trial) >= self.num_epochs else "stopped early")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finished(trials, trial, "FAILED")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        log.warning("distill: trial %s failed after %d epochs (failure %d of at most %d retried); retrying "
                    "it from its latest checkpoint", trial.trial_id, self._epochs(trial), trial.num_failures,
                    self.max_failures)

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            running = sum(t.status == "RUNNING" for t in trials)
            log.info("distill: %d/%d trials done, %d running; sweep best val_accuracy %s (%.0fs)",
                     self._done(trials), self.total, running, self._best(), now - self.t0,
                     extra=self._progress(self._done(trials)))
