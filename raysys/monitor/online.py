"""The online (per-row) drift detector, calibrated to an expected run time between false alarms (ERT).

Each row becomes one score vector: the normal scores of its numeric features under the reference
(`ReferenceProfile.numeric_scores`, N(0, 1) per column when nothing drifted), standardised one-hots of its
categories and whitened predicted probabilities. Exponentially weighted moving averages (EWMA) of that
vector at a few smoothing constants feed four kinds of chart:

- `max`:  the largest |EWMA| over numeric features (one feature shifting; Bonferroni over features);
- `sum`:  the sum of squared EWMAs over numeric features (small shifts spread over several features);
- `cat`:  Pearson's chi-squared of each categorical feature's EWMA frequencies (Bonferroni over features);
- `pred`: the squared Mahalanobis norm of the EWMA predicted probabilities (black-box shift detection).

Each chart's value is turned into -log(p) under its asymptotic null (normal / chi-squared, with the EWMA's
exact variance lambda/(2-lambda)*(1-(1-lambda)^(2t)) so the first rows are as trustworthy as later ones),
and the detector alarms when the largest of them passes ONE threshold. That threshold is not taken from
the asymptotics: it is calibrated by simulation, running streams bootstrapped from held-out reference rows
through this same code and reading the threshold whose mean run length to a false alarm is the target
ERT (in the spirit of Cobb et al., AISTATS 2022, and alibi-detect's online detectors, here with
EWMA/CUSUM-style charts that cost O(features) per row). After an alarm the detector restarts, so the ERT
is also the expected number of rows between false alarms.

Everything is vectorised over the rows of a batch (`scipy.signal.lfilter` runs the EWMA recursion in C).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from scipy.signal import lfilter
from scipy.special import chdtrc, log_ndtr

DEFAULT_LAMBDAS: dict[str, tuple[float, ...]] = {
    "max": (0.05, 0.12, 0.25),  # one feature: ~1 sigma .. ~0.5 sigma shifts
    "sum": (0.01, 0.03),  # many features, small shifts: long memory
    "cat": (0.03, 0.12),
    "pred": (0.03, 0.12, 0.3),  # a class-prior flip moves the predictions a lot: short memory too
}
MIN_P = 1e-300
TAIL_Q = 0.99  # each chart's null tail is fitted above this per-row quantile ...
TAIL_LOGP = -math.log(1 - TAIL_Q)  # ... and mapped so that -log P(row exceeds) is on one scale
CALIBRATION_MIN_EVENTS = 20  # a threshold is read from the simulation only where it saw this many alarms


def _neglog_chi2_sf(df: float, q: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(chdtrc(df, q), MIN_P))


class OnlineDetector:
    """EWMA charts over per-row score vectors [n_num | sum(cat_sizes) | n_pred]; `update` returns the
    combined per-row score and alarms when it passes `threshold` (then restarts)."""

    def __init__(self, n_num: int, cat_sizes: list[int], n_pred: int, *, threshold: float = math.inf,
                 lambdas: dict[str, Any] | None = None, feature_names: list[str] | None = None,
                 norm: dict[str, Any] | None = None):
        self.norm = {k: (float(q), float(b)) for k, (q, b) in (norm or {}).items()}
        self.n_num = int(n_num)
        self.cat_sizes = [int(k) for k in cat_sizes]
        self.n_pred = int(n_pred)
        self.threshold = float(threshold)
        lam = {k: tuple(float(x) for x in v) for k, v in (lambdas or DEFAULT_LAMBDAS).items()}
        if not self.n_num:
            lam["max"], lam["sum"] = (), ()
        if not self.cat_sizes:
            lam["cat"] = ()
        if not self.n_pred:
            lam["pred"] = ()
        self.lambdas = lam
        self.all_lambdas = sorted({x for v in lam.values() for x in v})
        self.width = self.n_num + sum(self.cat_sizes) + self.n_pred
        self.feature_names = feature_names
        self._cat_bounds = np.cumsum([0] + self.cat_sizes) + self.n_num
        self.reset()
        self.alarms = 0
        self.rows = 0

    def reset(self) -> None:
        self.t = 0
        self.ewma = {lam: np.zeros(self.width) for lam in self.all_lambdas}
        self.last_scores: dict[str, float] = {}

    # ----- state (JSON-able, for snapshots) -----
    def state(self) -> dict[str, Any]:
        return {"t": self.t, "alarms": self.alarms, "rows": self.rows,
                "ewma": {repr(k): v.tolist() for k, v in self.ewma.items()}}

    def load_state(self, st: dict[str, Any]) -> None:
        self.t, self.alarms, self.rows = int(st["t"]), int(st["alarms"]), int(st["rows"])
        for k, v in st["ewma"].items():
            lam = float(k)
            if lam in self.ewma and len(v) == self.width:
                self.ewma[lam] = np.asarray(v, dtype=np.float64)

    # ----- scoring -----
    def _chart_scores(self, E: dict[float, np.ndarray], t: np.ndarray) -> dict[str, np.ndarray]:
        """Per chart (name like 'max@0.05'), -log p per row."""
        out: dict[str, np.ndarray] = {}
        nn = self.n_num
        for lam in self.lambdas["max"]:
            v = lam / (2 - lam) * (1 - (1 - lam) ** (2 * t))
            m = np.abs(E[lam][:, :nn]).max(1) / np.sqrt(v)
            out[f"max@{lam:g}"] = -(math.log(2 * nn) + log_ndtr(-m))
        for lam in self.lambdas["sum"]:
            v = lam / (2 - lam) * (1 - (1 - lam) ** (2 * t))
            e = E[lam][:, :nn]
            out[f"sum@{lam:g}"] = _neglog_chi2_sf(nn, np.einsum("ij,ij->i", e, e) / v)
        if self.lambdas["cat"]:
            n_cat = len(self.cat_sizes)
            for lam in self.lambdas["cat"]:
                v = lam / (2 - lam) * (1 - (1 - lam) ** (2 * t))
                best = None
                for f in range(n_cat):
                    e = E[lam][:, self._cat_bounds[f]:self._cat_bounds[f + 1]]
                    s = _neglog_chi2_sf(max(self.cat_sizes[f] - 1, 1), np.einsum("ij,ij->i", e, e) / v)
                    best = s if best is None else np.maximum(best, s)
                out[f"cat@{lam:g}"] = best - math.log(n_cat)
        for lam in self.lambdas["pred"]:
            v = lam / (2 - lam) * (1 - (1 - lam) ** (2 * t))
            e = E[lam][:, self.width - self.n_pred:]
            out[f"pred@{lam:g}"] = _neglog_chi2_sf(self.n_pred, np.einsum("ij,ij->i", e, e) / v)
        return out

    def _run(self, S: np.ndarray) -> tuple[np.ndarray, dict[float, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        n = len(S)
        t = np.arange(self.t + 1, self.t + n + 1, dtype=np.float64)
        St = np.ascontiguousarray(S.T)  # lfilter is several times faster along the contiguous axis
        E = {}
        for lam in self.all_lambdas:
            y = lfilter([lam], [1.0, lam - 1.0], St, axis=1, zi=((1 - lam) * self.ewma[lam])[:, None])[0]
            E[lam] = y.T
        charts = self._chart_scores(E, t)
        for k, (q, beta) in self.norm.items():
            if k in charts:
                charts[k] = TAIL_LOGP + (charts[k] - q) / beta
        combined = np.max(np.stack(list(charts.values())), 0) if charts else np.zeros(n)
        return combined, E, charts, t

    def scores(self, S: np.ndarray) -> np.ndarray:
        """Combined per-row scores of a stream segment WITHOUT alarms/restarts (calibration uses this);
        advances the state."""
        S = np.asarray(S, dtype=np.float64).reshape(-1, self.width)
        if not len(S):
            return np.zeros(0)
        combined, E, charts, _ = self._run(S)
        self._advance(E, charts, len(S))
        return combined

    def _advance(self, E, charts, n: int, last: int | None = None) -> None:
        i = n - 1 if last is None else last
        for lam in self.all_lambdas:
            self.ewma[lam] = E[lam][i].copy()
        self.t += i + 1
        self.rows += i + 1
        self.last_scores = {k: float(v[i]) for k, v in charts.items()}

    def update(self, S: np.ndarray) -> list[dict[str, Any]]:
        """Feed rows; returns one dict per alarm (row offset in this batch, chart, score, the features most
        to blame) and restarts the detector after each."""
        S = np.asarray(S, dtype=np.float64).reshape(-1, self.width)
        alarms: list[dict[str, Any]] = []
        offset = 0
        while offset < len(S):
            seg = S[offset:]
            combined, E, charts, t = self._run(seg)
            over = np.flatnonzero(combined > self.threshold)
            if not len(over):
                self._advance(E, charts, len(seg))
                break
            i = int(over[0])
            self._advance(E, charts, len(seg), last=i)
            chart = max(self.last_scores, key=self.last_scores.get)
            alarms.append({"row": offset + i, "run_length": self.t, "chart": chart,
                           "score": self.last_scores[chart], "threshold": self.threshold,
                           "features": self._blame(chart, E, i, t[i])})
            self.alarms += 1
            self.reset()
            offset += i + 1
        return alarms

    def _blame(self, chart: str, E, i: int, t: float, top: int = 5) -> list[str]:
        kind, lam = chart.split("@")
        lam = float(lam)
        e = E[lam][i]
        v = lam / (2 - lam) * (1 - (1 - lam) ** (2 * t))
        names = self.feature_names or []
        if kind in ("max", "sum"):
            z = np.abs(e[:self.n_num]) / math.sqrt(v)
            order = np.argsort(-z)[:top]
            return [names[j] if j < len(names) else f"num{j}" for j in order if z[j] > 3.0] or \
                [names[int(order[0])] if int(order[0]) < len(names) else "num0"]
        if kind == "cat":
            q = [float(np.sum(e[self._cat_bounds[f]:self._cat_bounds[f + 1]] ** 2) / v) for f in range(len(self.cat_sizes))]
            f = int(np.argmax(q))
            j = self.n_num + f
            return [names[j] if j < len(names) else f"cat{f}"]
        return ["_prediction"]

    def describe(self) -> dict[str, Any]:
        return {"rows_since_restart": self.t, "alarms": self.alarms, "rows": self.rows,
                "threshold": self.threshold, "scores": dict(self.last_scores),
                "max_score": max(self.last_scores.values()) if self.last_scores else None}


def score_rows(profile, x_num: np.ndarray, x_cat: np.ndarray, proba: np.ndarray | None) -> np.ndarray:
    """Rows -> the detector's score vectors [n, width] (numeric normal scores | category one-hots |
    whitened probabilities; the last block is zeros when the profile has probabilities but the rows don't)."""
    parts = [profile.numeric_scores(x_num), profile.category_scores(x_cat)]
    if profile.prediction is not None:
        if proba is None:
            parts.append(np.zeros((len(x_num), profile.prediction.whiten.shape[1])))
        else:
            parts.append(profile.prediction_scores(proba))
    return np.concatenate(parts, 1)


