"""Tier 1 (no Ray): the metric-gated canary end to end over real pieces: real registered versions scored by
the endpoint's own request path (`StudentEndpoint.predict_response` without Serve), its monitor buffer
shipped to a real `Monitor`, whose report the gate reads; the rollout goes through `serve.rollout` against
a fake Serve admin and a real registry. A candidate that fails on some inputs, one that is slower, and one
that disagrees with stable are rolled back naming the failed check; a good one is promoted. Then the
rollouts that heal: a promotion cut between the Serve update and the alias move is finished by the next
command, and a gated canary whose owner died is stopped."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch
from helpers.rollout import APP, MODEL, FakeAdmin, FakeRequest, RaisesOnPositiveFirstFeature

from raysys.config import CanaryConfig, DataConfig, ModelConfig
from raysys.data import Preprocessor, SyntheticTask
from raysys.models import build_model, model_spec
from raysys.monitor.core import Monitor
from raysys.monitor.profile import ReferenceProfile
from raysys.monitor.versions import VersionFigures
from raysys.registry import Registry
from serve import rollout
from serve.canary import run_canary
from serve.endpoint import Versions
from serve.gate import VersionCounts, evaluate
from serve.monitor_link import MonitorBuffer, MonitorLink
from serve.parsing import RequestIds
from serve.rollout_state import RolloutJournal, RolloutLease
from serve.scoring import Agreement, GroupStats, Scorer, score_requests


@pytest.fixture()
def world(tmp_path):
    """A registry with v1 (production), v2 (v1's weights), v3 (other weights); rows; a real Monitor."""
    cfg = DataConfig(num_numeric=4, num_categorical=2, num_categories=3, num_classes=3, seed=5)
    task = SyntheticTask(cfg)
    schema = task.schema()
    table = task.sample(600, [5, 1])
    pre = Preprocessor.fit(schema, table)
    profile = ReferenceProfile.from_table(schema, table, num_bins=10).to_dict()
    spec = model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3))
    reg = Registry(tmp_path / "registry")
    torch.manual_seed(1)
    v1 = build_model(spec).state_dict()
    torch.manual_seed(7)
    v3 = build_model(spec).state_dict()
    with torch.no_grad():  # v3 strongly prefers one class: it disagrees with v1 on most rows
        v3[[k for k in v3 if k.endswith("bias")][-1]][0] += 50.0
    for sd in (v1, v1, v3):
        reg.register(MODEL, state_dict=sd, model_spec=spec, schema=schema, preprocessor=pre, metrics={}, config={},
                     lineage={}, reference_profile=profile)
    reg.set_alias(MODEL, "production", 1)
    rows = table.drop_columns([schema.label]).to_pylist()
    monitor = Monitor(profile, None, {"window_size": 200, "min_rows": 50}, model_version=1)
    return reg, rows, monitor


class _Always(torch.nn.Module):
    def forward(self, x_num, x_cat):
        raise RuntimeError("boom")


class _Slow(torch.nn.Module):
    """The same answers for more CPU: a busy loop (sleeping would cost no CPU time, which the gate measures)."""

    def __init__(self, inner, seconds):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x_num, x_cat):
        end = time.thread_time() + self.seconds
        while time.thread_time() < end:
            pass
        return self.inner(x_num, x_cat)


class Traffic:
    """The endpoint's request path (the StudentEndpoint class without Serve) over the versions the fake
    admin's user_config names, as `reconfigure` would set them; its monitor buffer ships to `monitor`."""

    def __init__(self, reg: Registry, rows: list, monitor: Monitor, admin: FakeAdmin, wrap=None):
        from raysys.config import ServeConfig
        from serve.endpoint import StudentEndpoint

        cls = next(c for c in StudentEndpoint.func_or_class.__mro__ if "_predict" in vars(c))
        self.ep = ep = cls.__new__(cls)
        ep.serve_cfg, ep._api_token = ServeConfig(), None
        ep._request_ids, ep.max_batch_size = RequestIds(), 64
        ep.batches = ep.batched_requests = ep.max_requests_per_batch = 0
        ep.monitor = MonitorLink(lambda: None, buffer=MonitorBuffer())
        ep._monitor_sync_task = "not started"
        self.rows, self.monitor, self.admin, self.reg = rows, monitor, admin, reg
        self.scorers = {v: Scorer.from_loaded(reg.load(MODEL, v)) for v in reg.list_versions(MODEL)}
        self.wrap = wrap or {}
        self.sent = 0
        ep._score_batched = lambda item: asyncio.sleep(0, ep._score([item])[0])  # @serve.batch needs a replica

    def _versions(self) -> Versions:
        user = self.admin.deployed()
        stable = self.scorers[self.reg.resolve(MODEL, user["model_ref"])]
        cand = None
        if user.get("candidate_ref"):
            cand = self.scorers[self.reg.resolve(MODEL, user["candidate_ref"])]
            if cand.version in self.wrap:
                cand = Scorer(cand.name, cand.version, self.wrap[cand.version](cand.model), cand.schema,
                              cand.preprocessor)
        return Versions(stable, cand, float(user.get("canary_percent") or 0), bool(user.get("shadow")),
                        user.get("canary_deadline"))

    def send(self, n: int) -> list[int]:
        """`n` one-row requests; returns their HTTP statuses; ships the buffer to the monitor."""
        self.ep.versions = self._versions()
        statuses = [self._answer(f"r{self.sent + i}", self.rows[(self.sent + i) % len(self.rows)]) for i in range(n)]
        self.sent += n
        for batch in self.ep.monitor.buffer.take():
            self.monitor.record(batch)
        return statuses

    def _answer(self, rid, row) -> int:
        return asyncio.run(self.ep.predict_response(FakeRequest({"instances": [row], "request_id": rid}))).status_code


