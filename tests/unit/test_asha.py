"""Tier 1: the promotion ASHA scheduler's rules (raysys.distill.asha), driven through Tune's scheduler
interface without a cluster. Trials and the controller are stand-ins with only what a scheduler reads
(`trial_id`, `status`; `get_trials`, `stop_trial`); the real Tune run is in test_distill_ray.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from raysys.distill.asha import (
    KeepResultsOnPause,
    PauseAwareLimiter,
    PauseAwareSearchGenerator,
    PauseAwareVariantGenerator,
    PromotionASHA,
    SchedulerState,
    rung_epochs,
)

PAUSE, CONTINUE, STOP = TrialScheduler.PAUSE, TrialScheduler.CONTINUE, TrialScheduler.STOP


class Stand(SimpleNamespace):
    def set_status(self, status):
        self.status = status


class Controller:
    """What Tune's controller does for a scheduler: lists trials, stops one (PAUSED -> on_trial_remove)."""

    def __init__(self, sched):
        self.sched, self.trials, self.stopped = sched, [], []

    def get_trials(self):
        return self.trials

    def add(self, tid, status=Trial.RUNNING):
        t = Stand(trial_id=tid, status=status)
        self.trials.append(t)
        self.sched.on_trial_add(self, t)
        return t

    def stop_trial(self, trial):
        self.sched.on_trial_remove(self, trial)
        trial.status = Trial.TERMINATED
        self.stopped.append(trial.trial_id)

    def result(self, trial, it, acc):
        """One result; applies the decision to the trial's status as Tune would (a pause after its save)."""
        action = self.sched.on_trial_result(self, trial, {"training_iteration": it, "val_accuracy": acc})
        trial.status = {PAUSE: Trial.PAUSED, STOP: Trial.TERMINATED}.get(action, trial.status)
        return action

    def run_chosen(self):
        t = self.sched.choose_trial_to_run(self)
        if t is not None:
            t.status = Trial.RUNNING
        return t


def sched(num_trials=6, max_t=30, grace=2, rf=3, concurrent=2):
    s = PromotionASHA(max_t=max_t, grace_period=grace, reduction_factor=rf, num_trials=num_trials,
                      max_concurrent=concurrent)
    s.set_search_properties("val_accuracy", "max")
    return s, Controller(s)


def test_rungs():
    assert rung_epochs(30, 2, 3) == [2, 6, 18]
    assert rung_epochs(4, 1, 2) == [1, 2]
    assert rung_epochs(2, 2, 3) == []
    with pytest.raises(ValueError, match="reduction_factor"):
        rung_epochs(30, 2, 1)


def test_the_first_trial_at_a_rung_waits_where_tunes_stopping_asha_lets_it_go_on():
    s, c = sched()
    a = c.add("a")
    assert c.result(a, 1, 0.5) == CONTINUE  # not a rung
    assert c.result(a, 2, 0.5) == PAUSE  # nothing to compare with: it waits (1 recorded < rf)
    tune_asha = ASHAScheduler(time_attr="training_iteration", metric="val_accuracy", mode="max", max_t=30,
                              grace_period=2, reduction_factor=3)
    t = SimpleNamespace(trial_id="a")
    tune_asha.on_trial_add(None, t)
    assert tune_asha.on_trial_result(None, t, {"training_iteration": 2, "val_accuracy": 0.5}) == CONTINUE


def test_the_top_third_of_a_rung_is_promoted_before_new_trials_and_goes_on_from_the_rung():
    s, c = sched(num_trials=9)
    a, b, d = c.add("a"), c.add("b"), c.add("d")
    assert c.result(a, 2, 0.5) == PAUSE
    assert c.result(b, 2, 0.7) == PAUSE  # 2 recorded: floor(2/3) = 0 promotions
    c.add("e", Trial.PENDING)
    # the third makes one promotion: b (the best), which is paused; d's slot goes to b, so d waits
    assert c.result(d, 2, 0.6) == PAUSE
    assert s.promotion_waiting()
    assert c.run_chosen() is b  # before the pending trial e
    assert c.run_chosen() is None and not s.promotion_waiting()
    assert c.result(b, 3, 0.71) == CONTINUE and c.result(b, 5, 0.72) == CONTINUE
    assert c.result(b, 6, 0.73) == PAUSE  # alone at rung 6, and more trials to come
    e = c.trials[3]
    e.status = Trial.RUNNING
    f = c.add("f")
    assert c.result(e, 2, 0.4) == STOP  # three above it: a rung of at most 9 promotes at most 3
    # a later trial at rung 2 that is in the top goes on at once (its own slot)
    assert c.result(f, 2, 0.9) == CONTINUE  # 5 recorded: top 1 = f
    assert s.promoted[2] == {"b", "f"}


