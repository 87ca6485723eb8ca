"""Tier 1: the monitor's statistics without Ray: window tests vs scipy, the calibrated online detector,
latency histograms, feedback/accuracy, snapshots, recent-traffic Parquet, alert -> retrain."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.worlds import stand_in_world
from scipy.stats import ks_2samp

from raysys.config import DataConfig, MonitorConfig
from raysys.data import DriftSpec
from raysys.monitor import LogHistogram, Monitor, ReferenceProfile, WindowTester, adjust_pvalues, detector_for
from raysys.monitor.calibrate import threshold_for_ert
from raysys.monitor.online import DEFAULT_WEIGHTS, _cusum, score_rows
from raysys.monitor.stats import jensen_shannon, psi
from raysys.monitor.trigger import RetrainTrigger


@pytest.fixture(scope="module")
def world():
    return stand_in_world(DataConfig(num_numeric=6, num_categorical=2, num_categories=4, num_classes=3, seed=4),
                          ert=500)


def test_adjust_pvalues():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(adjust_pvalues(p, "bonferroni"), [0.04, 0.16, 0.12, 1.0])
    bh = adjust_pvalues(p, "bh")  # sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.04*4/3 capped by the next: 0.0533
    np.testing.assert_allclose(bh, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert (bh >= p).all() and bh[3] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="multiple_testing"):
        adjust_pvalues(p, "holm")


def test_window_tests_match_scipy_ks_and_flag_the_shift(world):
    task, schema, arrays, prof = world
    tester = WindowTester(prof)
    x_ref = arrays(8000, 1)[0]
    xw, cw, _, pw = arrays(1000, 21, DriftSpec(covariate={"x2": 0.5}, categorical={"c1": {"b0": 1.0}}))
    res = tester.test(xw, cw, proba=pw, pred=pw.argmax(1), alpha=0.01)
    for j in range(6):
        f = res["features"][f"x{j}"]
        exact = ks_2samp(x_ref[:, j], xw[:, j])
        # the sup over the grid and every window value, the reference CDF interpolated between grid points
        # (in normal-score space): close to scipy's two-sample statistic on the raw reference
        assert abs(f["statistic"] - exact.statistic) <= 0.01, (j, f["statistic"], exact.statistic)
    assert [n for n, f in res["features"].items() if f["drifted"]] == ["x2", "c1"]
    assert res["dataset"]["drifted"] and res["dataset"]["num_drifted"] == 2
    assert res["features"]["c1"]["test"] == "chi2" and res["features"]["x2"]["js"] > 0
    json.dumps(res)
    clean = tester.test(*arrays(1000, 22)[:2], alpha=0.01)
    assert not clean["dataset"]["drifted"], clean["features"]


def test_online_detector_calibrated_and_detects(world):
    task, schema, arrays, prof = world
    spec = prof.detector
    assert spec["threshold"] > 0 and not spec["extrapolated"] and spec["calibration"]["rows"] >= 60_000
    assert set(spec["norm"]) == {"cusum", "spread", "sum@0.01", "cat", "prior", "pred@0.03", "trend@0.003", "catrev@0",
                                 "catrev@1"} and spec["version"] == 4
    assert spec["weights"] == DEFAULT_WEIGHTS and spec["charts"]["prior"] == [6.0]
    # a lower ERT needs a lower threshold, read from the same table
    assert threshold_for_ert(spec, 200)[0] < spec["threshold"]
    # no drift: false alarms about once per ERT rows (loose bounds: a short, noisy check)
    det = detector_for(prof)
    x, c, _, p = arrays(20_000, 31)
    alarms = det.update(score_rows(prof, x, c, p))
    assert 5 <= len(alarms) <= 120, len(alarms)
    # a 1 sigma shift of one feature is found within a few dozen rows and blamed on that feature
    det = detector_for(prof)
    x, c, _, p = arrays(400, 32, DriftSpec(covariate={"x4": 1.5}))
    alarms = det.update(score_rows(prof, x, c, p))
    assert alarms and alarms[0]["row"] < 100 and "x4" in alarms[0]["features"]
    assert alarms[0]["chart"] in ("cusum", "spread", "sum@0.01", "trend@0.003")
    st = det.state()
    again = detector_for(prof)
    again.load_state(json.loads(json.dumps(st)))
    assert again.t == det.t and np.array_equal(again.cusum["cusum"], det.cusum["cusum"])
    assert np.array_equal(again.ewma["cat@0.01"], det.ewma["cat@0.01"])
    # a state from the previous (EWMA-only) detector keeps the counters and restarts the charts
    old = detector_for(prof)
    old.load_state({"t": 7, "alarms": 2, "rows": 900, "ewma": {"0.05": [0.0] * 20}})
    assert (old.alarms, old.rows, old.t) == (2, 900, 0) and not old.cusum["cusum"].any()


def test_cusum_unrolled_matches_the_recursion():
    rng = np.random.default_rng(3)
    inc = rng.normal(-0.2, 1.0, (300, 4))
    s0 = np.array([0.0, 1.5, 7.0, 0.2])
    want, s = np.empty_like(inc), s0.copy()
    for t in range(len(inc)):
        s = np.maximum(0.0, s + inc[t])
        want[t] = s
    np.testing.assert_allclose(_cusum(inc, s0), want, atol=1e-9)
    assert (_cusum(inc, s0) >= 0).all() and _cusum(inc[:1], s0)[0, 2] == pytest.approx(max(0, 7.0 + inc[0, 2]))


def test_online_detector_is_batch_invariant(world):
    """The same stream fed in one batch or in ragged pieces gives the same alarms and the same state
    (CUSUMs, EWMAs and the adaptive alternatives carry across batches exactly)."""
    task, schema, arrays, prof = world
    x, c, _, p = arrays(1500, 33, DriftSpec(covariate={"x1": 0.8}, categorical={"c0": {"a0": 1.0}}))
    S = score_rows(prof, x, c, p)
    one, many = detector_for(prof), detector_for(prof)
    a1 = [(a["row"], a["chart"]) for a in one.update(S)]
    a2, lo = [], 0
    for size in [1, 2, 3, 50, 7, 400, 1, 900, 200]:
        a2 += [(lo + a["row"], a["chart"]) for a in many.update(S[lo:lo + size])]
        lo += size
    assert lo >= len(S) and a1 == a2 and len(a1) >= 2
    assert one.t == many.t and np.allclose(one.cusum["prior"], many.cusum["prior"])
    assert np.allclose(one.ewma["pred@0.03"], many.ewma["pred@0.03"])


def test_adaptive_and_prior_increments_are_likelihood_ratios(world):
    """Under the reference, exp(increment) of the categorical and prior-shift CUSUMs has mean 1 (they are
    likelihood ratios), and their charts catch a categorical frequency shift and a class-prior flip,
    blaming the right feature."""
    task, schema, arrays, prof = world
    det = detector_for(prof)
    S = score_rows(prof, *[a for i, a in enumerate(arrays(4000, 34)) if i != 2])
    # increments: run each chart's CUSUM from a huge start so that max(0, .) never binds
    det.cusum = {k: np.full_like(v, 1e6) for k, v in det.cusum.items()}
    carry, _, _ = det._run(S)
    for key in ("cat", "prior"):
        inc = np.diff(np.vstack([np.full(carry[key].shape[1], 1e6), carry[key]]), axis=0)
        ratio = np.exp(inc).mean(0)
        assert np.all(np.abs(ratio - 1) < 0.12), (key, ratio)
        assert np.all(inc.mean(0) <= 0.01), (key, inc.mean(0))  # a drift toward 0 under the null
    flip = {c: (0.8 if i == 2 else 0.1) for i, c in enumerate(schema.classes)}
    det = detector_for(prof)
    x, c, _, p = arrays(600, 35, DriftSpec(label_priors=flip))
    alarms = det.update(score_rows(prof, x, c, p))
    assert alarms and alarms[0]["chart"] == "prior" and alarms[0]["features"] == ["_prediction"]
    det = detector_for(prof)
    cats = schema.categorical[1].categories
    x, c, _, p = arrays(3000, 36, DriftSpec(categorical={"c1": {cats[0]: 1.0, cats[1]: 1.0}}))
    alarms = det.update(score_rows(prof, x, c, p))
    # (at ERT 500 a false alarm on another feature may come first)
    on_c1 = [a for a in alarms if a["features"] == ["c1"]]
    assert on_c1 and on_c1[0]["chart"] == "cat" and len(on_c1) >= len(alarms) // 2, alarms


def _alarm_rows(prof, arrays, n, seeds, drift=None):
    rows, charts = [], []
    for seed in seeds:
        x, c, _, p = arrays(n, seed, drift)
        alarms = detector_for(prof).update(score_rows(prof, x, c, p))
        rows.append(alarms[0]["row"] if alarms else n)
        charts.append(alarms[0]["chart"] if alarms else None)
    return rows, charts


def test_budget_weights_split_the_false_alarms(world):
    """The per-kind weights move false alarms to the label-shift chart without breaking the calibration:
    on the same undrifted stream both detectors keep about one alarm per ERT rows, and the weighted one
    raises a larger share of them on `prior`; a flip is then found sooner."""
    task, schema, arrays, prof = world
    equal = ReferenceProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    xh, ch, _, ph = arrays(4000, 2)
    equal.calibrate(xh, ch, ph, ert=500, num_rows=60_000, weights={})
    assert equal.detector["weights"] == {} and equal.detector["threshold"] < prof.detector["threshold"]
    x, c, _, p = arrays(40_000, 31)
    share = {}
    for name, pr in (("weighted", prof), ("equal", equal)):
        alarms = detector_for(pr).update(score_rows(pr, x, c, p))
        assert 40 <= len(alarms) <= 160, (name, len(alarms))  # 80 expected at ERT 500
        share[name] = sum(a["chart"] == "prior" for a in alarms) / len(alarms)
    # (the `trend` and `catrev` charts take their share too: prior ~45% of the false alarms, not ~75%)
    assert share["weighted"] > max(0.35, share["equal"] + 0.15), share
    flip = DriftSpec(label_priors={c: (0.8 if i == 2 else 0.1) for i, c in enumerate(schema.classes)})
    rows, charts = _alarm_rows(prof, arrays, 600, [[35, r] for r in range(10)], flip)
    assert np.median(rows) < 25 and charts.count("prior") >= 9, (rows, charts)
    with pytest.raises(ValueError, match="weights must be positive"):
        equal.calibrate(xh, ch, ph, ert=500, num_rows=20_000, weights={"prior": 0.0})


def test_adaptive_prior_chart_alone_catches_a_vanishing_class(world):
    """`pred@lambda` is a chart of its own (its own null tail and budget): calibrated alone it keeps the
    ERT on undrifted traffic and finds a class that (almost) disappears, a direction the one-class-up grid
    of `prior` is not tuned to."""
    task, schema, arrays, prof = world
    solo = ReferenceProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    xh, ch, _, ph = arrays(4000, 2)
    spec = solo.calibrate(xh, ch, ph, ert=500, num_rows=60_000, charts={"pred": [0.03]})
    assert set(spec["norm"]) == {"pred@0.03"} and spec["charts"]["prior"] == []
    x, c, _, p = arrays(40_000, 31)
    alarms = detector_for(solo).update(score_rows(solo, x, c, p))
    assert 40 <= len(alarms) <= 160 and {a["chart"] for a in alarms} == {"pred@0.03"}, len(alarms)
    vanish = DriftSpec(label_priors={c: (0.02 if i == 0 else 0.49) for i, c in enumerate(schema.classes)})
    rows, charts = _alarm_rows(solo, arrays, 600, [[36, r] for r in range(10)], vanish)
    assert np.median(rows) < 100 and set(charts) == {"pred@0.03"}, (rows, charts)
    assert detector_for(solo).blame("pred@0.03") == ["_prediction"]


def test_a_version_2_detector_still_runs_as_calibrated(world):
    """A profile calibrated by the previous release (spec version 2: no weights, the adaptive alternative
    inside the `prior` maximum) keeps working: the monitor runs its charts as they were calibrated and
    warns that re-registering brings the new ones; a snapshot from another version restarts the charts."""
    task, schema, arrays, prof = world
    d = json.loads(json.dumps(prof.to_dict()))
    d["detector"]["version"] = 2
    d["detector"].pop("weights")
    d["detector"]["norm"].pop("pred@0.03")
    old = ReferenceProfile.from_dict(d)
    with pytest.warns(UserWarning, match="older raysys"):
        det = detector_for(old)
    assert det.version == 2 and det.weights == {}
    x, c, _, p = arrays(400, 35, DriftSpec(label_priors={c: (0.8 if i == 2 else 0.1) for i, c in enumerate(schema.classes)}))
    alarms = det.update(score_rows(old, x, c, p))
    assert alarms and alarms[0]["chart"] == "prior" and "pred@0.03" not in det.last_scores
    new = detector_for(prof)
    new.update(score_rows(prof, x[:50], c[:50], p[:50]))
    det.load_state(json.loads(json.dumps(new.state())))
    assert det.t == 0 and det.rows == new.rows and not det.cusum["prior"].any()
    with pytest.warns(UserWarning, match="older raysys"):
        mon = Monitor(old.to_dict(), schema.model_dump(), {"window_size": 500, "ert": 500}, model_version=1)
    assert mon.detector is not None and mon.detector.version == 2 and mon.report()["detector"]["calibrated"]


def test_profile_from_an_older_detector_needs_recalibration(world):
    task, schema, arrays, prof = world
    old = ReferenceProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    old.detector = {k: v for k, v in old.detector.items() if k != "version"}
    with pytest.raises(ValueError, match="recalibrate"):
        detector_for(old)
    mon = Monitor(old.to_dict(), schema.model_dump(), {"window_size": 500, "ert": 500}, model_version=1)
    x, c, _, p = arrays(300, 37, DriftSpec(covariate={"x1": 3.0}))
    mon.record({"x_num": x, "x_cat": c, "proba": p, "latency_ms": [1.0] * 300})
    rep = mon.report()
    assert mon.detector is None and not rep["detector"]["calibrated"] and "older" in rep["detector"]["why"]


def test_profile_predictions_and_size(world):
    task, schema, arrays, prof = world
    d = prof.to_dict()
    back = ReferenceProfile.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d
    assert back.prediction.accuracy > 0.5 and 0.2 < back.prediction.temperature < 5
    assert len(back.prediction.per_class) == 3 and back.prediction.whiten.shape == (3, 2)
    assert len(json.dumps(d)) < 60_000


def test_log_histogram_percentiles_within_one_bucket():
    rng = np.random.default_rng(0)
    v = rng.lognormal(1.0, 1.0, 50_000)
    h = LogHistogram()
    h.add(v[:20_000])
    h.add(v[20_000:])
    s = h.summary()
    for q, key in ((50, "p50"), (95, "p95"), (99, "p99")):
        exact = np.percentile(v, q)
        assert abs(s[key] - exact) / exact < 0.10, (key, s[key], exact)
    assert s["count"] == 50_000 and LogHistogram().summary()["p50"] is None


def _monitor(prof, schema, **cfg):
    return Monitor(prof.to_dict(), schema.model_dump(), {"window_size": 500, "min_rows": 100, "ert": 500, **cfg},
                   model_version=1)


def test_feedback_accuracy_and_estimate(world):
    task, schema, arrays, prof = world
    mon = _monitor(prof, schema)
    x, c, y, p = arrays(600, 41)
    ids = [f"r{i}" for i in range(600)]
    mon.record({"x_num": x, "x_cat": c, "proba": p, "latency_ms": [2.0] * 600, "request_ids": ids})
    for i in range(600):
        mon.record_feedback(ids[i], int(y[i]) if i % 2 else schema.classes[int(y[i])])
    assert mon.record_feedback("nope", 0) == {"request_id": "nope", "matched": False}
    with pytest.raises(ValueError, match="unknown class"):
        mon.record({"x_num": x[:1], "x_cat": c[:1], "proba": p[:1], "latency_ms": [1.0], "request_ids": ["z"]})
        mon.record_feedback("z", "no_such_class")
    acc = mon.report()["accuracy"]
    realised = float((p.argmax(1) == y).mean())
    assert acc["realised"] == pytest.approx(realised) and acc["labelled_in_window"] == 600
    assert abs(acc["estimated"] - realised) < 0.06 and acc["unmatched_labels"] == 1


def test_the_retrain_job_reserves_the_configured_resources(monkeypatch):
    # monitor.retrain_resources reach the Jobs API as entrypoint_resources (the boundary faked: a real cluster
    # placing the driver is in tests/integration); none configured sends none
    from raysys.monitor import trigger

    calls = []

    class Jobs:
        def submit_job(self, **kw):
            calls.append(kw)
            return "raysys-job-1"

    monkeypatch.setattr(trigger, "_client", lambda address: Jobs())
    for resources, expected in (({"retrain_node": 1.0}, {"retrain_node": 1.0}), ({}, None)):
        cfg = MonitorConfig(on_drift="retrain", retrain_resources=resources)
        trig = RetrainTrigger(enabled=True, cooldown_s=0, args=[], resources=cfg.retrain_resources, poll_s=None)
        assert trig.maybe_submit("drift", [], background=False)["submitted"]
        assert calls[-1]["entrypoint_resources"] == expected and "retrain.py" in calls[-1]["entrypoint"]


def test_alert_submits_one_retrain_with_cooldown(world):
    task, schema, arrays, prof = world
    submitted, status = [], {"s": "RUNNING"}
    clock = {"t": 1000.0}
    trig = RetrainTrigger(enabled=True, cooldown_s=60, args=["--preset", "tiny"],
                          submit=lambda e, m: submitted.append(e) or f"job{len(submitted)}",
                          status=lambda j: status["s"], clock=lambda: clock["t"])
    assert trig.maybe_submit("drift", [], background=False)["submitted"]
    assert "jobs/retrain.py" in submitted[0] and "--preset tiny" in submitted[0]
    assert "still running" in trig.maybe_submit("drift", [], background=False)["why"]
    status["s"] = "SUCCEEDED"
    assert "cooldown" in trig.maybe_submit("drift", [], background=False)["why"]
    clock["t"] += 61
    assert trig.maybe_submit("drift", [], background=False)["submitted"] and len(submitted) == 2
    # through the monitor: drifted traffic -> online alarm -> alert event -> a retrain submission
    calls = []
    mon = Monitor(prof.to_dict(), schema.model_dump(), {"window_size": 500, "min_rows": 100, "ert": 500,
                                                         "on_drift": "retrain"}, model_version=1,
                  retrain_submit=lambda e, m: calls.append(e) or "job-x", retrain_status=lambda j: "RUNNING")
    x, c, _, p = arrays(300, 51, DriftSpec(covariate={"x1": 2.0}))
    mon.record({"x_num": x, "x_cat": c, "proba": p, "latency_ms": [1.0] * 300})
    rep = mon.report()
    kinds = [e["kind"] for e in rep["alert_events"]]
    assert "online" in kinds and rep["detector"]["alarms"] >= 1
    mon.retrain._thread.join(10)
    assert len(calls) == 1 and mon.alert_events[0]["retrain"]["submitted"]  # later ones: in flight
    assert mon.report()["retrain"]["job_in_flight"] == "job-x"


def test_failed_retrain_submission_retries_instead_of_starting_the_cooldown():
    # the Jobs API answers "No available agent to submit job, please try again later" while the head is busy:
    # no job ran, so the hour-long cooldown must not start; the next alert retries after a short wait
    clock, calls = {"t": 1000.0}, []

    def submit(entry, meta):
        calls.append(entry)
        if len(calls) == 1:
            raise RuntimeError("Request failed with status code 403: submitting jobs is not allowed here")
        return "job-2"

    trig = RetrainTrigger(enabled=True, cooldown_s=3600, args=[], submit=submit, status=lambda j: "RUNNING",
                          clock=lambda: clock["t"], poll_s=None)
    first = trig.maybe_submit("drift", [], background=False)
    assert not first["submitted"] and "not allowed" in first["why"]
    assert trig.summary()["last_submit"] is None and "not allowed" in trig.summary()["last_error"]
    clock["t"] += 5
    soon = trig.maybe_submit("drift", [], background=False)
    assert not soon["submitted"] and "retry" in soon["why"] and len(calls) == 1
    clock["t"] += RetrainTrigger.SUBMIT_RETRY_S
    assert trig.maybe_submit("drift", [], background=False)["submitted"] and len(calls) == 2
    assert trig.summary()["job_in_flight"] == "job-2" and trig.summary()["last_submit"] == clock["t"]


def test_snapshot_restore_and_traffic_parquet(world, tmp_path):
    task, schema, arrays, prof = world
    cfg = {"snapshot_uri": str(tmp_path / "snap"), "traffic_uri": str(tmp_path / "traffic"),
           "traffic_rows_per_file": 100, "traffic_max_files": 3, "traffic_drop_columns": ["x0"],
           "traffic_hash_columns": ["request_id"]}
    mon = _monitor(prof, schema, **cfg)
    x, c, _, p = arrays(700, 61)
    mon.record({"x_num": x, "x_cat": c, "proba": p, "latency_ms": [3.0] * 700,
                "request_ids": [f"q{i}" for i in range(700)]})
    before = mon.report()
    assert mon.snapshot()
    again = _monitor(prof, schema, **cfg)  # what a restarted actor does in __init__
    after = again.report()
    assert again.restored and after["rows_seen"] == 700 and after["window_rows"] == before["window_rows"]
    assert after["detector"]["rows_since_restart"] == before["detector"]["rows_since_restart"]
    assert {k: f["statistic"] for k, f in after["features"].items()} == \
        {k: f["statistic"] for k, f in before["features"].items()}
    assert again.record_feedback("q5", 0)["matched"]  # the prediction log came back too
    files = mon.traffic.files()
    assert len(files) == 3  # 700 rows at 100 per file, only the newest 3 kept
    t = pq.read_table(files[-1])
    assert "x0" not in t.column_names and "x1" in t.column_names and "prediction" in t.column_names
    assert all(len(r) == 16 and not r.startswith("q") for r in t.column("request_id").to_pylist())
    # a snapshot of another model version is not applied
    other = Monitor(prof.to_dict(), schema.model_dump(), {"window_size": 500, **cfg}, model_version=2)
    assert not other.restored and other.report()["rows_seen"] == 0


def test_monitor_errors_and_latency_by_version(world):
    task, schema, arrays, prof = world
    mon = _monitor(prof, schema)
    x, c, _, p = arrays(10, 71)
    mon.record({"x_num": x, "x_cat": c, "proba": p, "latency_ms": [1.0, 2.0, 4.0, 8.0], "model_version": 3,
                "errors": 1})
    mon.record({"x_num": np.zeros(0), "x_cat": np.zeros(0), "latency_ms": [], "model_version": 3, "errors": 2})
    rep = mon.report()
    assert rep["errors_seen"] == 3 and rep["errors_by_version"] == {"3": 3}
    assert rep["error_rate"] == pytest.approx(3 / 7)
    assert rep["latency_by_version"]["3"]["count"] == 4
    assert 1.8 < rep["latency_by_version"]["3"]["p50"] < 4.4
    assert MonitorConfig(on_drift="retrain").on_drift == "retrain"


def test_window_stats_one_search_equals_per_feature_search():
    """The single-searchsorted window statistics count exactly what a per-feature search counts: ties at
    edges (a discrete feature), NaN/inf, values far outside the reference, features on scales 1e-3..1e9."""
    from raysys.monitor.profile import NumericRef
    from raysys.monitor.refbins import SegmentedRefs

    rng = np.random.default_rng(0)
    refs = [NumericRef.build("a", rng.normal(5, 100, 5000), 10),
            NumericRef.build("b", rng.integers(0, 4, 5000).astype(float), 10),
            NumericRef.build("c", rng.exponential(1e-3, 5000), 10), NumericRef.build("d", np.full(100, 2.0), 10),
            NumericRef.build("e", rng.normal(1e9, 1, 5000), 10)]
    seg = SegmentedRefs(refs)
    for n in (0, 1, 7, 1000):
        x = np.column_stack([rng.normal(5, 150, n), rng.integers(-1, 6, n).astype(float), rng.exponential(1e-3, n),
                             rng.choice([1.0, 2.0, 3.0], n), rng.normal(1e9, 2, n)])
        if n > 5:
            x[0, 0], x[1, 2], x[2, 4], x[3, 1], x[4, 0] = np.nan, np.inf, -np.inf, refs[1].edges[0], 1e300
        got = seg.stats(x, 5000)
        for j, ref in enumerate(refs):
            col = np.sort(x[:, j])
            below = np.searchsorted(col, ref.edges, side="left")
            np.testing.assert_array_equal(got["counts"][j], np.diff(below, prepend=0, append=n))
            f_win = np.append(np.searchsorted(col, ref.grid_x, side="right"), n) / max(n, 1)
            ks = np.abs(f_win - np.append(ref.grid_cdf, 1.0)).max()
            assert got["ks"][j] == pytest.approx(ks, abs=1e-12), (n, j)
            if n:
                assert got["psi"][j] == pytest.approx(psi(ref.ref_props, got["counts"][j]))


def test_categorical_window_stats_match_the_per_feature_functions(world):
    task, schema, arrays, prof = world
    tester = WindowTester(prof)
    for n, seed in ((0, 81), (1, 82), (60, 83), (1000, 84)):
        _, cw, _, _ = arrays(max(n, 1), seed, DriftSpec(categorical={"c1": {"b0": 1.0}}))
        cw = cw[:n]
        res = tester._categorical(cw)
        for j, ref in enumerate(prof.categorical):
            cnt = np.bincount(cw[:, j], minlength=ref.num_bins)
            assert res["psi"][j] == pytest.approx(psi(ref.ref_props, cnt), abs=1e-12)
            assert res["js"][j] == pytest.approx(jensen_shannon(ref.ref_props, cnt), abs=1e-12)


def _underconfident(n, seed):
    """Predicted probabilities whose top class is right with probability sqrt(confidence): a model that is
    underconfident in a way one temperature cannot fix (its NLL optimum leaves the top class too low)."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.4, 0.95, n)
    rows = np.arange(n)
    top = rng.integers(0, 3, n)
    second = (top + 1 + rng.integers(0, 2, n)) % 3
    third = 3 - top - second
    p = np.zeros((n, 3))
    p[rows, top], p[rows, second], p[rows, third] = c, (1 - c) * 0.8, (1 - c) * 0.2
    right = rng.random(n) < np.sqrt(c)
    y = np.where(right, top, np.where(rng.random(n) < 0.5, second, third))
    return p, y