def _gate(**kw) -> CanaryConfig:
    base = dict(percent=50, interval_s=1, intervals=2, failure_threshold=1, min_rows=40, p99_slack_ms=0.2,
                max_p99_factor=2.0)
    return CanaryConfig(**{**base, **kw})


def _run(world, version, wrap=None, **gate_kw):
    reg, rows, monitor = world
    admin = FakeAdmin(reg)
    traffic = Traffic(reg, rows, monitor, admin, wrap)
    result = run_canary(admin, APP, version, _gate(**gate_kw), monitor.report, sleep=lambda s: traffic.send(120))
    return result, admin, reg


def test_a_candidate_as_good_as_stable_is_promoted(world):
    result, admin, reg = _run(world, 2)
    assert result.promoted and result.passed, result.why
    assert "gate passed 2 checks" in result.why and len(result.checks) == 2
    assert admin.deployed()["model_ref"] == 2 and admin.deployed()["candidate_ref"] is None
    assert reg.get_alias(MODEL, "production") == 2
    events = [e["event"] for e in RolloutJournal(reg, MODEL, APP).read()["events"]]
    assert events[0].startswith("canary of v2") and events[-1].startswith("promoted v2")


def test_a_candidate_that_fails_on_some_inputs_is_rolled_back_naming_the_check(world):
    result, admin, reg = _run(world, 2, wrap={2: RaisesOnPositiveFirstFeature})
    assert not result.promoted and "server_errors failed" in result.why, result.why
    assert admin.deployed()["candidate_ref"] is None and admin.deployed()["model_ref"] == "production"
    assert reg.get_alias(MODEL, "production") == 1
    fig = result.checks[-1]["figures"]
    assert fig["failures"] > 0 and fig["candidate_attempts"] >= fig["failures"]


def test_a_slower_candidate_is_rolled_back_on_its_p99(world):
    result, admin, reg = _run(world, 2, wrap={2: lambda m: _Slow(m, 0.004)})
    assert not result.promoted and "latency_p99 failed" in result.why, result.why
    assert "server_errors failed" not in result.why and "agreement failed" not in result.why
    assert reg.get_alias(MODEL, "production") == 1


def test_a_candidate_that_disagrees_with_stable_is_rolled_back(world):
    result, admin, reg = _run(world, 3)
    assert not result.promoted and "agreement failed" in result.why, result.why
    assert reg.get_alias(MODEL, "production") == 1 and admin.deployed()["candidate_ref"] is None


def test_shadow_mode_answers_from_stable_and_still_judges_the_candidate(world):
    reg, rows, monitor = world
    admin = FakeAdmin(reg)
    traffic = Traffic(reg, rows, monitor, admin, wrap={2: RaisesOnPositiveFirstFeature})
    seen = []

    def sleep(_):
        seen.extend(traffic.send(120))

    result = run_canary(admin, APP, 2, _gate(shadow=True), monitor.report, sleep=sleep)
    assert set(seen) == {200}  # users never saw the failing candidate
    assert not result.promoted and "server_errors failed" in result.why, result.why
    assert monitor.report()["predictions_by_version"].get("2", 0) == 0  # it answered nobody