def test_a_trial_that_no_promotion_can_reach_is_stopped_and_paused_ones_too():
    s, c = sched(num_trials=6)  # a rung promotes at most floor(6 / 3) = 2
    a, b, d, e = (c.add(x) for x in "abde")
    assert c.result(a, 2, 0.1) == PAUSE
    assert c.result(b, 2, 0.8) == PAUSE
    assert c.result(d, 2, 0.9) == CONTINUE  # 3 recorded: top 1 = d, its own slot
    assert c.stopped == ["a"]  # b and d above it: it can never be promoted, and is stopped while paused
    assert c.result(e, 2, 0.05) == STOP  # three above it at once
    assert s.paused == {"b": 2}


def test_at_the_end_of_a_sweep_the_best_at_a_rung_goes_on_and_so_does_a_later_better_one():
    s, c = sched(num_trials=3, max_t=10, grace=2, rf=3)  # rungs 2, 6; a rung promotes at most 1
    a, b, d = c.add("a"), c.add("b"), c.add("d")  # every trial created: no new trial will take a free slot
    assert c.result(a, 2, 0.6) == CONTINUE  # the best at rung 2 and nobody went on from there
    assert c.result(b, 2, 0.5) == STOP  # a is above it
    assert c.result(d, 2, 0.9) == CONTINUE  # better than every trial that went on from rung 2
    assert c.result(d, 6, 0.92) == CONTINUE
    assert c.result(a, 6, 0.7) == STOP  # d is above it at rung 6
    assert c.result(d, 10, 0.93) == STOP  # max_t: done


def test_when_nothing_runs_any_more_the_waiting_trials_are_stopped_so_the_sweep_ends():
    s, c = sched(num_trials=4, max_t=8, grace=2, rf=2)  # rungs 2, 4; a rung promotes at most 2
    a, b = c.add("a"), c.add("b")
    assert c.result(a, 2, 0.5) == PAUSE  # more trials to come
    assert c.result(b, 2, 0.6) == CONTINUE  # top 1 of 2
    d, e = c.add("d"), c.add("e")
    assert c.result(b, 4, 0.7) == CONTINUE  # every trial created, b the first at rung 4
    assert c.result(d, 2, 0.4) == STOP  # a and b above it
    assert c.result(e, 2, 0.55) == CONTINUE  # top 2 of 4 (b went on already)
    assert c.stopped == ["a"]  # b and e above it
    assert c.result(e, 4, 0.65) == PAUSE  # b is above it at rung 4 and went on first
    assert c.result(b, 8, 0.8) == STOP
    b.status = Trial.TERMINATED
    assert c.run_chosen() is None
    assert c.stopped == ["a", "e"] and not s.paused


class Fixed(Searcher):
    def __init__(self):
        super().__init__(metric="val_accuracy", mode="max")
        self.n = 0

    def suggest(self, trial_id):
        self.n += 1
        return {"x": self.n}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def test_the_limiter_does_not_count_paused_trials_and_yields_to_promotions():
    s, c = sched(num_trials=9, concurrent=2)
    lim = PauseAwareLimiter(Fixed(), 2, s)
    assert lim.suggest("a") and lim.suggest("b")
    assert lim.suggest("x") is None  # two running
    a, b = c.add("a"), c.add("b")
    assert c.result(a, 2, 0.5) == PAUSE
    assert lim.suggest("d") == {"x": 3}  # a holds no slot
    d = c.add("d")
    assert lim.suggest("y") is None
    assert c.result(b, 2, 0.7) == PAUSE
    assert c.result(d, 2, 0.6) == PAUSE  # b is due: d's slot is b's
    assert lim.suggest("z") is None  # the free slots go to the promotion first
    assert c.run_chosen() is b
    assert lim.suggest("z") == {"x": 4}  # b running, a and d paused: one slot left


def _noop(config):
    pass


def test_the_variant_generator_counts_the_same_way():
    from ray import tune

    s, c = sched(num_trials=4, concurrent=1)
    gen = PauseAwareVariantGenerator(s, max_concurrent=1)
    gen.add_configurations({"sweep": {"run": _noop, "config": {"x": tune.grid_search([1, 2, 3, 4])}}})
    t1 = gen.next_trial()
    assert t1 is not None and gen.next_trial() is None
    a = c.add(t1.trial_id)
    assert c.result(a, 2, 0.5) == PAUSE
    assert gen.next_trial() is not None  # the paused trial holds no slot
    assert gen.get_state() and "scheduler" not in gen.get_state()