def test_accuracy_estimate_uses_the_isotonic_confidence_map(world):
    """Temperature scaling alone leaves the top-class confidence ~7 points under the accuracy here; the
    held-out isotonic map (fitted in add_predictions) brings the CBPE-style estimate within 1.5 points."""
    from raysys.monitor.profile import fit_confidence_map

    task, schema, arrays, _ = world
    x, c, _, _ = arrays(500, 3)
    prof = ReferenceProfile.from_arrays(schema, x, c, num_bins=10)
    p, y = _underconfident(4000, 1)
    prof.add_predictions(p, y)
    pr = prof.prediction
    cmap = pr.confidence_map
    assert cmap.shape[0] == 2 and 2 <= cmap.shape[1] <= 100
    assert (np.diff(cmap[0]) > 0).all() and (np.diff(cmap[1]) >= 0).all()  # isotonic
    q, yq = _underconfident(4000, 2)
    realised = float((q.argmax(1) == yq).mean())
    assert realised - pr.calibrated(q).max(1).mean() > 0.04  # what the old estimate would have said
    assert abs(pr.estimate_accuracy(q) - realised) < 0.015
    back = ReferenceProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    np.testing.assert_allclose(back.prediction.confidence_map, cmap)
    assert back.prediction.estimate_accuracy(q) == pytest.approx(pr.estimate_accuracy(q))
    # a profile written before the map existed reads back without one (confidence at face value)
    d = prof.to_dict()
    d["prediction"].pop("confidence_map")
    old = ReferenceProfile.from_dict(d).prediction
    assert old.confidence_map is None
    assert old.estimate_accuracy(q) == pytest.approx(float(old.calibrated(q).max(1).mean()))
    # the PAV itself: a decreasing stretch is pooled into its mean
    m = fit_confidence_map(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.0, 1.0, 0.0, 1.0]), max_knots=4)
    np.testing.assert_allclose(m, [[0.1, 0.25, 0.4], [0.0, 0.5, 1.0]])


