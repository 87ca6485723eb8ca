"""Tier 3: issue 6's end-to-end "Done when" points for the monitor, over real HTTP.

- (the monitor actor killed under load coming back with its reference and window from its snapshot, on one
  node and after its node's loss: tests/integration/test_chaos_ray.py, benchmarks/chaos.py)
- on undrifted traffic the confidence-based accuracy estimate is within 2 points of the accuracy realised
  from /v1/feedback labels; injected concept drift makes the realised accuracy fall, raises an accuracy
  alert, and (the confidence map re-fitted online from the labels that arrived) makes the estimate for the
  traffic whose labels were withheld fall too;
- 1.5 sigma drift on one feature raises a window alert; the same volume of undrifted traffic raises none.

Each test deploys its own app (`serve.run(build_app(...))`) with its own monitor actor on the session's
Serve HTTP port and removes both in `finally`. Alert -> retrain job -> candidate is tests/integration/test_retrain_e2e.py.
The unit tests at the end (no Ray) cover the online re-fit of the confidence map alone.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

import numpy as np
import pytest
import requests
from helpers.serving import (
    MODEL,
    kill_monitor,
    make_registry,
    monitor_report,
    poll,
    predict_rows,
    send_feedback,
    serve_http_port,
)
from helpers.worlds import SMALL_TASK, sample_rows, small_task_world, train_student_registry

from raysys.data import DriftSpec, SyntheticTask
from raysys.monitor.accuracy import OnlineRecalibration
from raysys.monitor.core import Monitor
from raysys.monitor.profile import ReferenceProfile
from raysys.registry import Registry

MONITOR_NAMESPACE = "raysys"
# make_registry's task (its v1 was profiled on 1000 rows of seed [11, 1])
@pytest.fixture(scope="module")
def http_port(request, ray_cluster):
    return serve_http_port(request)


@pytest.fixture(scope="module")
def small_registry(tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("monitor_e2e"))



@contextmanager
def _deployed(reg: Registry, http_port: int, monitor_cfg: dict, serve_cfg: dict | None = None):
    """The app with its own monitor actor; yields (url, monitor name); removes both afterwards."""
    from ray import serve

    from serve.app import build_app

    name = f"mon-e2e-{uuid.uuid4().hex[:6]}"
    monitor = f"raysys_monitor_{name}"
    t0 = time.perf_counter()
    serve.run(build_app({"registry_uri": reg.uri, "model_name": MODEL, "monitor_name": monitor,
                         "serve_cfg": serve_cfg or {}, "monitor_cfg": monitor_cfg}),
              name=name, route_prefix=f"/{name}")
    print(f"\n[monitor-e2e] deployed {name} in {time.perf_counter() - t0:.1f}s")
    try:
        yield f"http://127.0.0.1:{http_port}/{name}", monitor
    finally:
        t0 = time.perf_counter()
        serve.delete(name)
        kill_monitor(monitor)
        print(f"[monitor-e2e] removed {name} in {time.perf_counter() - t0:.1f}s")


def _wait_rows(s: requests.Session, url: str, n: int, what: str) -> dict:
    """Until the monitor has seen `n` rows (replicas ship them fire-and-forget, a little later)."""
    return poll(lambda: (rep := monitor_report(s, url)) is not None and rep["rows_seen"] >= n and rep,
                interval_s=0.5, what=what)


def _predict_batches(s: requests.Session, url: str, rows: list[dict], prefix: str, size: int = 100) -> list[str]:
    return predict_rows(s, url, rows, prefix, size)[0]


# --------------------------------------------------------------------------------------------------
# 1. the monitor actor crashes under load


def _monitor_pid(name: str, dashboard_url: str) -> int:
    import ray
    from ray.util.state import get_actor

    actor_id = ray.get_actor(name, namespace=MONITOR_NAMESPACE)._actor_id.hex()
    # this session's cluster explicitly: other Ray clusters may run on the same machine
    info = get_actor(actor_id, address=f"http://{dashboard_url}")
    assert info is not None and info.state == "ALIVE", info
    return int(info.pid)


# --------------------------------------------------------------------------------------------------
# 2. live accuracy: realised (feedback labels) vs estimated (confidence), then concept drift


@pytest.fixture(scope="module")
def student_registry(tmp_path_factory):
    return train_student_registry(tmp_path_factory.mktemp("monitor_e2e_student") / "registry")


@pytest.mark.integration
def test_estimated_accuracy_tracks_realised_then_falls_with_it_under_concept_drift(student_registry, http_port):
    """Undrifted: with no labels the estimate is the registration-time CBPE one; once labels arrive it is
    within 2 points of the realised accuracy. Concept drift (the same inputs, classes 0 and 1 swapped in the
    labels): labels for 3/4 of the drifted requests make the realised accuracy fall, and through the online
    re-fit of the confidence map the estimate for the 1/4 whose labels were withheld falls too."""
    reg, task, schema = student_registry
    n = 4000
    # window == feedback window == n: the estimate and the realised accuracy are over the same rows
    cfg = {"window_size": n, "feedback_window": n, "min_rows": 100, "min_labels": 500, "accuracy_drop": 0.05}
    with _deployed(reg, http_port, cfg, serve_cfg={"max_instances_per_request": 200}) as (url, _), \
            requests.Session() as s:
        rows, labels = sample_rows(task, schema, n, [11, 3])
        ids = _predict_batches(s, url, rows, "clean")
        before = _wait_rows(s, url, n, f"the monitor to log {n} predictions")["accuracy"]
        # no label yet: exactly the registration-time estimate, and all of it is for unlabelled traffic
        assert before["recalibration"]["labelled_rows"] == 0 and "no labels joined yet" in before["method_estimated"]
        assert before["estimated"] == before["estimated_registration_map"]
        assert before["unlabelled_rows"] == n and before["estimated_unlabelled"] == pytest.approx(before["estimated"])
        send_feedback(s, url, ids, labels)
        clean = poll(lambda: (rep := monitor_report(s, url)) is not None and rep["accuracy"]["labels_total"] >= n and rep,
                     interval_s=0.5, what=f"{n} labels joined")["accuracy"]
        print(f"\n[monitor-e2e] undrifted, {n} rows: realised {clean['realised']:.4f} estimated {clean['estimated']:.4f} "
              f"(before labels {before['estimated']:.4f}; held-out {clean['reference']:.4f}; "
              f"{clean['method_estimated']})")
        assert clean["labelled_in_window"] == n and clean["unmatched_labels"] == clean["invalid_labels"] == 0
        assert clean["estimated_rows"] == n
        assert clean["realised"] > 0.75  # well above chance (1/3)
        assert abs(before["estimated"] - clean["realised"]) <= 0.02, (before, clean)
        assert abs(clean["estimated"] - clean["realised"]) <= 0.02, clean
        assert clean["recalibration"]["labelled_rows"] == n and f"re-fitted online on {n} labelled rows" in \
            clean["method_estimated"]
        assert clean["unlabelled_rows"] == 0 and clean["estimated_unlabelled"] is None

        # concept drift: the same feature distribution, but the rule changed (class_0 and class_1 swap);
        # DriftSpec has no concept option, so the labels the users send back are permuted. Labels come for
        # the first 3/4 of the requests; those of the last 1/4 are withheld
        swap = {0: 1, 1: 0}
        rows2, labels2 = sample_rows(task, schema, n, [11, 4])
        labels2 = [swap.get(lab, lab) for lab in labels2]
        ids2, preds2 = predict_rows(s, url, rows2, "concept")
        _wait_rows(s, url, 2 * n, "the drifted predictions to be logged")
        k = 3 * len(ids2) // 4
        send_feedback(s, url, ids2[:k], labels2)
        drifted = poll(lambda: (rep := monitor_report(s, url)) is not None
                       and rep["accuracy"]["labels_total"] >= n + 100 * k and rep, interval_s=0.5,
                       what="the drifted labels joined")
        acc = drifted["accuracy"]
        withheld = slice(100 * k, n)
        truth = float(np.mean([schema.classes.index(p) == y for p, y in zip(preds2[withheld], labels2[withheld])]))
        print(f"[monitor-e2e] concept drift, labels for {100 * k} of {n} rows: realised {acc['realised']:.4f}; "
              f"estimate for the {acc['unlabelled_rows']} rows without labels {acc['estimated_unlabelled']:.4f} "
              f"(registration-time map alone: {acc['estimated_registration_map']:.4f}; their accuracy by the "
              f"withheld labels {truth:.4f}); {acc['method_estimated']}")
        assert acc["realised"] < clean["realised"] - 0.2, acc
        alerts = [e for e in drifted["alert_events"] if e["kind"] == "accuracy"]
        assert len(alerts) == 1 and "realised accuracy" in alerts[0]["message"], drifted["alert_events"]
        assert drifted["retrain"]["enabled"] is False  # on_drift: alert records, never submits
        assert not drifted["alerts"], drifted["alerts"]  # the feature/prediction window tests see nothing
        # the estimate for the traffic whose labels were withheld falls with the realised accuracy: the
        # confidence map was re-fitted on the labels that did arrive (the registration-time map alone would
        # still say what it said before the drift)
        assert acc["unlabelled_rows"] == n - 100 * k
        assert acc["recalibration"]["labelled_rows"] == n
        assert abs(acc["estimated_registration_map"] - clean["estimated_registration_map"]) <= 0.02, acc
        assert acc["estimated_unlabelled"] < clean["estimated"] - 0.2, acc
        assert abs(acc["estimated_unlabelled"] - truth) < abs(acc["estimated_registration_map"] - truth) - 0.2, acc
        assert acc["estimated"] < clean["estimated"] - 0.2, acc


# --------------------------------------------------------------------------------------------------
# 3. covariate drift raises an alert; the same volume of undrifted traffic raises none


@pytest.mark.integration
def test_drifted_traffic_alerts_and_undrifted_does_not(small_registry, http_port):
    reg, schema, _ = small_registry
    task = SyntheticTask(SMALL_TASK)
    n = 1000
    # alpha 1e-3: every report and every 5 s tick re-tests the window; a 1.5 sigma shift has p ~ 1e-30 anyway
    cfg = {"window_size": n, "min_rows": 200, "alpha": 0.001, "on_drift": "alert"}
    with _deployed(reg, http_port, cfg) as (url, _), requests.Session() as s:
        clean, _ = sample_rows(task, schema, n, [11, 5])
        _predict_batches(s, url, clean, "clean")
        rep = _wait_rows(s, url, n, "the undrifted rows")
        rep = monitor_report(s, url)  # a fresh evaluation on the full window
        assert rep["window_rows"] == n and rep["armed"]
        assert rep["alert_events"] == [] and rep["alerts"] == [] and not rep["dataset"]["drifted"], (
            rep["alert_events"], {k: f["p_adjusted"] for k, f in rep["features"].items()})
        assert not rep["drift_detected"]

        shifted, _ = sample_rows(task, schema, n, [11, 6], DriftSpec(covariate={"x1": 1.5}))
        _predict_batches(s, url, shifted, "shifted")
        rep = _wait_rows(s, url, 2 * n, "the drifted rows")
        rep = poll(lambda: (r := monitor_report(s, url)) is not None and r["alert_events"] and r, interval_s=0.5,
                   what="a drift alert")
        print(f"\n[monitor-e2e] drift alerts: {[(e['kind'], e['features']) for e in rep['alert_events']]}")
        assert rep["drift_detected"] and rep["alerts"] == ["x1"], rep["alerts"]
        window = [e for e in rep["alert_events"] if e["kind"] == "window"]
        assert len(window) == 1 and window[0]["features"] == ["x1"], rep["alert_events"]
        assert rep["features"]["x1"]["drifted"] and rep["features"]["x1"]["psi"] > 0.2
        assert window[0]["retrain"]["submitted"] is False, window[0]  # on_drift: alert records, never submits
        assert rep["retrain"]["enabled"] is False and rep["retrain"]["jobs"] == []


# --------------------------------------------------------------------------------------------------
# 4. unit tests (no Ray): the online re-fit of the confidence map behind the accuracy estimate


def _calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted probabilities [n, 3] whose top-class confidence is the chance of being right, and labels."""
    rng = np.random.default_rng(seed)
    top = rng.integers(0, 3, n)
    conf = rng.uniform(0.45, 0.99, n)
    p = np.empty((n, 3))
    p[:] = ((1 - conf) / 2)[:, None]
    p[np.arange(n), top] = conf
    other = (top + rng.integers(1, 3, n)) % 3
    return p, np.where(rng.random(n) < conf, top, other)


