"""Tier 1: reference profiles, PSI, the sliding window and the plain Monitor class (no Ray)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raysys.config import DataConfig, MonitorConfig
from raysys.data import DriftSpec, FeatureSpec, Preprocessor, SyntheticTask
from raysys.data.schema import DatasetSchema
from raysys.monitor import (
    Monitor,
    ReferenceProfile,
    RingBuffer,
    SlidingWindow,
    bin_numeric,
    latency_percentiles,
    psi,
)

# ----- PSI -----


def test_psi_identical_is_zero():
    ref = np.array([0.1, 0.2, 0.3, 0.4])
    assert psi(ref, ref * 1000) == pytest.approx(0.0, abs=1e-12)
    assert psi(ref, np.zeros(4)) == 0.0  # empty window: nothing to compare yet


def test_psi_hand_computed():
    # reference 50/50, current 30/70: (0.3-0.5)ln(0.3/0.5) + (0.7-0.5)ln(0.7/0.5)
    expected = -0.2 * math.log(0.6) + 0.2 * math.log(1.4)
    assert expected == pytest.approx(0.1694596, abs=1e-7)
    assert psi([0.5, 0.5], [30, 70], eps=0.0) == pytest.approx(expected, rel=1e-12)
    assert psi([0.5, 0.5], [30, 70]) == pytest.approx(expected, abs=1e-4)  # eps barely moves it
    # an empty reference bin stays finite thanks to the smoothing, and is large
    value = psi([1.0, 0.0], [50, 50])
    assert math.isfinite(value) and value > 1.0
    with pytest.raises(ValueError, match="same 1-D shape"):
        psi([0.5, 0.5], [1, 2, 3])


def _profile_1d(x: np.ndarray, num_bins: int = 10) -> ReferenceProfile:
    schema = DatasetSchema(features=[FeatureSpec(name="x", kind="numeric"),
                                     FeatureSpec(name="c", kind="categorical", categories=["a", "b"])],
                           label="y", classes=["n", "p"])
    return ReferenceProfile.from_arrays(schema, x.reshape(-1, 1), np.zeros((len(x), 1), dtype=np.int64),
                                        num_bins=num_bins)


def _psi_of(profile: ReferenceProfile, x: np.ndarray) -> float:
    bins = bin_numeric(profile, x.reshape(-1, 1))[:, 0]
    return psi(profile.numeric[0].ref_props, np.bincount(bins, minlength=profile.numeric[0].num_bins))


def test_psi_separates_a_one_sigma_shift_from_resampling():
    rng = np.random.default_rng(0)
    prof = _profile_1d(rng.normal(0.0, 1.0, 5000))
    np.testing.assert_allclose(prof.numeric[0].ref_props, 0.1, atol=1e-3)  # decile bins
    same = _psi_of(prof, rng.normal(0.0, 1.0, 3000))
    shifted = _psi_of(prof, rng.normal(1.0, 1.0, 3000))
    assert same < 0.1
    assert shifted > 0.2
    assert shifted > 10 * same


def test_bin_numeric_edges_and_discrete_features():
    prof = _profile_1d(np.repeat([0.0, 1.0, 2.0], [50, 30, 20]), num_bins=10)
    edges = prof.numeric[0].edges
    assert edges.tolist() == [0.0, 1.0, 2.0]  # observed levels, deduplicated: no zero-width bins
    # each level lands in its own bin; values beyond the reference range land in the outer bins
    bins = bin_numeric(prof, np.array([[0.0], [1.0], [2.0], [-5.0], [9.0]]))[:, 0]
    assert len({int(b) for b in bins[:3]}) == 3
    assert bins[3] == 0 and bins[4] == prof.numeric[0].num_bins - 1
    props = prof.numeric[0].ref_props
    assert props.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(sorted(props[props > 0]), [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"shape \[n, 1\]"):
        bin_numeric(prof, np.zeros((3, 2)))


# ----- windows -----


def test_ring_buffer_and_sliding_window_evict_old_rows():
    ring = RingBuffer(5, 1, dtype=np.int64)
    ring.add(np.arange(3).reshape(-1, 1))
    assert ring.values()[:, 0].tolist() == [0, 1, 2]
    ring.add(np.arange(3, 7).reshape(-1, 1))  # wraps around
    assert ring.values()[:, 0].tolist() == [2, 3, 4, 5, 6]
    ring.add(np.arange(10, 22).reshape(-1, 1))  # bigger than the buffer: only the last 5 stay
    assert ring.values()[:, 0].tolist() == [17, 18, 19, 20, 21]

    win = SlidingWindow([3, 2], window_size=4)
    win.add(np.array([[0, 0], [0, 0], [0, 0], [0, 0]]))
    assert win.counts(0).tolist() == [4, 0, 0]
    win.add(np.array([[2, 1], [2, 1], [1, 1]]))  # evicts three of the old rows
    assert len(win) == 4
    assert win.counts(0).tolist() == [1, 1, 2] and win.counts(1).tolist() == [1, 3]
    win.add(np.array([[3, 2]]))  # index == bins: a missing value, left out of the counts
    assert win.counts(0).tolist() == [0, 1, 2] and win.counts(1).tolist() == [0, 3]
    win.clear()
    assert len(win) == 0 and win.counts(0).tolist() == [0, 0, 0]


def test_latency_percentiles():
    assert latency_percentiles([]) == {"p50": None, "p95": None, "p99": None}
    p = latency_percentiles(np.arange(1, 101, dtype=float))
    assert p["p50"] == pytest.approx(50.5) and p["p95"] == pytest.approx(95.05) and p["p99"] == pytest.approx(99.01)


# ----- profile -----


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(DataConfig(num_numeric=4, num_categorical=2, num_categories=4, num_classes=3, seed=3))


def _arrays(task, n, seed, drift=None):
    schema = task.schema()
    table = task.sample(n, seed, drift)
    ident = Preprocessor(schema, [0.0] * len(schema.numeric), [1.0] * len(schema.numeric))
    x_num, x_cat, y = ident.transform_table(table)
    return x_num, x_cat, y, table


def test_profile_json_round_trip_and_size(task):
    schema = task.schema()
    x_num, x_cat, y, table = _arrays(task, 3000, 1)
    prof = ReferenceProfile.from_arrays(schema, x_num, x_cat, num_bins=8, pred=y)
    d = json.loads(json.dumps(prof.to_dict()))
    back = ReferenceProfile.from_dict(d)
    assert back.to_dict() == prof.to_dict()
    assert back.feature_names == [f.name for f in schema.numeric] + [f.name for f in schema.categorical]
    assert back.class_priors is not None and back.class_priors.sum() == pytest.approx(1.0)
    for ref in back.numeric:
        assert ref.num_bins == 8 and ref.ref_props.sum() == pytest.approx(1.0)
    back.check_schema(schema)
    # built from a table it is the same profile (from_table maps categories itself)
    assert ReferenceProfile.from_table(schema, table, num_bins=8, pred=y).to_dict() == prof.to_dict()
    # the size does not grow with the reference
    big = ReferenceProfile.from_arrays(schema, *_arrays(task, 30000, 2)[:2], num_bins=8)
    small = ReferenceProfile.from_arrays(schema, *_arrays(task, 300, 2)[:2], num_bins=8)
    def shape(p):
        return [(len(f["edges"]), len(f["ref_props"])) for f in p["numeric"]] + [
            len(f["ref_props"]) for f in p["categorical"]]

    assert shape(big.to_dict()) == shape(small.to_dict())
    # fine normal-score grid and dense KS grid included: about 10 KB of JSON per numeric feature, whatever
    # the rows (floats of the dense grid rounded to 7 significant digits)
    assert len(json.dumps(big.to_dict())) < 11_000 * len(schema.numeric) + 1000 * len(schema.categorical)


def test_profile_rejects_bad_input(task):
    schema = task.schema()
    x_num, x_cat, _, _ = _arrays(task, 100, 1)
    bad = x_num.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="x1 has NaN"):
        ReferenceProfile.from_arrays(schema, bad, x_cat)
    with pytest.raises(ValueError, match="expected x_num"):
        ReferenceProfile.from_arrays(schema, x_num[:, :2], x_cat)
    d = ReferenceProfile.from_arrays(schema, x_num, x_cat).to_dict()
    d["format"] = 99
    with pytest.raises(ValueError, match="unsupported format"):
        ReferenceProfile.from_dict(d)
    other = DatasetSchema(features=[FeatureSpec(name="z", kind="numeric")], label="y", classes=["a", "b"])
    with pytest.raises(ValueError, match="do not match"):
        Monitor(ReferenceProfile.from_arrays(schema, x_num, x_cat).to_dict(), schema=other.model_dump())


# ----- the Monitor class -----


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _batch(x_num, x_cat, y, version="1", latency=None):
    return {"x_num": x_num.astype(np.float32), "x_cat": x_cat, "pred": y,
            "latency_ms": [5.0] * len(y) if latency is None else latency, "model_version": version}


def test_monitor_flags_only_the_shifted_feature(task):
    schema = task.schema()
    x_num, x_cat, y, _ = _arrays(task, 6000, 1)
    prof = ReferenceProfile.from_arrays(schema, x_num, x_cat, num_bins=10, pred=y)
    cfg = MonitorConfig(window_size=2000, min_rows=500, psi_threshold=0.2)
    mon = Monitor(prof.to_dict(), schema.model_dump(), cfg.model_dump(), model_version=1, clock=FakeClock())

    rep = mon.report()
    assert rep["window_rows"] == 0 and rep["alerts"] == [] and rep["latency_ms"]["p50"] is None
    assert rep["metrics_enabled"] is False  # plain class, no Ray

    # the same distribution, fed in uneven batches: no alerts
    xn, xc, yy, _ = _arrays(task, 3000, 11)
    for lo, hi in [(0, 1), (1, 64), (64, 1000), (1000, 3000)]:
        mon.record(_batch(xn[lo:hi], xc[lo:hi], yy[lo:hi]))
    rep = mon.report()
    assert rep["rows_seen"] == 3000 and rep["window_rows"] == 2000
    assert rep["alerts"] == [], rep["features"]
    assert all(f["psi"] < 0.1 for f in rep["features"].values())
    assert rep["prediction"]["psi"] < 0.1 and not rep["prediction"]["drifted"]
    json.dumps(rep)

    # x2 shifted by one standard deviation and c1 concentrated on one category
    drift = DriftSpec(covariate={"x2": 1.0}, categorical={"c1": {"b3": 1.0}})
    xn, xc, yy, _ = _arrays(task, 2000, 12, drift)
    mon.record(_batch(xn, xc, yy))
    rep = mon.report()
    assert sorted(rep["alerts"]) == ["c1", "x2"]
    assert rep["features"]["x2"]["kind"] == "numeric" and rep["features"]["c1"]["kind"] == "categorical"
    assert rep["features"]["x2"]["psi"] > 0.2 and rep["drift_detected"]
    assert all(f["psi"] < 0.1 for n, f in rep["features"].items() if n not in ("x2", "c1"))

    mon.reset()
    rep = mon.report()
    assert rep["rows_seen"] == 0 and rep["window_rows"] == 0 and rep["alerts"] == []


def test_monitor_waits_for_min_rows(task):
    schema = task.schema()
    x_num, x_cat, y, _ = _arrays(task, 3000, 1)
    prof = ReferenceProfile.from_arrays(schema, x_num, x_cat, pred=y)
    mon = Monitor(prof.to_dict(), None, {"window_size": 1000, "min_rows": 400}, model_version=1, clock=FakeClock())
    xn, xc, yy, _ = _arrays(task, 300, 5, DriftSpec(covariate={"x0": 3.0}))
    mon.record(_batch(xn, xc, yy))
    rep = mon.report()
    assert rep["features"]["x0"]["psi"] > 0.2 and not rep["features"]["x0"]["drifted"] and rep["alerts"] == []
    assert not rep["armed"]
    xn, xc, yy, _ = _arrays(task, 200, 6, DriftSpec(covariate={"x0": 3.0}))
    mon.record(_batch(xn, xc, yy))
    assert mon.report()["alerts"] == ["x0"]


def test_monitor_latency_throughput_versions_and_set_profile(task):
    schema = task.schema()
    x_num, x_cat, y, _ = _arrays(task, 2000, 1)
    prof = ReferenceProfile.from_arrays(schema, x_num, x_cat, pred=y)
    clock = FakeClock(1000.0)
    mon = Monitor(prof, schema, MonitorConfig(window_size=100, latency_window=50), model_version="3", clock=clock)
    # 30 s of traffic: 10 requests (of 2 rows each) per second, latencies 1..300 ms
    lat = iter(np.arange(1, 301, dtype=float))
    for _ in range(30):
        mon.record(_batch(x_num[:20], x_cat[:20], y[:20], version="3", latency=[next(lat) for _ in range(10)]))
        clock.t += 1.0
    rep = mon.report()
    assert rep["requests_seen"] == 300 and rep["rows_seen"] == 600
    assert rep["requests_per_s"] == pytest.approx(10.0) and rep["rows_per_s"] == pytest.approx(20.0)
    assert rep["latency_ms"]["count"] == 50  # the last latency_window requests
    assert rep["latency_ms"]["p50"] == pytest.approx(np.percentile(np.arange(251, 301), 50))
    assert rep["predictions_by_version"] == {"3": 600}
    # a minute later with no traffic the rate decays to zero; then a canary version records too
    clock.t += 61.0
    assert mon.report()["requests_per_s"] == 0.0
    mon.record(_batch(x_num[:5], x_cat[:5], y[:5], version=4, latency=[1.0]))
    mon.record({"x_num": x_num[:2], "x_cat": x_cat[:2], "latency_ms": [2.0]})  # no pred, no version
    rep = mon.report()
    assert rep["predictions_by_version"] == {"3": 602, "4": 5}
    assert rep["prediction"]["rows"] == 100 - 2  # the rows without a prediction are left out

    with pytest.raises(ValueError, match="expected x_num"):
        mon.record({"x_num": x_num[:3, :2], "x_cat": x_cat[:3], "pred": y[:3], "latency_ms": [1.0]})
    bad = x_cat[:3].copy()
    bad[0, 0] = 99
    with pytest.raises(ValueError, match="category index"):
        mon.record({"x_num": x_num[:3], "x_cat": bad, "pred": y[:3], "latency_ms": [1.0]})

    new = ReferenceProfile.from_arrays(schema, x_num + 1.0, x_cat, pred=y)
    mon.set_profile(new.to_dict(), schema.model_dump(), model_version=5)
    rep = mon.report()
    assert rep["model_version"] == "5" and rep["rows_seen"] == 0 and rep["window_rows"] == 0


def test_histogram_sample_keeps_the_extremes_and_the_shape():
    from raysys.monitor.metrics import histogram_sample

    small = np.array([3.0, 1.0, 2.0])
    np.testing.assert_array_equal(histogram_sample(small, 8), small)
    rng = np.random.default_rng(0)
    lat = rng.lognormal(1.0, 0.5, 5000)
    sample = histogram_sample(lat, 32)
    assert len(sample) == 32 and sample[0] == lat.min() and sample[-1] == lat.max()
    # evenly spaced order statistics: the sample's median is the data's median, to within one step
    assert abs(np.median(sample) - np.median(lat)) < (np.quantile(lat, 0.52) - np.quantile(lat, 0.48)) * 2


# ----- window KS at the window's own values, against scipy's two-sample test on the raw reference -----

KS_KINDS = ("normal", "lognormal", "rounded", "zero_inflated")


def _ks_column(kind: str, rng, n: int, shift: float = 0.0) -> np.ndarray:
    """Reference-like columns, `shift` in units of the column's spread."""
    if kind == "normal":
        return rng.normal(5.0 + 2.0 * shift, 2.0, n)
    if kind == "lognormal":  # skewed: a shift of the log
        return rng.lognormal(shift, 1.0, n)
    if kind == "rounded":  # discrete-ish: ~60 levels, many of them between the grid's points
        return np.round(rng.normal(shift, 1.0, n), 1)
    x = rng.normal(shift, 1.0, n)  # an atom of 30% at 0 inside a continuous feature
    x[rng.random(n) < 0.3] = 0.0
    return x