def test_feedback_batch_skips_invalid_labels_and_joins_the_rest(world):
    """Labels arrive fire-and-forget from /v1/feedback: one bad item must not lose the batch."""
    task, schema, arrays, prof = world
    mon = _monitor(prof, schema)
    x, c, y, p = arrays(4, 43)
    mon.record({"x_num": x, "x_cat": c, "proba": p, "latency_ms": [1.0] * 3, "request_ids": ["a", "b", "c"],
                "rows_per_request": [1, 1, 2]})
    out = mon.record_feedback_batch([("a", "no_such_class"), ("b", int(y[1])), ("c", [0]), ("zz", 0)])
    assert out == {"received": 4, "matched": 1, "invalid": 2}
    acc = mon.report()["accuracy"]
    assert acc["labels_total"] == 1 and acc["invalid_labels"] == 2 and acc["unmatched_labels"] == 1


def test_snapshots_keep_coming_while_a_dashboard_polls_the_report(world, tmp_path):
    """A client reading /v1/monitor more often than the gauge interval must not starve the snapshots (a report
    refreshed the tick clock, so record() never reached the snapshot and a crash lost everything)."""
    task, schema, arrays, prof = world
    now = [0.0]
    mon = Monitor(prof.to_dict(), schema.model_dump(), {"window_size": 500, "snapshot_uri": str(tmp_path / "snap"),
                                                        "snapshot_interval_s": 10.0}, clock=lambda: now[0])
    x, c, _, p = arrays(60, 5)
    for i in range(30):  # 30 s of traffic, one report every second
        now[0] += 1.0
        mon.record({"x_num": x[i:i + 2], "x_cat": c[i:i + 2], "proba": p[i:i + 2], "latency_ms": [1.0, 1.0]})
        mon.report()
    again = Monitor(prof.to_dict(), schema.model_dump(), {"window_size": 500, "snapshot_uri": str(tmp_path / "snap")})
    assert again.restored and again.report()["rows_seen"] >= 40


def test_a_submission_ray_asks_to_retry_is_retried_within_the_same_alert():
    """"No available agent ... please try again later" (the node's job agent is busy or not up yet) must not wait
    for a later alert: a persistent drift raises its alert once, so a retrain would never be submitted."""
    calls, slept = [], []

    def submit(entry, meta):
        calls.append(entry)
        if len(calls) <= 2:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, "
                               "please try again later.")
        return "job-3"

    trig = RetrainTrigger(enabled=True, cooldown_s=3600, args=[], submit=submit, status=lambda j: "RUNNING",
                          poll_s=None, sleep=slept.append)
    out = trig.maybe_submit("drift", [], background=False)
    assert out["submitted"] and len(calls) == 3 and slept == list(RetrainTrigger.TRANSIENT_WAITS_S[:2])
    assert trig.summary()["job_in_flight"] == "job-3"
    # and it gives up after its waits, leaving the 30 s rule for the next alert
    always = RetrainTrigger(enabled=True, cooldown_s=3600, args=[], poll_s=None, sleep=slept.append,
                            submit=lambda e, m: (_ for _ in ()).throw(RuntimeError("No available agent")),
                            status=lambda j: "RUNNING")
    assert not always.maybe_submit("drift", [], background=False)["submitted"]