def test_too_little_traffic_never_promotes(world):
    reg, rows, monitor = world
    admin = FakeAdmin(reg)
    result = run_canary(admin, APP, 2, _gate(max_s=2.5), monitor.report, sleep=lambda s: time.sleep(0.5))
    assert not result.promoted and "no decision within max_s" in result.why
    assert result.checks and all(c["state"] == "wait" for c in result.checks)
    assert admin.deployed()["candidate_ref"] is None


def test_an_interrupted_gate_stops_its_canary(world):
    reg, rows, monitor = world
    admin = FakeAdmin(reg)

    def interrupted(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_canary(admin, APP, 2, _gate(), monitor.report, sleep=interrupted)
    assert admin.deployed()["candidate_ref"] is None
    assert RolloutJournal(reg, MODEL, APP).read()["phase"] == "idle"


# ----- rollouts that heal -----


def test_a_promotion_cut_before_the_alias_move_is_finished_by_the_next_command(world, monkeypatch):
    reg, _, _ = world
    admin = FakeAdmin(reg)
    rollout.canary(admin, APP, 2, 20)

    def killed(*a, **k):
        raise SystemExit("killed between the Serve update and the alias move")

    monkeypatch.setattr(Registry, "set_alias", killed)
    with pytest.raises(SystemExit):
        rollout.promote(admin, APP)
    monkeypatch.undo()
    assert admin.deployed()["model_ref"] == 2 and reg.get_alias(MODEL, "production") == 1  # half done
    assert RolloutJournal(reg, MODEL, APP).read()["phase"] == "promoting"
    st = rollout.status(admin, APP)
    assert any("moved the registry alias 'production' to v2" in line for line in st["reconciled"]), st
    assert reg.get_alias(MODEL, "production") == 2 and st["stable_version"] == 2
    assert RolloutJournal(reg, MODEL, APP).read()["phase"] == "idle"


def test_a_promotion_cut_before_the_serve_update_is_finished_too(world, monkeypatch):
    reg, _, _ = world
    admin = FakeAdmin(reg)
    rollout.canary(admin, APP, 2, 20)
    monkeypatch.setattr(admin, "apply", lambda config: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        rollout.promote(admin, APP)
    monkeypatch.undo()
    assert admin.deployed()["candidate_ref"] == 2 and admin.deployed()["model_ref"] == "production"
    rollout.status(admin, APP)
    assert admin.deployed()["model_ref"] == 2 and admin.deployed()["candidate_ref"] is None
    assert reg.get_alias(MODEL, "production") == 2


def test_a_gated_canary_whose_owner_died_is_stopped_by_the_next_command(world):
    reg, _, _ = world
    admin = FakeAdmin(reg)
    lease = RolloutLease(reg, MODEL, APP, lease_s=0.8).acquire()  # the owner
    ro = rollout.Rollout(admin, APP, reg, MODEL, lease, 30)
    ro.start_canary(2, 30, gated=True, deadline=time.time() + 3600)
    time.sleep(1.2)  # its heartbeat keeps the lease past lease_s while it lives
    with pytest.raises(rollout.RolloutError, match="in progress"):
        rollout.promote(admin, APP)
    assert rollout.status(admin, APP)["in_progress"]
    lease._halt()  # it dies holding the lease: no more renewals
    time.sleep(1.0)
    st = rollout.status(admin, APP)
    assert st["reconciled"] and "stopped renewing the rollout lease" in st["reconciled"][0]
    assert st["reconciled"][0].startswith("stopped the canary of v2:")
    assert admin.deployed()["candidate_ref"] is None and reg.get_alias(MODEL, "production") == 1


def test_a_canary_past_its_deadline_takes_no_traffic_and_is_stopped(world):
    reg, rows, monitor = world
    admin = FakeAdmin(reg)
    traffic = Traffic(reg, rows, monitor, admin)
    rollout.canary(admin, APP, 2, 100, deadline_s=1.5)  # by hand, with a deadline
    assert traffic._versions().route("x")[0].version == 2
    time.sleep(1.6)
    assert traffic._versions().route("x") == (traffic.scorers[1], None)  # the replicas stop routing to it
    st = rollout.status(admin, APP)
    assert "deadline" in st["reconciled"][0] and admin.deployed()["candidate_ref"] is None


# ----- the pieces -----


def test_compare_passes_record_agreement_and_never_reach_the_client(world):
    reg, rows, _ = world
    s1, s3 = (Scorer.from_loaded(reg.load(MODEL, v)) for v in (1, 3))
    broken = Scorer(s3.name, 4, _Always(), s3.schema, s3.preprocessor)
    stats: list = []
    items = [(s1, rows[:3], "instances", 0, "a", s3), (s1, rows[3:5], "instances", 0, "b", broken),
             (s1, rows[5:6], "instances", 0, "c", None)]
    out = score_requests(items, stats)
    assert all(type(o).__name__ == "ScoredRows" for o in out)
    groups = [s for s in stats if isinstance(s, GroupStats)]
    assert [(g.version, g.requests, g.compare) for g in groups] == [(1, 3, False), (3, 1, True), (4, 1, True)]
    assert next(g for g in groups if g.version == 4).failed == 1  # its failure stayed in the compare pass
    agree = [s for s in stats if isinstance(s, Agreement)]
    assert [(a.version, a.other, a.rows) for a in agree] == [(1, 3, 3)] and 0 <= agree[0].agreed <= 3


def test_version_figures_survive_the_trip_to_the_monitor():
    rep = VersionFigures()
    rep.add_passes([GroupStats(2, 3, 3, 1.5, 1.4), GroupStats(1, 3, 3, 0.5, 0.4, compare=True, failed=1),
                    Agreement(2, 1, 3, 2)])
    merged = VersionFigures()
    merged.merge(json.loads(json.dumps(rep.take())))
    merged.load_state(json.loads(json.dumps(merged.state())))
    s = merged.summary()
    assert s["2"]["agreement"] == {"1": [3, 2]} and s["1"]["agreement"] == {"2": [3, 2]}
    assert s["1"]["compare_requests"] == 3 and s["1"]["compare_failed"] == 1
    assert sum(s["2"]["score_hist"]) == 3 and sum(s["1"]["compare_hist"]) == 3
    assert not rep  # take() emptied the replica's side


def test_the_gate_waits_for_rows_and_judges_ratios_only_on_enough_requests():
    cfg = CanaryConfig(min_rows=100)
    few = VersionCounts(answered=5, rows=5, errors=1, server_errors=1)
    v = evaluate(cfg, few, VersionCounts(), shadow=False)
    assert v.state == "wait" and v.checks[1].passed is None  # 1 failure of 6 is not yet a 17% failure rate
    hist = np.zeros_like(few.score_hist)
    hist[50] = 200
    good = VersionCounts(answered=200, rows=200, compared=200, agreed=190, score_hist=hist.copy())
    stable = VersionCounts(answered=900, rows=1100, compare_requests=200, score_hist=hist * 2,
                           compare_hist=hist.copy())
    assert evaluate(cfg, good, stable, shadow=False).state == "pass"
    bad = VersionCounts(answered=200, rows=200, errors=30, compared=200, agreed=190, score_hist=hist.copy())
    v = evaluate(cfg, bad, stable, shadow=False)
    assert v.state == "fail" and [c.name for c in v.failed] == ["client_errors"]
    assert "client_errors failed" in v.describe()


def test_agreement_fails_only_on_evidence():
    from serve.gate import _agreement_ok, wilson_upper

    assert _agreement_ok(VersionCounts(compared=41, agreed=10), 0.28) is None  # 24% of 41 rows: could be 28%
    assert _agreement_ok(VersionCounts(compared=400, agreed=80), 0.28) is False  # 20%, at most 24%
    assert _agreement_ok(VersionCounts(compared=41, agreed=12), 0.28) is True
    assert _agreement_ok(VersionCounts(), 0.5) is None
    assert 0.38 < wilson_upper(10, 41) < 0.40 and wilson_upper(0, 300) < 0.02


@pytest.mark.parametrize("wrap,check", [({2: RaisesOnPositiveFirstFeature}, "server_errors"),
                                        ({2: lambda m: _Slow(m, 0.004)}, "latency_p99"), ({}, "agreement")])
def test_the_retrain_jobs_canary_step_rolls_a_bad_candidate_back_naming_the_check(world, wrap, check):
    """The retrain job's decision (`raysys.workflow.promotion.canary_then_decide`, what the job runs after
    the holdout judged its candidate better) over the same gate: a candidate that fails on some inputs, is
    slower, or disagrees with stable stays a candidate, and the decision names the check."""
    from raysys.workflow.promotion import canary_then_decide

    reg, rows, monitor = world
    admin = FakeAdmin(reg)
    traffic = Traffic(reg, rows, monitor, admin, wrap)
    version = 2 if wrap else 3
    promoted, why, canary = canary_then_decide(admin, admin.apps[0], version, "beats production", _gate(),
                                               reader=monitor.report, sleep=lambda s: traffic.send(120))
    assert not promoted and f"{check} failed" in why and "beats production" in why, why
    assert canary["rows"] > 0 and not canary["promoted"]
    assert admin.deployed()["candidate_ref"] is None and reg.get_alias(MODEL, "production") == 1