def _ks_profile(ref_cols: np.ndarray) -> ReferenceProfile:
    k = ref_cols.shape[1]
    schema = DatasetSchema(features=[FeatureSpec(name=f"x{j}", kind="numeric") for j in range(k)]
                           + [FeatureSpec(name="c", kind="categorical", categories=["a", "b"])],
                           label="y", classes=["n", "p"])
    return ReferenceProfile.from_arrays(schema, ref_cols, np.zeros((len(ref_cols), 1), dtype=np.int64))


def test_window_ks_statistic_matches_scipy_two_sample():
    """The KS statistic taken at the window's own values (reference CDF interpolated between the profile's 49
    grid points) is the exact two-sample statistic against the raw 10k reference to within 0.005 on continuous
    features (normal, skewed) and 0.01 where the profile cannot resolve the reference (a discrete-ish feature
    whose window values repeat, the continuous part just below an atom), and closer on average than the
    grid-point statistic, which is systematically low."""
    from scipy.stats import ks_2samp

    from raysys.monitor import WindowTester

    rng = np.random.default_rng(0)
    ref = np.column_stack([_ks_column(kind, rng, 10_000) for kind in KS_KINDS])
    tester = WindowTester(_ks_profile(ref))
    err, err_grid = [], []
    for shift in (0.0, 0.1, 0.2, 0.5):
        for _ in range(3):
            xw = np.column_stack([_ks_column(kind, rng, 1000, shift) for kind in KS_KINDS])
            res = tester.test(xw, np.zeros((1000, 1), dtype=np.int64))
            grid = tester.num.stats(xw, 10_000)["ks"]  # the statistic at the grid points only
            exact = np.array([ks_2samp(ref[:, j], xw[:, j]).statistic for j in range(len(KS_KINDS))])
            ours = np.array([res["features"][f"x{j}"]["statistic"] for j in range(len(KS_KINDS))])
            err.append(ours - exact)
            err_grid.append(grid - exact)
            assert (ours >= grid - 1e-12).all()  # the grid points are part of the sup
    err, err_grid = np.abs(np.array(err)), np.abs(np.array(err_grid))
    assert err[:, :2].max() <= 0.005, err[:, :2].max(0)  # normal, lognormal
    assert err[:, 2:].max() <= 0.01, err[:, 2:].max(0)  # rounded, zero-inflated
    # continuous features: about 5x closer than the grid statistic on average
    assert err[:, :2].mean() < 0.5 * err_grid[:, :2].mean(), (err[:, :2].mean(), err_grid[:, :2].mean())
    assert err[:, :2].mean() < 0.0015