def detector_for(profile, threshold: float | None = None) -> OnlineDetector:
    spec = profile.detector or {}
    if threshold is None:
        threshold = spec.get("threshold", math.inf)
    n_pred = 0 if profile.prediction is None else profile.prediction.whiten.shape[1]
    return OnlineDetector(len(profile.numeric), [c.num_bins for c in profile.categorical], n_pred,
                          threshold=threshold, lambdas=spec.get("lambdas"), feature_names=profile.feature_names,
                          norm=spec.get("norm"))


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
                       lambdas: dict[str, Any] | None = None, run_rows: int | None = None) -> dict[str, Any]:
    """Bootstrap calibration of the alarm threshold (see the module docstring).

    Streams of `run_rows` rows (default: `ert`, so ~63% of them alarm) are resampled with replacement from
    the given held-out reference rows, scored from a fresh start, and their running maximum kept; for each
    candidate threshold h the run lengths give the censored-exponential estimate
    ERT(h) = rows watched / alarms. The table (h, ERT(h), alarms) is stored so that a monitor configured
    for another ERT reads its threshold from it without simulating again.
    """
    t0 = time.perf_counter()
    S_ref = score_rows(profile, x_num, x_cat, proba)
    n_ref = len(S_ref)
    if n_ref < 50:
        raise ValueError(f"online detector calibration: needs at least 50 held-out rows, got {n_ref}")
    rng = np.random.default_rng(seed)
    L = int(run_rows or min(max(ert, 1000), 50_000))
    runs = max(20, math.ceil(num_rows / L))
    det = OnlineDetector(len(profile.numeric), [c.num_bins for c in profile.categorical],
                         S_ref.shape[1] - len(profile.numeric) - sum(c.num_bins for c in profile.categorical),
                         lambdas=lambdas)
    # pass 1: each chart's per-row null tail (a chi-squared approximation is poor for rare categories or
    # non-Gaussian features; an exponential tail fitted above the 99th percentile puts charts on one scale)
    raw: dict[str, list[np.ndarray]] = {}
    for _ in range(max(4, runs // 5)):
        det.reset()
        _, _, charts, _ = det._run(S_ref[rng.integers(0, n_ref, L)])
        for k, v in charts.items():
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
    spec = {"lambdas": {k: list(v) for k, v in det.lambdas.items()}, "norm": norm, "ert": float(ert), "table": table,
            "calibration": {"rows": runs * L, "runs": runs, "run_rows": L, "source_rows": n_ref, "seed": seed}}
    spec["threshold"], spec["extrapolated"] = threshold_for_ert(spec, ert)
    spec["calibration"]["seconds"] = round(time.perf_counter() - t0, 2)
    return spec
