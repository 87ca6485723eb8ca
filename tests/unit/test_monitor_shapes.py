"""Tier 1: the online detector's shape charts without Ray: a correlation flip with unchanged marginals
(`joint`), and a covariate shift that costs no accuracy, reported as drift but never retrained on
(`monitor.retrain_when: accuracy_drop`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.worlds import stand_in_world

from raysys.config import DataConfig
from raysys.data import DriftSpec
from raysys.monitor import Monitor, WindowTester, detector_for
from raysys.monitor.online import READABLE_SPEC_VERSIONS, SPEC_VERSION, score_rows
from raysys.monitor.pairs import correlated_pairs, pair_increments

ERT = 500


@pytest.fixture(scope="module")
def world():
    # x4 stays out of the label rule (nuisance); x5:x6 are drawn with correlation 0.6
    return stand_in_world(DataConfig(num_numeric=7, num_categorical=2, num_categories=4, num_classes=3, seed=5,
                                     correlated_pairs=1, pair_correlation=0.6, nuisance_features=1), ert=ERT)


def test_generator_flips_a_correlation_and_keeps_the_marginals(world):
    task, _, arrays, _ = world
    assert task.pairs == [(5, 6)] and task.nuisance == [4]
    x, _, _, _ = arrays(20_000, 3)
    xf, _, _, _ = arrays(20_000, 4, DriftSpec(correlation={"x5:x6": -0.6}))
    assert np.corrcoef(x[:, 5], x[:, 6])[0, 1] == pytest.approx(0.6, abs=0.03)
    assert np.corrcoef(xf[:, 5], xf[:, 6])[0, 1] == pytest.approx(-0.6, abs=0.03)
    for j in (5, 6):
        assert float(xf[:, j].mean()) == pytest.approx(float(x[:, j].mean()), abs=0.1 * float(x[:, j].std()))
        assert float(xf[:, j].std()) == pytest.approx(float(x[:, j].std()), rel=0.05)
    with pytest.raises(ValueError, match="already in the correlated pair"):
        arrays(10, 5, DriftSpec(correlation={"x4:x6": 0.2}))


def test_pair_increments_are_likelihood_ratios():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(200_000)
    b = 0.6 * a + 0.8 * rng.standard_normal(200_000)
    Z = np.stack([a, b], 1)
    (i, j, rho), = correlated_pairs(Z)
    assert (i, j) == (0, 1) and rho == pytest.approx(0.6, abs=0.01)
    # under the reference each alternative's likelihood ratio has mean 1; the flip's KL is 2 rho^2 / (1 - rho^2)
    llr = pair_increments(Z, [[0, 1, 0.6]], (-1.0, 0.0))
    assert np.exp(llr).mean(0) == pytest.approx([1.0, 1.0], abs=0.05)
    flipped = np.stack([a, -b], 1)
    assert pair_increments(flipped, [[0, 1, 0.6]], (-1.0,)).mean() == pytest.approx(2 * 0.36 / 0.64, rel=0.03)


def test_correlation_flip_is_found_by_the_joint_chart_not_by_the_window_tests(world):
    task, schema, arrays, prof = world
    spec = prof.detector
    assert spec["version"] == SPEC_VERSION and SPEC_VERSION in READABLE_SPEC_VERSIONS
    assert [p[:2] for p in spec["pairs"]] == [[5, 6]] and spec["pairs"][0][2] == pytest.approx(0.6, abs=0.05)
    assert "joint" in spec["norm"] and json.loads(json.dumps(spec))["pairs"] == spec["pairs"]
    flip = DriftSpec(correlation={"x5:x6": -0.6})
    delays = []
    for r in range(8):
        det = detector_for(prof)
        x, c, _, p = arrays(300, [40, r], flip)
        alarms = det.update(score_rows(prof, x, c, p))
        assert alarms and alarms[0]["chart"] == "joint" and alarms[0]["features"] == ["x5", "x6"], alarms[:1]
        delays.append(alarms[0]["row"] + 1)
    # KL 1.1 nats a row against a threshold of a few nats (ERT 500): a few rows, well within 40
    assert np.median(delays) <= 20 and max(delays) <= 40, delays
    # the same rows through the per-feature window tests: no feature drifted (the marginals did not move)
    x, c, _, p = arrays(1000, 41, flip)
    res = WindowTester(prof).test(x, c, pred=p.argmax(1), alpha=0.01, method="bh")
    assert not [f for f, v in res["features"].items() if v["drifted"]]
    # undrifted rows: the joint chart's false alarms stay a share of the budget (ERT 500 rows in all)
    det = detector_for(prof)
    x, c, _, p = arrays(20_000, 42)
    alarms = det.update(score_rows(prof, x, c, p))
    assert 5 <= len(alarms) <= 120 and sum(a["chart"] == "joint" for a in alarms) <= len(alarms) // 2 + 2


def _monitor(prof, schema, calls):
    return Monitor(prof.to_dict(), schema.model_dump(),
                   {"window_size": 1000, "min_rows": 200, "ert": ERT, "on_drift": "retrain",
                    "retrain_when": "accuracy_drop", "accuracy_drop": 0.05},
                   model_version=1, retrain_submit=lambda e, m: calls.append(e) or "job-x",
                   retrain_status=lambda j: "RUNNING")


def test_a_shift_that_costs_no_accuracy_is_reported_but_not_retrained_on(world):
    task, schema, arrays, prof = world
    calls: list[str] = []
    mon = _monitor(prof, schema, calls)
    x, c, y, p = arrays(1000, 60, DriftSpec(covariate={"x4": 2.0}))  # x4: outside the label rule
    mon.record({"x_num": x, "x_cat": c, "proba": p, "latency_ms": [1.0] * 1000})
    rep = mon.report()
    online = [e for e in rep["alert_events"] if e["kind"] == "online"]
    assert online and "x4" in online[0]["features"] and rep["drift_detected"]  # reported as drift ...
    assert abs(rep["accuracy"]["estimated"] - rep["accuracy"]["reference"]) < 0.05  # ... accuracy flat ...
    assert not calls and not any(e["retrain"]["submitted"] for e in rep["alert_events"])  # ... no retrain
    assert "accuracy_drop" in online[0]["retrain"]["why"]
    assert (p.argmax(1) == y).mean() == pytest.approx(prof.prediction.accuracy, abs=0.03)
    # the same shift with the model's confidence falling (a shift that costs accuracy): retrained on
    calls2: list[str] = []
    mon2 = _monitor(prof, schema, calls2)
    x, c, _, p = arrays(1000, 61, DriftSpec(covariate={"x4": 2.0}), temperature=3.0)
    mon2.record({"x_num": x, "x_cat": c, "proba": p, "latency_ms": [1.0] * 1000})
    rep2 = mon2.report()
    est = [e for e in rep2["alert_events"] if e["kind"] == "estimated_accuracy"]
    assert est and est[0]["retrain"]["submitted"], rep2["alert_events"]
    mon2.retrain._thread.join(10)
    assert len(calls2) == 1