def test_ks_pvalue_matches_scipy():
    """scipy's p-value: exact for a 1k window vs a 10k reference (method='auto'), Smirnov's kstwo formula
    beyond 10k rows; ours within 3% of both where decisions are made, and close above."""
    from scipy.stats import kstwo
    from scipy.stats._stats_py import _attempt_exact_2kssamp  # what ks_2samp(method='auto') runs here

    from raysys.monitor.stats import ks_pvalue

    d = np.linspace(0.02, 0.11, 19)
    ours = ks_pvalue(d, 1000, 10_000)
    exact = np.array([_attempt_exact_2kssamp(10_000, 1000, 1000, x, "two-sided")[2] for x in d])
    small = exact < 0.02
    assert small.sum() >= 10 and (exact[small] > 1e-10).all()
    np.testing.assert_allclose(ours[small], exact[small], rtol=0.03)
    np.testing.assert_allclose(ours[~small], exact[~small], atol=0.01)
    big = ks_pvalue(d, 1000, 20_000)
    np.testing.assert_allclose(big[small], kstwo.sf(d, round(1000 * 20_000 / 21_000))[small], rtol=0.01)
    assert (np.diff(ks_pvalue(np.linspace(0.0, 1.0, 500), 1000, 10_000)) <= 0).all()  # decreasing in d
    assert ks_pvalue(0.0, 1000, 10_000) == pytest.approx(1.0) and ks_pvalue(1.0, 1000, 10_000) < 1e-100
    assert ks_pvalue(np.array([0.3]), 0, 10_000).tolist() == [1.0]  # an empty window


