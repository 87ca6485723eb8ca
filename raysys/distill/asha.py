"""ASHA that promotes (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning", Algorithm 2)
as a Ray Tune scheduler, for sweeps of a few dozen trials on a few CPUs.

Tune's `ASHAScheduler` is the *stopping* variant: a trial reaching a rung goes on unless it is below the top
1/reduction_factor of the results already recorded there. The first trial at a rung has nothing to be compared
with and always goes on; the second goes on when it beats the first, so in a small sweep run a few trials at a
time many trials run the full budget (benchmarks/sweep.py measures the epochs spent). The issue is known upstream
(ray-project/ray#4401, #32634; Syne Tune offers both variants as `type="stopping"` and `type="promotion"`).

The *promotion* variant pauses every trial at each rung (its checkpoint at that epoch is kept) and resumes a
paused one only when it is in the top `floor(n / reduction_factor)` of the `n` trials recorded at its rung;
a free slot goes to such a promotion before a new trial. At a rung the sweep is too small to fill (fewer than
`reduction_factor` trials expected there: num_trials < reduction_factor**(k+1) at the k-th rung), and at any
rung once no new trial is left to start, a paused trial that beats every trial promoted from its rung goes on
(so the sweep's best candidate is not left short of the budget because the sweep was too small to fill a rung,
and its long run overlaps the rest of the sweep instead of running alone at its end); once nothing runs, the
rest are stopped. A trial that can no longer be promoted (enough trials recorded above it) is stopped at once,
so the search learns its value. On recorded learning curves this spends about half the epochs of the stopping
variant for the same best accuracy.

What it needs from the trainable: a checkpoint at every rung epoch (`rung_epochs`), reported with that
epoch's result, which Tune hands back on resume (`tune.get_checkpoint()`). Concurrency: paused trials hold no
CPU, so the searcher is limited by `PauseAwareLimiter`, which does not count them (Tune's
`ConcurrencyLimiter` would: with every trial paused at a half-filled rung it would suggest nothing more).
Tune does not save a scheduler with its experiment state; `SchedulerState`, a Tune callback, saves this one's
rungs with Tune's experiment snapshots and puts them back when the sweep is resumed (`Tuner.restore`), so a
trial that waited at a rung waits there again instead of going on to its next rung as if it were new.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher, SearchGenerator

log = logging.getLogger(__name__)


def rung_epochs(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The rungs below `max_t`: grace_period * reduction_factor**k."""
    if grace_period < 1 or reduction_factor < 2 or max_t < 1:
        raise ValueError(f"ASHA: grace_period >= 1, reduction_factor >= 2 and max_t >= 1 are required (got "
                         f"{grace_period}, {reduction_factor}, {max_t})")
    out, r = [], grace_period
    while r < max_t:
        out.append(r)
        r *= reduction_factor
    return out