@pytest.fixture(scope="module")
def calibrated_monitor_world():
    _, schema, table, pre = small_task_world()
    x_num, (_, x_cat, _) = pre.raw_numeric(table), pre.transform_table(table)
    prof = ReferenceProfile.from_arrays(schema, x_num, x_cat, num_bins=10)
    prof.add_predictions(*_calibrated(4000, 1))
    return schema, prof, x_num, x_cat


def _fed_monitor(world, n: int = 1000):
    schema, prof, x_num, x_cat = world
    mon = Monitor(prof.to_dict(), schema.model_dump(), {"window_size": n, "min_rows": 100, "feedback_window": n},
                  model_version=1)
    q, y = _calibrated(n, 2)
    ids = [f"r{i}" for i in range(n)]
    mon.record({"x_num": x_num[:n], "x_cat": x_cat[:n], "proba": q, "latency_ms": [1.0] * n, "request_ids": ids})
    return mon, q, y, ids


def test_recalibration_without_labels_is_the_registration_time_estimate(calibrated_monitor_world):
    schema, prof, _, _ = calibrated_monitor_world
    assert OnlineRecalibration(100, 200.0).fit() is None
    mon, q, y, _ = _fed_monitor(calibrated_monitor_world)
    acc = mon.report()["accuracy"]
    assert acc["estimated"] == acc["estimated_registration_map"] == pytest.approx(prof.prediction.estimate_accuracy(q))
    assert acc["estimated_unlabelled"] == pytest.approx(acc["estimated"]) and acc["unlabelled_rows"] == 1000
    assert acc["recalibration"] == {"labelled_rows": 0, "prior_rows": 200.0, "weight": 0.0, "bins": 0}
    assert "no labels joined yet" in acc["method_estimated"]
    assert abs(acc["estimated"] - float((q.argmax(1) == y).mean())) < 0.03  # the map fits calibrated traffic