def test_window_ks_verdicts_agree_with_scipy_on_clear_cases():
    """BH verdicts at alpha = 0.01 across the numeric features: the same as scipy's KS on windows with no
    shift and on windows with two features shifted by half a standard deviation."""
    from scipy.stats import ks_2samp

    from raysys.monitor import WindowTester, adjust_pvalues

    rng = np.random.default_rng(1)
    kinds = [KS_KINDS[j % 3] for j in range(9)]
    ref = np.column_stack([_ks_column(kind, rng, 10_000) for kind in kinds])
    tester = WindowTester(_ks_profile(ref))
    for shifted in ((), (0, 4)):
        for _ in range(4):
            xw = np.column_stack([_ks_column(kind, rng, 1000, 0.5 if j in shifted else 0.0)
                                  for j, kind in enumerate(kinds)])
            res = tester.test(xw, np.zeros((1000, 1), dtype=np.int64), alpha=0.01, method="bh")
            p_sc = np.array([ks_2samp(ref[:, j], xw[:, j]).pvalue for j in range(len(kinds))])
            want = np.flatnonzero(adjust_pvalues(p_sc, "bh") < 0.01).tolist()
            got = [j for j in range(len(kinds)) if res["features"][f"x{j}"]["drifted"]]
            assert got == want == list(shifted), (got, want)