def test_a_paused_trials_result_files_are_uploaded_when_it_is_saved(tmp_path):
    # on resume Tune copies result.json and progress.csv back from storage; seen in a sweep: the rows since the
    # last periodic sync (epochs 12-18 of a trial paused at rung 18) were lost. The pause's save uploads them.
    import pyarrow.fs

    local, remote = tmp_path / "staging" / "trial", tmp_path / "storage" / "trial"
    local.mkdir(parents=True)
    remote.mkdir(parents=True)
    (local / "result.json").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (remote / "result.json").write_text('{"epoch": 1}\n')  # the last sync's copy
    (local / "progress.csv").write_text("epoch\n1\n2\n")
    trial = SimpleNamespace(trial_id="t", local_path=str(local), storage=SimpleNamespace(
        trial_fs_path=str(remote), storage_filesystem=pyarrow.fs.LocalFileSystem()))
    s, c = sched()
    keep = KeepResultsOnPause(s)
    keep.on_trial_save(iteration=1, trials=[trial], trial=trial)  # a checkpoint it reported: not a pause
    assert (remote / "result.json").read_text() == '{"epoch": 1}\n'
    s.paused["t"] = 2
    keep.on_trial_save(iteration=1, trials=[trial], trial=trial)
    assert (remote / "result.json").read_text() == (local / "result.json").read_text()
    assert (remote / "progress.csv").read_text() == "epoch\n1\n2\n"
    # storage that is the staging directory itself is left alone (copying a file onto itself truncates it)
    same = SimpleNamespace(trial_id="t", local_path=str(local), storage=SimpleNamespace(
        trial_fs_path=str(local), storage_filesystem=pyarrow.fs.LocalFileSystem()))
    keep.on_trial_save(iteration=1, trials=[same], trial=same)
    assert (local / "result.json").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_a_trial_found_dead_while_its_pause_is_still_saving_is_stopped_once_paused():
    # Tune marks a trial PAUSED only after the save its pause starts; a result of another trial can come first.
    # Forgetting it then left a PAUSED trial the scheduler would never resume or stop: a sweep that never ends.
    s, c = sched(num_trials=6)  # a rung promotes at most 2
    a, b, d = c.add("a"), c.add("b"), c.add("d")
    assert s.on_trial_result(c, a, {"training_iteration": 2, "val_accuracy": 0.1}) == PAUSE  # a: still RUNNING
    assert c.result(b, 2, 0.8) == PAUSE
    assert c.result(d, 2, 0.9) == CONTINUE  # a now has two above it: dead, but not yet PAUSED
    assert c.stopped == [] and "a" in s.paused
    a.status = Trial.PAUSED  # its save is through
    assert c.run_chosen() is not a
    assert c.stopped == ["a"] and "a" not in s.paused


def test_a_resumed_sweep_gets_its_rungs_back_and_its_waiting_trials_wait_again():
    # Tune saves callbacks' states with its experiment snapshots, not schedulers'. A fresh scheduler on resume
    # took every waiting trial (handed back PENDING, which Tune starts by itself) for a new one: trials paused
    # at a rung went on to the next before they were compared, and a rung's records were lost
    import json

    s, c = sched(num_trials=9)
    a, b, d = c.add("a"), c.add("b"), c.add("d")
    assert c.result(a, 2, 0.5) == PAUSE
    assert c.result(b, 2, 0.7) == PAUSE
    c.add("e", Trial.PENDING)
    assert c.result(d, 2, 0.6) == PAUSE
    assert c.run_chosen() is b  # promoted, then the driver dies before b runs (b is still PAUSED)
    b.status = Trial.PAUSED
    saved = json.loads(json.dumps(SchedulerState(s).get_state()))  # plain data

    s2, c2 = sched(num_trials=9)
    with pytest.raises(ValueError, match="rungs"):
        SchedulerState(sched(num_trials=9, grace=1)[0]).set_state(saved)
    SchedulerState(s2).set_state(saved)
    # Tune's resume: every unfinished trial comes back PENDING, re-added through on_trial_add
    back = {tid: c2.add(tid, Trial.PENDING) for tid in "abde"}
    assert {t: back[t].status for t in back} == {"a": Trial.PAUSED, "b": Trial.PAUSED, "d": Trial.PAUSED,
                                                 "e": Trial.PENDING}
    assert s2.recorded == s.recorded and s2.promoted == s.promoted == {2: {"b"}, 6: set(), 18: set()}
    assert c2.run_chosen() is back["b"]  # the promotion chosen before the crash, from its rung
    assert c2.run_chosen() is None  # b and the new trial e (Tune starts PENDING ones) fill both slots
    back["e"].status = Trial.RUNNING
    assert back["a"].status == back["d"].status == Trial.PAUSED  # they wait at rung 2
    assert c2.result(back["e"], 2, 0.65) == PAUSE  # 4 recorded at rung 2: still one promotion (b)
    assert c2.stopped == ["a"]  # the rung's records came back: b, e and d are above it, none can reach it now
    assert c2.result(back["b"], 3, 0.71) == CONTINUE and {t: s2.paused[t] for t in "de"} == {"d": 2, "e": 2}