class PromotionASHA(FIFOScheduler):
    """Asynchronous successive halving, promotion variant (see the module docstring).

    max_t: the full budget in `time_attr` units (epochs); grace_period: the first rung; reduction_factor: 1 in
    `reduction_factor` trials of a rung goes on; num_trials: trials the sweep will create (the end of the
    sweep is when all exist and none runs); max_concurrent: trials running at once.
    """

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: int, num_trials: int,
                 max_concurrent: int, time_attr: str = "training_iteration", metric: str | None = None,
                 mode: str | None = None):
        super().__init__()
        if num_trials < 1 or max_concurrent < 1:
            raise ValueError(f"ASHA: num_trials and max_concurrent must be >= 1 (got {num_trials}, {max_concurrent})")
        self.rungs = rung_epochs(max_t, grace_period, reduction_factor)
        self.max_t, self.rf, self.num_trials, self.max_concurrent = max_t, reduction_factor, num_trials, max_concurrent
        self.time_attr = time_attr
        self._metric, self._mode = metric, mode
        self.recorded: dict[int, dict[str, float]] = {r: {} for r in self.rungs}  # rung -> trial id -> score
        self.promoted: dict[int, set[str]] = {r: set() for r in self.rungs}  # went on from that rung
        self.paused: dict[str, int] = {}  # trial id -> the rung it waits at
        self.resuming: set[str] = set()  # chosen to go on, not yet running
        self.doomed: set[str] = set()  # to stop as soon as its pause is through (it was still saving)
        self._trials: dict[str, Trial] = {}
        # promotions a rung can ever make, at most: floor(num_trials / rf), at least 1 (the end-of-sweep rule).
        # Looser than floor(trials that can reach the rung / rf) above the first rung, on purpose: a promoted
        # trial that later drops out of its rung's top lets another in, so higher rungs can get a few more
        self.capacity = max(1, num_trials // reduction_factor)

    # Tune wiring --------------------------------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if not self._metric or self._mode not in ("min", "max"):
            raise ValueError("PromotionASHA: metric and mode (max or min) are required; pass them to "
                             "tune.TuneConfig(metric=..., mode=...)")
        self._trials[trial.trial_id] = trial
        if trial.trial_id in self.paused and trial.status == Trial.PENDING:
            # a resumed sweep hands every unfinished trial back PENDING, and Tune starts PENDING trials by itself;
            # one that waited at a rung waits there again (Tune files it by this status right after this call)
            trial.set_status(Trial.PAUSED)

    def _score(self, result: dict[str, Any]) -> float | None:
        v = result.get(self._metric)
        if v is None or not math.isfinite(float(v)):
            return None
        return float(v) if self._mode == "max" else -float(v)

    def _top(self, rung: int) -> list[str]:
        rec = self.recorded[rung]
        return sorted(rec, key=lambda t: -rec[t])[:len(rec) // self.rf]

    def _dead(self, tid: str, rung: int) -> bool:
        """No promotion can reach it: at least `capacity` trials scored better at its rung."""
        rec = self.recorded[rung]
        return sum(v > rec[tid] for v in rec.values()) >= self.capacity

    def _due(self, rung: int) -> str | None:
        """A trial paused at `rung`, in its top and not promoted from it yet."""
        for tid in self._top(rung):
            if self.paused.get(tid) == rung and tid not in self.promoted[rung] and tid not in self.doomed:
                return tid
        return None

    def _promotable(self) -> tuple[str, int] | None:
        """A paused trial in the top of its rung, highest rung first (the paper's order)."""
        for rung in reversed(self.rungs):
            if (tid := self._due(rung)) is not None:
                return tid, rung
        return None

    def get_state(self) -> dict[str, Any]:
        """The rungs as plain data (trial ids, scores), for Tune's experiment snapshots (`SchedulerState`)."""
        return {"rungs": list(self.rungs),
                "recorded": {str(r): dict(v) for r, v in self.recorded.items()},
                "promoted": {str(r): sorted(v) for r, v in self.promoted.items()},
                "paused": dict(self.paused), "resuming": sorted(self.resuming), "doomed": sorted(self.doomed)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Back to a saved `get_state()`, before Tune re-adds the restored trials. A trial that was chosen to go
        on stays chosen; one found dead while saving is stopped at the first chance."""
        if list(state["rungs"]) != self.rungs:
            raise ValueError(f"PromotionASHA: the saved sweep has rungs {state['rungs']}, this scheduler "
                             f"{self.rungs}; resume it with the config it was started with")
        self.recorded = {r: {t: float(v) for t, v in state["recorded"][str(r)].items()} for r in self.rungs}
        self.promoted = {r: set(state["promoted"][str(r)]) for r in self.rungs}
        self.paused = {t: int(r) for t, r in state["paused"].items()}
        self.resuming, self.doomed = set(state["resuming"]), set(state["doomed"])

    def promotion_waiting(self) -> bool:
        """A paused trial is due to go on and has no slot yet (it gets the next free one, before a new trial)."""
        return self._promotable() is not None

    def may_resume(self) -> bool:
        """A trial waits at a rung and may still go on."""
        return any(tid not in self.doomed for tid in self.paused)

    def holds_no_slot(self, trial_id: str) -> bool:
        """Paused at a rung and not chosen to go on: it holds no CPU."""
        return trial_id in self.paused and trial_id not in self.resuming

    def on_trial_result(self, tune_controller, trial: Trial, result: dict[str, Any]) -> str:
        tid = trial.trial_id
        t = result.get(self.time_attr)
        if t is None:
            return TrialScheduler.CONTINUE
        t = int(t)
        self.resuming.discard(tid)
        self.paused.pop(tid, None)
        if t >= self.max_t:
            return TrialScheduler.STOP
        score = self._score(result)
        if t not in self.recorded or tid in self.recorded[t] or score is None:
            # not a rung, or a rung it passed before (a retried trial replays epochs after its checkpoint);
            # a trial without a finite score is not ranked (a diverged one fails by itself)
            return TrialScheduler.CONTINUE
        self.recorded[t][tid] = score
        self._stop_dead(tune_controller, t)
        if self._dead(tid, t):
            return TrialScheduler.STOP
        # its slot is free: does the trial itself get it (the paper's get_job), or does it wait at the rung?
        self.paused[tid] = t
        if self._next(tune_controller) == (tid, t):
            del self.paused[tid]
            self._promote(tid, t)
            return TrialScheduler.CONTINUE
        return TrialScheduler.PAUSE

    def _unfillable(self, rung: int) -> bool:
        """Fewer than `rf` trials of this sweep are expected at `rung` (num_trials / rf**k at the k-th rung), so
        its top 1/rf would stay empty: no trial there would go on before the end of the sweep."""
        return self.num_trials < self.rf ** (self.rungs.index(rung) + 1)

    def _next(self, tune_controller) -> tuple[str, int] | None:
        """The paused trial a free slot should resume, highest rung first (the paper's order): one in the top of
        its rung; at the end of the sweep (every trial created, none pending), and at any time at a rung this
        sweep is too small to fill, also the best paused trial of a rung when it beats every trial that went on
        from there (the first one at such a rung, or a later, better arrival). Without the second case the
        sweep's longest run (its best trial from the last fillable rung to max_t) started only once every
        trial had been created, and ran alone at the end. Decided as soon as a slot is free, so that the longest
        run left starts as early as it can."""
        trials = tune_controller.get_trials()
        # a PENDING trial that waited at a rung is a promotion Tune is starting, not a new trial
        end = len(trials) >= self.num_trials and not any(
            t.status == Trial.PENDING and t.trial_id not in self.paused for t in trials)
        for rung in reversed(self.rungs):
            if (tid := self._due(rung)) is not None:
                return tid, rung
            waiting = [tid for tid, r in self.paused.items()
                       if r == rung and tid not in self.resuming and tid not in self.doomed]
            if waiting and (end or self._unfillable(rung)):
                rec = self.recorded[rung]
                best = max(waiting, key=lambda t: rec[t])
                if all(rec[best] > rec[t] for t in self.promoted[rung]):
                    return best, rung
        return None

    def _stop_dead(self, tune_controller, rung: int) -> None:
        for tid, r in list(self.paused.items()):
            if r == rung and tid not in self.resuming and tid not in self.doomed and self._dead(tid, rung):
                self._stop(tune_controller, tid)

    def _stop(self, tune_controller, tid: str) -> None:
        trial = self._trials.get(tid)
        if trial is None:
            self.paused.pop(tid, None)
        elif trial.status == Trial.PAUSED:
            self.paused.pop(tid, None)
            self.doomed.discard(tid)
            # the searcher is told the trial ended without a final result: Optuna records it as pruned, with
            # the intermediate values it was sent
            tune_controller.stop_trial(trial)
        else:
            # its pause is still saving the checkpoint (Tune marks it PAUSED after that): a PAUSED trial this
            # scheduler forgot would never run or stop, and the sweep would never end
            self.doomed.add(tid)

    def _forget(self, trial: Trial) -> None:
        self.paused.pop(trial.trial_id, None)
        self.resuming.discard(trial.trial_id)
        self.doomed.discard(trial.trial_id)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict[str, Any]) -> None:
        self._forget(trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._forget(trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._forget(trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        for tid in list(self.doomed):
            self._stop(tune_controller, tid)
        trials = tune_controller.get_trials()
        for tid in self.resuming:  # idempotent: the trial chosen before, until it runs
            trial = self._trials.get(tid)
            if trial is not None and trial.status == Trial.PAUSED:
                return trial
        running = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials)
        if running >= self.max_concurrent:
            return None
        chosen = self._next(tune_controller)
        if chosen is not None:
            tid, rung = chosen
            if self._trials[tid].status != Trial.PAUSED:  # still saving its checkpoint: next time
                return None
            return self._resume(tid, rung)
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        if not running and len(trials) >= self.num_trials:
            # the end: nothing runs and no trial is left to create or promote
            for tid in list(self.paused):
                self._stop(tune_controller, tid)
        return None

    def _promote(self, tid: str, rung: int) -> None:
        if tid not in self._top(rung):
            log.info("distill: ASHA: %s; %s, the best at rung %d that none of the %d recorded there beat, goes on",
                     f"a sweep of {self.num_trials} trials does not fill rung {rung}" if self._unfillable(rung)
                     else "no new trial left to start", tid, rung, len(self.recorded[rung]))
        self.promoted[rung].add(tid)

    def _resume(self, tid: str, rung: int) -> Trial:
        self._promote(tid, rung)
        self.resuming.add(tid)
        return self._trials[tid]

    def debug_string(self) -> str:
        rungs = ", ".join(f"{r}: {len(self.recorded[r])} recorded, {len(self.promoted[r])} promoted"
                          for r in self.rungs)
        return f"Using promotion ASHA ({rungs}; {len(self.paused)} paused)"


class PauseAwareLimiter(ConcurrencyLimiter):
    """Tune's `ConcurrencyLimiter`, not counting the trials `scheduler` paused at a rung (they hold no CPU), and
    suggesting nothing while a paused trial is due to go on (the free slot is its)."""

    def __init__(self, searcher: Searcher, max_concurrent: int, scheduler: PromotionASHA):
        super().__init__(searcher, max_concurrent)
        self.scheduler = scheduler

    def suggest(self, trial_id: str) -> dict | None:
        if self.scheduler.promotion_waiting():
            return None
        running = [t for t in self.live_trials if not self.scheduler.holds_no_slot(t)]
        if len(running) >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["scheduler"]  # the scheduler holds Trial objects; it is not part of the searcher's state
        del state["searcher"]
        return copy.deepcopy(state)


class PauseAwareSearchGenerator(SearchGenerator):
    """Tune's wrapper of a `Searcher`, not finished while `scheduler` has a trial waiting at a rung.

    Tune keeps a stopped or paused trial's actor for the next trial only while the search is not finished; once
    the last trial is created, every promotion (and every trial a waiting one follows) started a new actor: a
    process start and torch import, ~2 s on a slot, several times at the end of a sweep."""

    def __init__(self, searcher: Searcher, scheduler: PromotionASHA):
        super().__init__(searcher)
        self.scheduler = scheduler

    def next_trial(self):
        return None if super().is_finished() else super().next_trial()  # no samples beyond num_samples

    def is_finished(self) -> bool:
        return super().is_finished() and not self.scheduler.may_resume()


class PauseAwareVariantGenerator(BasicVariantGenerator):
    """Tune's grid/random `BasicVariantGenerator` with `max_concurrent` counted as `PauseAwareLimiter` counts,
    and not finished while a trial waits at a rung (see `PauseAwareSearchGenerator`)."""

    def __init__(self, scheduler: PromotionASHA, **kwargs):
        super().__init__(**kwargs)
        self.scheduler = scheduler

    def next_trial(self):
        if self.scheduler.promotion_waiting():
            return None
        idle = {t for t in self._live_trials if self.scheduler.holds_no_slot(t)}
        self._live_trials -= idle
        try:
            return super().next_trial()
        finally:
            self._live_trials |= idle

    def is_finished(self) -> bool:
        return super().is_finished() and not self.scheduler.may_resume()

    def get_state(self):
        state = super().get_state()
        if state:
            state.pop("scheduler", None)  # Tune's state for the generator; the scheduler is not part of it
        return state


class SchedulerState(Callback):
    """Saves `scheduler`'s rungs with Tune's experiment snapshots (Tune saves callbacks' states, not schedulers')
    and puts them back when the sweep is resumed. The scheduler and this callback are pickled together in the
    Tuner's own state, so the restored callback holds the restored scheduler."""

    def __init__(self, scheduler: PromotionASHA):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"promotion_asha": self.scheduler.get_state()}

    def set_state(self, state: dict) -> None:
        self.scheduler.set_state(state["promotion_asha"])
        log.info("distill: ASHA: rungs restored (%s)", self.scheduler.debug_string())


class KeepResultsOnPause(Callback):
    """Uploads a trial's result.json and progress.csv when it is saved for a pause.

    When a trial starts again from a checkpoint, Tune's JSON and CSV loggers copy those two files back from the
    storage path (`LoggerCallback._restore_from_remote`), which the driver syncs only every few minutes: every
    row between the last sync and the pause was lost (seen: epochs 12-18 of a trial paused at rung 18)."""

    FILES = ("result.json", "progress.csv")

    def __init__(self, scheduler: PromotionASHA):
        self.scheduler = scheduler

    def on_trial_save(self, iteration: int, trials: list, trial: Trial, **info) -> None:
        import pyarrow.fs

        # Tune calls this for every checkpoint a trial reports too; only a pause restarts the trial
        if trial.trial_id not in self.scheduler.paused:
            return
        storage = trial.storage
        for name in self.FILES:
            local = Path(trial.local_path, name)
            remote = Path(storage.trial_fs_path, name).as_posix()
            if not local.is_file() or (isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem)
                                       and Path(remote).resolve() == local.resolve()):
                continue
            try:
                pyarrow.fs.copy_files(local.as_posix(), remote, destination_filesystem=storage.storage_filesystem)
            except OSError as err:  # the trial goes on; only the browsable copy may lag
                log.warning("distill: could not upload %s of trial %s before its pause: %s", name, trial.trial_id,
                            err)