def test_recalibration_on_true_labels_keeps_the_estimate_and_on_wrong_ones_drops_it(calibrated_monitor_world):
    """Labels that agree with the confidence leave the estimate for the unlabelled half where it was; labels
    saying the confident predictions were wrong pull it down, by n / (n + prior_rows) of the gap."""
    mon, q, y, ids = _fed_monitor(calibrated_monitor_world)
    before = mon.report()["accuracy"]
    mon.record_feedback_batch([(ids[i], int(y[i])) for i in range(500)])
    agree = mon.report()["accuracy"]
    rest = float((q[500:].argmax(1) == y[500:]).mean())
    assert agree["recalibration"]["labelled_rows"] == 500 and agree["recalibration"]["bins"] == 10
    assert agree["recalibration"]["weight"] == pytest.approx(500 / 700)
    assert "re-fitted online on 500 labelled rows" in agree["method_estimated"]
    assert agree["unlabelled_rows"] == 500 and abs(agree["estimated_unlabelled"] - rest) < 0.04, agree
    assert abs(agree["estimated"] - before["estimated"]) < 0.03, (agree, before)

    mon, q, y, ids = _fed_monitor(calibrated_monitor_world)
    wrong = [(ids[i], int((q[i].argmax() + 1) % 3)) for i in range(500)]  # every labelled prediction was wrong
    out = mon.record_feedback_batch(wrong)
    assert out == {"received": 500, "matched": 500, "invalid": 0}
    acc = mon.report()["accuracy"]
    q0 = before["estimated_unlabelled"]
    assert acc["realised"] == 0.0
    # q0 + w * (0 - q0) per bin, w = 500 / 700: about 0.29 x the registration-time estimate
    assert acc["estimated_unlabelled"] == pytest.approx(q0 * 200 / 700, abs=0.03), (acc, q0)
    assert acc["estimated_unlabelled"] < before["estimated_unlabelled"] - 0.4

    # the fit itself: one bin per ~50 rows at most, a shift by the bin's gap, weighted by n / (n + prior)
    rc = OnlineRecalibration(1000, prior_rows=100.0, max_bins=10)
    rc.add([0.9] * 100, [True] * 50 + [False] * 50)
    fit = rc.fit()
    assert fit.rows == 100 and len(fit.delta) == 1  # 100 tied rows: one bin
    assert fit.apply(np.array([0.9, 0.6]))[0] == pytest.approx(0.9 + 0.5 * (0.5 - 0.9))
    back = OnlineRecalibration(1000, 100.0)
    back.load_state(rc.state())
    np.testing.assert_allclose(back.fit().delta, fit.delta)