def test_a_promotion_tune_is_starting_is_no_new_trial_for_the_end_rule():
    # Tune stages a chosen trial as PENDING until its actor runs; the end rule (no new trial left to start) took
    # it for a new trial, so the best trial at the top rung paused (a checkpoint round trip) instead of going on
    s, c = sched(num_trials=3, max_t=10, grace=2, rf=3)  # rungs 2, 6; every trial created below
    a, b, _ = c.add("a"), c.add("b"), c.add("d")
    s.recorded[2] = {"a": 0.6, "b": 0.7, "d": 0.5}
    s.promoted[2] = {"a", "b"}
    s.paused, s.resuming = {"b": 2}, {"b"}  # b was paused at rung 2 and is going on again...
    b.status = Trial.PENDING  # ...staged by Tune until its actor runs
    assert c.result(a, 6, 0.8) == CONTINUE  # alone at rung 6 with no new trial left: it goes on


def test_the_search_is_not_finished_while_a_trial_waits_at_a_rung():
    # Tune keeps a stopped trial's actor for the next one only while the search is not finished: at the end of a
    # sweep every promotion started a new actor (a process start and torch import, ~2 s)
    from ray import tune

    s, c = sched(num_trials=3, concurrent=1)
    gen = PauseAwareVariantGenerator(s, max_concurrent=1)
    gen.add_configurations({"sweep": {"run": _noop, "config": {"x": tune.grid_search([1, 2, 3])}}})
    t1 = gen.next_trial()
    a = c.add(t1.trial_id)
    assert c.result(a, 2, 0.5) == PAUSE
    for _ in range(2):
        t = gen.next_trial()
        assert t is not None
        gen.on_trial_complete(t.trial_id)
    assert gen.next_trial() is None  # the grid is exhausted...
    assert not gen.is_finished()  # ...but a waits at rung 2
    s.on_trial_remove(c, a)
    assert gen.next_trial() is None and gen.is_finished()

    s, c = sched(num_trials=1, concurrent=1)
    sg = PauseAwareSearchGenerator(PauseAwareLimiter(Fixed(), 1, s), s)
    sg.add_configurations({"sweep": {"run": _noop, "num_samples": 1, "config": {}}})
    t = sg.next_trial()
    assert t is not None and t.config == {"x": 1}
    a = c.add(t.trial_id)
    assert c.result(a, 2, 0.5) == CONTINUE  # the only trial: the end rule lets it go on
    s.paused["a"] = 2  # say it waits at a rung
    assert not sg.is_finished()
    assert sg.next_trial() is None and sg.searcher.searcher.n == 1  # and no sample beyond num_samples
    s.paused.clear()
    assert sg.is_finished()


def test_at_a_rung_the_sweep_cannot_fill_the_best_goes_on_at_once():
    # 12 trials, reduction factor 3, rungs 1, 3, 9, 27 of 30: about 12, 4, 1.3 and 0.4 trials reach them, so
    # rungs 9 and 27 never have the 3 results that make a promotion. The best at such a rung goes on at once
    # (before, it waited for the end of the sweep and then ran its 21 epochs alone); a later arrival goes on
    # only when it beats every trial that went on from there
    s, c = sched(num_trials=12, max_t=30, grace=1, rf=3)
    a, b = c.add("a"), c.add("b")
    assert c.result(a, 3, 0.7) == PAUSE  # rung 3 is fillable (12 >= 9): a waits for its top third
    s.recorded[3].update({"x": 0.5, "y": 0.4})
    assert c.result(b, 3, 0.8) == CONTINUE  # top 1 of 4 at rung 3
    assert c.result(b, 9, 0.82) == CONTINUE  # alone at rung 9 and more trials to come: it goes on
    assert s.promoted[9] == {"b"}
    assert c.result(b, 27, 0.84) == CONTINUE
    d = c.add("d")
    assert c.result(d, 9, 0.81) == PAUSE  # below b, which went on from rung 9
    e = c.add("e")
    assert c.result(e, 9, 0.83) == CONTINUE  # beats b at rung 9
    assert s.promoted[9] == {"b", "e"} and s.paused == {"a": 3, "d": 9}
