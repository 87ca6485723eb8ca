"""Calibrating the online detector (`raysys.monitor.online`) to an expected run length between false alarms:
bootstrap streams of held-out reference rows run through the detector's own code, each chart's null tail is
fitted, and the threshold whose mean run length is the target ERT is read off a stored table (see the
online module's docstring)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from raysys.monitor.online import (
    DEFAULT_WEIGHTS,
    SPEC_VERSION,
    TAIL_Q,
    OnlineDetector,
    score_rows,
)
from raysys.monitor.pairs import correlated_pairs

CALIBRATION_MIN_EVENTS = 20  # a threshold is read from the simulation only where it saw this many alarms


def threshold_for_ert(detector_spec: dict[str, Any], ert: float) -> tuple[float, bool]:
    """The calibrated threshold for `ert` from the stored table (log-linear interpolation; beyond the
    simulated range, extrapolated along the fitted slope). Returns (threshold, extrapolated)."""
    table = np.asarray(detector_spec["table"], dtype=np.float64)  # rows: h, ert_estimate, events
    ok = table[table[:, 2] >= CALIBRATION_MIN_EVENTS]
    if len(ok) < 2:
        raise ValueError("online detector: calibration table too small; calibrate with more rows")
    h, log_ert = ok[:, 0], np.log(np.maximum.accumulate(ok[:, 1]))
    target = math.log(ert)
    if log_ert[0] <= target <= log_ert[-1]:
        return float(np.interp(target, log_ert, h)), False
    # extrapolate from the top (or bottom) part of the curve with a least-squares slope
    part = slice(max(0, len(h) - 12), len(h)) if target > log_ert[-1] else slice(0, min(12, len(h)))
    slope, icept = np.polyfit(h[part], log_ert[part], 1)
    slope = max(slope, 0.3)
    return float((target - icept) / slope), True


def calibrate_detector(profile, x_num: np.ndarray, x_cat: np.ndarray, proba: np.ndarray | None = None, *,
                       ert: float = 10_000, num_rows: int = 1_000_000, seed: int = 0,
                       charts: dict[str, Any] | None = None, run_rows: int | None = None,
                       weights: dict[str, float] | None = None) -> dict[str, Any]:
    """Bootstrap calibration of the alarm threshold (see the module docstring).

    Streams of `run_rows` rows (default: `ert`, so ~63% of them alarm) are resampled with replacement from
    the given held-out reference rows, scored from a fresh start, and their running maximum kept; for each
    candidate threshold h the run lengths give the censored-exponential estimate
    ERT(h) = rows watched / alarms. The table (h, ERT(h), alarms) is stored so that a monitor configured
    for another ERT reads its threshold from it without simulating again. `weights` (chart kind -> share
    of the false-alarm budget, default `DEFAULT_WEIGHTS`; `{}` for equal shares) are stored with it.
    """
    t0 = time.perf_counter()
    S_ref = score_rows(profile, x_num, x_cat, proba)
    n_ref = len(S_ref)
    if n_ref < 50:
        raise ValueError(f"online detector calibration: needs at least 50 held-out rows, got {n_ref}")
    # the pool's numeric means differ from the reference's by sampling noise (~1/sqrt(rows) sigma); CUSUMs
    # tuned to 0.25-0.5 sigma pick that up as small spurious shifts, alarm early in the simulation and
    # set the threshold too high (measured: 1.2x the configured ERT on live traffic); recentring the
    # pool removes that noise
    n_num = len(profile.numeric)
    S_ref[:, :n_num] -= S_ref[:, :n_num].mean(0)
    pairs = correlated_pairs(S_ref[:, :n_num])  # the `joint` chart's pairs and their reference correlations
    rng = np.random.default_rng(seed)
    L = int(run_rows or min(max(ert, 1000), 50_000))
    runs = max(20, math.ceil(num_rows / L))
    det = OnlineDetector(len(profile.numeric), [c.num_bins for c in profile.categorical],
                         0 if profile.prediction is None else len(profile.prediction.mean), charts=charts,
                         cat_props=[c.ref_props for c in profile.categorical],
                         pred_mean=None if profile.prediction is None else profile.prediction.mean,
                         weights=DEFAULT_WEIGHTS if weights is None else weights, pairs=pairs)
    # pass 1: each chart's per-row null tail (the charts' nulls differ in shape - a max of CUSUMs, a
    # chi-squared of EWMAs - and a rare category or a non-Gaussian feature bends them further; an
    # exponential tail fitted above the 99th percentile puts them on one scale)
    raw: dict[str, list[np.ndarray]] = {}
    for _ in range(max(4, runs // 5)):
        det.reset()
        _, charts_v, _ = det._run(S_ref[rng.integers(0, n_ref, L)])
        for k, v in charts_v.items():
            raw.setdefault(k, []).append(v)
    norm = {}
    for k, vs in raw.items():
        v = np.concatenate(vs)
        q = float(np.quantile(v, TAIL_Q))
        beta = float(np.mean(v[v > q] - q)) if (v > q).any() else 1.0
        norm[k] = [q, max(beta, 1e-3)]
    det.norm = {k: tuple(x) for k, x in norm.items()}
    # pass 2: run lengths of the combined, normalised score
    runmax = np.empty((runs, L))
    for r in range(runs):
        det.reset()
        runmax[r] = np.maximum.accumulate(det.scores(S_ref[rng.integers(0, n_ref, L)]))
    hs = np.quantile(runmax[:, -1], np.linspace(0.0, 1.0, 41))
    hs = np.unique(np.concatenate([hs, np.quantile(runmax[:, L // 20], np.linspace(0.0, 1.0, 21))]))
    table = []
    for h in hs:
        rl = np.array([np.searchsorted(r, h, side="right") for r in runmax])  # alarm at row rl (0-based)
        events = int((rl < L).sum())
        exposure = float(np.minimum(rl + 1, L).sum())
        table.append([float(h), exposure / max(events, 1), events])
    spec = {"version": SPEC_VERSION, "charts": {k: list(v) for k, v in det.charts.items()}, "norm": norm,
            "weights": dict(det.weights), "pairs": det.pairs, "ert": float(ert), "table": table,
            "calibration": {"rows": runs * L, "runs": runs, "run_rows": L, "source_rows": n_ref, "seed": seed}}
    spec["threshold"], spec["extrapolated"] = threshold_for_ert(spec, ert)
    spec["calibration"]["seconds"] = round(time.perf_counter() - t0, 2)
    return spec