def test_window_ks_odd_columns_and_old_profiles():
    """Atoms, a constant reference, NaN/inf/huge values, tiny windows: the statistic at the window's values
    never falls below the grid's, stays in [0, 1] with finite p-values, and never exceeds scipy's by more
    than the interpolation error (no spurious jump at an atom). A format-1 profile (the coarse edges as its
    grid) keeps the grid statistic."""
    from scipy.stats import ks_2samp

    from raysys.monitor.profile import NumericRef
    from raysys.monitor.refbins import SegmentedRefs

    rng = np.random.default_rng(2)
    cols = [rng.normal(5, 100, 5000), rng.integers(0, 4, 5000).astype(float), rng.exponential(1e-3, 5000),
            np.full(100, 2.0), rng.normal(1e9, 1, 5000), _ks_column("zero_inflated", rng, 5000),
            _ks_column("rounded", rng, 5000)]
    refs = [NumericRef.build(f"f{j}", c, 10) for j, c in enumerate(cols)]
    seg = SegmentedRefs(refs)
    for n in (0, 1, 7, 1000):
        x = np.column_stack([rng.normal(5, 150, n), rng.integers(-1, 6, n).astype(float), rng.exponential(1e-3, n),
                             rng.choice([1.0, 2.0, 3.0], n), rng.normal(1e9, 2, n),
                             _ks_column("zero_inflated", rng, n, 0.2), _ks_column("rounded", rng, n, 0.2)])
        clean = x.copy()
        if n > 5:
            x[0, 0], x[1, 2], x[2, 4], x[3, 1], x[4, 0] = np.nan, np.inf, -np.inf, refs[1].edges[0], 1e300
        with np.errstate(all="raise"):
            got = seg.stats(x, 5000, exact=True)
            grid = seg.stats(x, 5000)
            ok = seg.stats(clean, 5000, exact=True)
        assert (got["ks"] >= grid["ks"] - 1e-12).all() and (got["ks"] <= 1.0).all()
        assert np.isfinite(got["ks_p"]).all() and ((got["ks_p"] >= 0) & (got["ks_p"] <= 1)).all()
        if n >= 7:
            for j in (1, 3, 5, 6):  # atoms: discrete levels, a constant, a zero-inflated and a rounded feature
                exact = ks_2samp(cols[j], clean[:, j]).statistic
                assert ok["ks"][j] <= exact + 0.005, (n, j, ok["ks"][j], exact)
    old = SegmentedRefs([NumericRef(r.name, r.edges, r.ref_props) for r in refs])  # format 1: no fine grid
    x = np.column_stack([_ks_column("normal", rng, 500, 0.3) * 50 for _ in refs])
    np.testing.assert_array_equal(old.stats(x, 5000, exact=True)["ks"], old.stats(x, 5000)["ks"])


def test_window_ks_dense_grid_matches_scipy_and_old_profiles_load():
    """The profile's dense KS grid (256 reference quantiles with the exact reference CDF, linear in x
    between them): the window statistic is within 0.003 of scipy's two-sample statistic against the raw
    reference on continuous features. A profile dict written before the dense grid (no ks_* keys) still
    loads and tests, on the 49-point grid as before; a 45-numeric profile stays well under 1 MB of JSON."""
    from scipy.stats import ks_2samp

    from raysys.monitor import WindowTester

    rng = np.random.default_rng(3)
    kinds = ("normal", "lognormal") * 2
    ref = np.column_stack([_ks_column(kind, rng, 10_000) for kind in kinds])
    prof = _ks_profile(ref)
    assert all(r.ks_x is not None and len(r.ks_x) == 256 for r in prof.numeric)
    d = json.loads(json.dumps(prof.to_dict()))
    for f in d["numeric"]:
        assert {"ks_x", "ks_cdf"} <= set(f) and "ks_lo" not in f  # continuous: no atoms at the points
        del f["ks_x"], f["ks_cdf"]
    old_prof = ReferenceProfile.from_dict(d)
    assert all(r.ks_x is None for r in old_prof.numeric)
    assert "ks_x" not in old_prof.to_dict()["numeric"][0]
    tester, old = WindowTester(prof), WindowTester(old_prof)
    err, err_old = [], []
    for shift in (0.0, 0.1, 0.25, 0.5):
        for _ in range(3):
            xw = np.column_stack([_ks_column(kind, rng, 1000, shift) for kind in kinds])
            exact = np.array([ks_2samp(ref[:, j], xw[:, j]).statistic for j in range(len(kinds))])
            c = np.zeros((1000, 1), dtype=np.int64)
            for t, e in ((tester, err), (old, err_old)):
                res = t.test(xw, c)
                e.append([res["features"][f"x{j}"]["statistic"] - exact[j] for j in range(len(kinds))])
                assert all(0.0 <= f["p_value"] <= 1.0 for f in res["features"].values())
    err, err_old = np.abs(np.array(err)), np.abs(np.array(err_old))
    assert err.max() <= 0.003, err.max(0)
    assert err.mean() < err_old.mean()  # the dense grid is closer than the 49 points
    assert err_old.max() <= 0.005, err_old.max(0)  # the old profile: today's statistic
    # size: 45 numeric + 5 categorical features
    schema = DatasetSchema(features=[FeatureSpec(name=f"x{j}", kind="numeric") for j in range(45)]
                           + [FeatureSpec(name=f"c{j}", kind="categorical", categories=["a", "b", "c"])
                              for j in range(5)], label="y", classes=["n", "p"])
    big = ReferenceProfile.from_arrays(schema, rng.normal(size=(10_000, 45)),
                                       rng.integers(0, 3, (10_000, 5)))
    assert len(json.dumps(big.to_dict())) <= 1_000_000


def test_record_takes_request_ids_that_are_not_utf8_text(task, tmp_path):
    """An id with a lone surrogate (the endpoint refuses those, but `record` is the monitor's own contract)
    is stored escaped: Parquet takes only UTF-8, and a refused batch would stop the replica's link."""
    import pyarrow.parquet as pq

    schema = task.schema()
    x_num, x_cat, y, _ = _arrays(task, 500, 1)
    prof = ReferenceProfile.from_arrays(schema, x_num, x_cat, pred=y)
    cfg = MonitorConfig(window_size=100, traffic_uri=str(tmp_path / "traffic"))
    mon = Monitor(prof, schema, cfg, model_version="1", clock=FakeClock(1000.0))
    batch = dict(_batch(x_num[:3], x_cat[:3], y[:3]), request_ids=["ok", "bad-\ud800", "\U0001F600"],
                 latency_ms=[1.0, 1.0, 1.0])
    mon.record(batch)
    mon.record(_batch(x_num[3:5], x_cat[3:5], y[3:5], latency=[1.0, 1.0]))
    rep = mon.report()
    assert rep["rows_seen"] == 5 and rep["requests_seen"] == 5
    mon.recent.traffic.flush()
    ids = pq.read_table(mon.traffic.files()[-1]).column("request_id").to_pylist()
    assert ids[:3] == ["ok", "bad-\\ud800", "\U0001F600"]


def test_server_errors_are_counted_per_version_apart_from_client_errors(task):
    schema = task.schema()
    x_num, x_cat, y, _ = _arrays(task, 500, 1)
    prof = ReferenceProfile.from_arrays(schema, x_num, x_cat, pred=y)
    mon = Monitor(prof, schema, MonitorConfig(window_size=100), model_version="1", clock=FakeClock(1000.0))
    mon.record(dict(_batch(x_num[:4], x_cat[:4], y[:4]), errors=2))  # two 4xx of stable
    mon.record({"x_num": np.zeros(0), "x_cat": np.zeros(0), "latency_ms": [], "model_version": "2", "errors": 5,
                "server_errors": 4})
    rep = mon.report()
    assert rep["errors_by_version"] == {"1": 2, "2": 5}
    assert rep["server_errors_by_version"] == {"2": 4}
    again = Monitor(prof, schema, MonitorConfig(window_size=100), model_version="1", clock=FakeClock(1000.0))
    again.counts.load_state(mon.counts.state(), np.zeros((0, 1)))
    assert again.report()["server_errors_by_version"] == {"2": 4}


def test_the_monitor_actor_starts_with_the_configured_malloc_arenas():
    """monitor.malloc_arena_max reaches the actor's runtime_env (read by glibc when its process starts), beside the
    caller's own actor options and env vars (which win); None leaves glibc's default."""
    from raysys.monitor.actor import MONITOR_ACTOR_OPTIONS, monitor_actor_options

    opts = monitor_actor_options({"resources": {"monitor_node": 1}}, MonitorConfig().model_dump())
    assert opts["runtime_env"] == {"env_vars": {"MALLOC_ARENA_MAX": "2"}}
    assert opts["resources"] == {"monitor_node": 1} and opts["max_restarts"] == MONITOR_ACTOR_OPTIONS["max_restarts"]
    mine = monitor_actor_options({"runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "4", "X": "1"}}},
                                 MonitorConfig(malloc_arena_max=3))
    assert mine["runtime_env"]["env_vars"] == {"MALLOC_ARENA_MAX": "4", "X": "1"}
    assert "runtime_env" not in monitor_actor_options(None, {"malloc_arena_max": None})
    with pytest.raises(ValueError, match="malloc_arena_max"):
        monitor_actor_options(None, {"malloc_arena_max": 0})
