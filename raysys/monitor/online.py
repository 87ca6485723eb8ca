"""The online (per-row) drift detector, calibrated to an expected run time between false alarms (ERT).

Each row becomes one score vector: the normal scores of its numeric features under the reference
(`ReferenceProfile.numeric_scores`, N(0, 1) per column when nothing drifted), the one-hots of its
categories and the model's predicted probabilities. Eight kinds of chart watch that stream:

- `cusum`: per numeric feature and direction, Page's CUSUM of the log-likelihood ratio of a mean shift of
  `d` reference sigmas (d in `charts["cusum"]`, by default 0.5 and 1): S <- max(0, S + d*z - d^2/2).
  A CUSUM tuned to the shift is the optimal detector of it (Lorden, Moustakides); all of them are on one
  scale (log-likelihood ratios), so the chart is their maximum, a Bonferroni over features that costs
  only ln(#statistics) in the threshold (a sum over 45 features would bury one shifted feature's signal
  under 44 features' noise).
- `spread`: sum_j log(1 - p0 + p0 exp(S_j)) over per-feature CUSUMs S_j tuned to 0.25 sigma: the
  likelihood ratio of "each feature shifted with probability p0", so that a few features shifting a
  little add up (the sparse-mixture statistic of Xie & Siegmund, 2013, on Mei's local CUSUMs, 2010).
- `sum@lambda`: the sum of squared EWMAs of the normal scores (small shifts spread over several features,
  where no single feature's CUSUM gets there first), as -log p under its chi-squared null.
- `cat`: per categorical feature, an *adaptive* multinomial CUSUM: the alternative's category
  frequencies are an EWMA of the frequencies seen before the current row (mixed with the reference's), so
  the increment log(q_{t-1}(x_t) / p(x_t)) is a valid log-likelihood ratio under the null (q_{t-1} does
  not look at x_t; Lorden & Pollak 2005) and approaches the full multinomial KL whatever the new
  frequencies are.
- `trend@lambda` (`raysys.monitor.shapes`): per numeric feature, the double-exponential trend filter
  2 E1 - E2 of its normal scores, squared over its exact null variance, the chart their maximum: a slow
  ramp (0 -> 1 sigma over 1,000 rows) has grown past a CUSUM's step before that CUSUM sees it; the filter's
  signal-to-noise on such a ramp is within 2% of the matched (known-start) filter's at lambda = 0.003.
- `catrev@j` (`raysys.monitor.shapes`): per categorical feature j, a CUSUM against a FIXED alternative, its
  reference frequencies turned over (the schema's order reversed): free of the adaptive chart's learning
  cost on exactly that shift, negative drift on any other. One chart per feature, each with its own null
  tail (a rare category's reversal jumps by several nats; inside one maximum it would set every other
  feature's threshold).
- `joint` (`raysys.monitor.pairs`): per pair of numeric features the reference shows correlated (found on
  the calibration rows, stored in the spec as `pairs`), CUSUMs of the bivariate-normal log-likelihood
  ratio of the normal scores' correlation moving from rho to -rho and to 0: a correlation that flips with
  both marginals unchanged, which no per-feature chart or window test can see.
- `prior`: black-box shift detection on the predicted probabilities: the CUSUM of the log-likelihood
  ratio of a label-prior shift, which for a calibrated model is log sum_k (pi'_k / pi_k) p_k(x), one per
  class k with pi' = that class's odds multiplied by m (m in `charts["prior"]`), the chart their maximum.
  A class becoming much more frequent is the shift that costs accuracy fastest; on the benchmark's
  student such a flip moves 0.26 nats a row, so every nat of threshold is ~4 rows of delay. The direction
  is unknown: the maximum over K classes costs ln K (measured: a CUSUM that knows the class and the new
  priors needs 23-24 rows at ERT 10k; the max over 4 classes alone 28-30). Finer grids, a dense grid over the
  prior simplex (a GLR proxy) and a magnitude grid (m = 0.25, 3, 9) were measured slower: each added
  alternative raises the threshold more than its better fit saves. Temperature, bias-corrected or matrix
  calibration of the probabilities left the flip's KL unchanged (0.258 nats; a held-out logistic
  recalibration on the probabilities AND the features 0.265: not worth a second model), so the chart
  takes the model's probabilities as they are (pi is their held-out mean, so the increments are
  likelihood ratios with mean 1 under the reference whatever the calibration).
- `pred@lambda`: the same CUSUM against an adaptive alternative prior (the EWMA of the predicted
  probabilities seen before the row, Lorden & Pollak): any direction, small shifts, classes vanishing.
  Its null tail is much lighter than the grid's maximum, so it is a chart of its own (inside the `prior`
  maximum it would never be the one to alarm).

Each chart's value is put on one scale by an exponential tail fitted to its per-row null distribution
above the 99th percentile, plus the log of its kind's budget weight (`weights`: a kind with weight w
alarms w times as often per row as a kind with weight 1), and the detector alarms when the largest passes
ONE threshold. That threshold is calibrated by simulation: streams bootstrapped from held-out reference
rows run through this same code and the threshold whose mean run length to a false alarm is the target
ERT is read off (in the spirit of Cobb et al., AISTATS 2022, and alibi-detect's online detectors). After
an alarm the detector restarts, so the ERT is also the expected number of rows between false alarms.

The weights split that one false-alarm budget. With equal weights the numeric `cusum` and `sum` charts
took ~80% of the false alarms on the benchmark and the `prior` chart 12%; its signal is one number a row,
and each nat it gives up costs it ~4 rows while a 0.5 sigma feature shift loses ~8 of its ~90 (the
numeric targets have room), so `prior` got most of the budget. The ramp's delay grows only with the cube
root of the threshold, so `trend` needs a large share to come near its oracle: weights prior 12, trend
16, pred 4, catrev 2 per feature (5 features: 10), the rest 1; on the benchmark (ERT 10k, 45 numeric and 5
categorical features; 210 false alarms in 2M rows, details.ert.alarms_by_chart) `prior` raised 41% of
the false alarms, `trend` 31%, the `catrev` charts 16%, `cusum` 5%, `joint` 3%, `pred` and `sum` 2% each.
The 0.25 sigma (5 of 50 features) delay pays for it: 170 rows, from 158.5 with the v3 split.

Everything is vectorised over the rows of a batch: the EWMAs run in C (`scipy.signal.lfilter`), and a
CUSUM is S_t = C_t - min(-S_0, min_{s<=t} C_s) with C the cumulative sum of its increments (Lindley's
recursion unrolled), i.e. one `cumsum` and one `minimum.accumulate` per batch.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy.special import chdtrc

from raysys.monitor.pairs import ALTERNATIVES, pair_increments
from raysys.monitor.shapes import reversed_alternative_llr, trend_variance

SPEC_VERSION = 4  # detector specs calibrated for these charts
# specs this code still runs as calibrated: version 3 had no `joint` chart (nor `pairs`); version 2 also had
# the adaptive prior alternatives (`pred`) inside the `prior` chart's maximum and equal budget weights; older
# ones must be recalibrated
READABLE_SPEC_VERSIONS = (2, 3, 4)
DEFAULT_CHARTS: dict[str, tuple[float, ...]] = {
    "cusum": (0.5, 1.0),  # numeric: mean shifts (reference sigmas) the per-feature CUSUMs are tuned to
    "spread": (0.25,),  # numeric: per-feature CUSUMs summed with a sparsity prior (Mei 2010; Xie & Siegmund 2013)
    "sum": (0.01,),  # numeric: EWMA constants of the sum-of-squares charts (small shifts of many features)
    "cat": (0.01,),  # categorical: EWMA constant of the adaptive alternative's frequencies
    "prior": (6.0,),  # predictions: odds multiplier(s) of one class (a class becoming much more frequent)
    "pred": (0.03,),  # predictions: EWMA constant of the adaptive alternative prior
    "joint": ALTERNATIVES,  # correlated numeric pairs: alternative correlations as multiples of the reference's
    "trend": (0.003,),  # numeric: EWMA constants of the per-feature trend filters (slow ramps)
    "catrev": (1.0,),  # categorical: weights of the reversed frequencies in the fixed alternatives
}
# each chart kind's share of the false-alarm budget (relative; a kind left out has 1): the alarm score is
# max_k (score_k + log w_k), so chart k alarms at w_k times the others' per-row tail probability (see the
# module docstring for the split)
DEFAULT_WEIGHTS: dict[str, float] = {"prior": 12.0, "pred": 4.0, "trend": 16.0, "catrev": 2.0}
ADAPT_WEIGHT = 0.9  # adaptive alternatives: share of the estimate (the rest is the reference: bounded loss)
MIN_P = 1e-300
TAIL_Q = 0.99  # each chart's null tail is fitted above this per-row quantile ...
TAIL_LOGP = -math.log(1 - TAIL_Q)  # ... and mapped so that -log P(row exceeds) is on one scale
SPREAD_P0 = 0.03  # `spread`: prior share of shifted features
PROP_FLOOR = 1e-4  # reference frequencies are floored here (a category never seen still has a finite LLR)


def _neglog_chi2_sf(df: float, q: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(chdtrc(df, q), MIN_P))


def _cusum(inc: np.ndarray, s0: np.ndarray) -> np.ndarray:
    """Page's CUSUM S_t = max(0, S_{t-1} + inc_t) of every column at once, from S_0 = s0."""
    c = np.cumsum(inc, axis=0)
    return c - np.minimum(np.minimum.accumulate(c, axis=0), -s0)


def _ewma(x: np.ndarray, lam: float, z0: np.ndarray) -> np.ndarray:
    """EWMA y_t = (1 - lam) y_{t-1} + lam x_t of every column, from y_0 = z0 ([n, m] -> [n, m])."""
    # imported here: scipy.signal takes ~1 s to import, which every process importing raysys.monitor (a Serve
    # replica, the app's build task, the CLI) would pay for a function only the monitor actor calls
    from scipy.signal import lfilter

    xt = np.ascontiguousarray(x.T)  # lfilter is several times faster along the contiguous axis
    return lfilter([lam], [1.0, lam - 1.0], xt, axis=1, zi=((1 - lam) * z0)[:, None])[0].T


def _lagged(y: np.ndarray, y0: np.ndarray) -> np.ndarray:
    """Row t of the result is row t-1 of y (row 0 is y0): the estimate made before seeing row t."""
    return np.concatenate([y0[None, :], y[:-1]], 0)


class OnlineDetector:
    """CUSUM/EWMA charts over per-row score vectors [n_num | sum(cat_sizes) | n_pred] (see the module
    docstring); `update` returns the alarms and restarts after each."""

    def __init__(self, n_num: int, cat_sizes: list[int], n_pred: int, *, threshold: float = math.inf,
                 charts: dict[str, Any] | None = None, feature_names: list[str] | None = None,
                 norm: dict[str, Any] | None = None, cat_props: list[np.ndarray] | None = None,
                 pred_mean: np.ndarray | None = None, weights: dict[str, float] | None = None,
                 version: int = SPEC_VERSION, pairs: list[list[float]] | None = None):
        if version not in READABLE_SPEC_VERSIONS:
            raise ValueError(f"online detector: spec version {version!r} is not one of {READABLE_SPEC_VERSIONS}")
        self.version = int(version)
        self.weights = {k: float(w) for k, w in (weights or {}).items()}
        bad = {k: w for k, w in self.weights.items() if not (math.isfinite(w) and w > 0)}
        if bad:
            raise ValueError(f"online detector: weights must be positive and finite, got {bad}; leave a chart "
                             "out of `charts` to turn it off")
        self._log_w = {k: math.log(w) for k, w in self.weights.items()}
        self.norm = {k: (float(q), float(b)) for k, (q, b) in (norm or {}).items()}
        self.n_num = int(n_num)
        self.cat_sizes = [int(k) for k in cat_sizes]
        self.n_pred = int(n_pred)
        self.threshold = float(threshold)
        ch = {k: tuple(float(x) for x in v) for k, v in (charts or DEFAULT_CHARTS).items()}
        for k in DEFAULT_CHARTS:
            ch.setdefault(k, ())
        if not self.n_num:
            ch["cusum"], ch["sum"], ch["spread"], ch["trend"] = (), (), (), ()
        if not self.cat_sizes:
            ch["cat"], ch["catrev"] = (), ()
        if not self.n_pred:
            ch["prior"], ch["pred"] = (), ()
        self.pairs = [[int(i), int(j), float(r)] for i, j, r in (pairs or []) if max(i, j) < self.n_num]
        if not self.pairs:
            ch["joint"] = ()
        self.charts = ch
        self.width = self.n_num + sum(self.cat_sizes) + self.n_pred
        self.feature_names = feature_names
        n_cat_cols = sum(self.cat_sizes)
        self._cat0 = self.n_num
        self._cat_off = np.cumsum([0] + self.cat_sizes[:-1]).astype(np.int64)
        self._cat_feature = np.repeat(np.arange(len(self.cat_sizes)), self.cat_sizes)
        if cat_props is None:
            cat_props = [np.full(k, 1.0 / k) for k in self.cat_sizes]
        props = [np.maximum(np.asarray(p, dtype=np.float64), PROP_FLOOR) for p in cat_props]
        self.cat_p = np.concatenate([p / p.sum() for p in props]) if props else np.zeros(0)
        assert len(self.cat_p) == n_cat_cols
        pm = np.full(self.n_pred, 1.0 / max(self.n_pred, 1)) if pred_mean is None else np.asarray(pred_mean, float)
        self.pred_mean = np.maximum(pm, PROP_FLOOR)
        # the CUSUMs' columns: numeric [d1+, d1-, d2+, ...] x features; categorical features; prior alternatives
        self._n_cus = 2 * len(ch["cusum"]) * self.n_num
        self._n_spread = 2 * len(ch["spread"]) * self.n_num
        self._n_prior = len(ch["prior"]) * self.n_pred + len(ch["pred"])
        self._n_catc = len(ch["cat"]) * len(self.cat_sizes)
        self._n_joint = len(ch["joint"]) * len(self.pairs)
        self._n_catrev = len(ch["catrev"]) * len(self.cat_sizes)
        self._rev_llr = [reversed_alternative_llr(self.cat_p, self.cat_sizes, w) for w in ch["catrev"]]
        self.reset()
        self.alarms = 0
        self.rows = 0

    def reset(self) -> None:
        self.t = 0
        self.ewma = {f"sum@{lam:g}": np.zeros(self.n_num) for lam in self.charts["sum"]}
        self.ewma.update({f"cat@{lam:g}": self.cat_p.copy() for lam in self.charts["cat"]})
        self.ewma.update({f"pred@{lam:g}": self.pred_mean.copy() for lam in self.charts["pred"]})
        for lam in self.charts["trend"]:
            self.ewma[f"trend@{lam:g}"] = np.zeros(self.n_num)
            self.ewma[f"trend2@{lam:g}"] = np.zeros(self.n_num)
        self.cusum = {"cusum": np.zeros(self._n_cus), "spread": np.zeros(self._n_spread),
                      "cat": np.zeros(self._n_catc), "prior": np.zeros(self._n_prior),
                      "joint": np.zeros(self._n_joint), "catrev": np.zeros(self._n_catrev)}
        self.last_scores: dict[str, float] = {}

    # ----- state (JSON-able, for snapshots) -----
    def state(self) -> dict[str, Any]:
        return {"version": self.version, "t": self.t, "alarms": self.alarms, "rows": self.rows,
                "ewma": {k: v.tolist() for k, v in self.ewma.items()},
                "cusum": {k: v.tolist() for k, v in self.cusum.items()}}

    def load_state(self, st: dict[str, Any]) -> None:
        self.alarms, self.rows = int(st["alarms"]), int(st["rows"])
        if st.get("version") != self.version:  # another detector's statistics: start the charts afresh
            self.reset()
            return
        self.t = int(st["t"])
        for store, key in ((self.ewma, "ewma"), (self.cusum, "cusum")):
            for k, v in st.get(key, {}).items():
                if k in store and len(v) == len(store[k]):
                    store[k] = np.asarray(v, dtype=np.float64)

    # ----- scoring -----
    def _run(self, S: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """Segment [n, width] -> (per-row statistics to carry: EWMAs and CUSUMs [n, m]; per chart -log p
        per row; combined score per row)."""
        n = len(S)
        nn, ch = self.n_num, self.charts
        t = np.arange(self.t + 1, self.t + n + 1, dtype=np.float64)
        carry: dict[str, np.ndarray] = {}
        charts: dict[str, np.ndarray] = {}
        Z = S[:, :nn]
        if ch["cusum"]:
            d = np.repeat(np.asarray([[x, -x] for x in ch["cusum"]]).ravel(), nn)  # [2 * len * nn]
            inc = np.tile(Z, 2 * len(ch["cusum"])) * d - d * d / 2
            carry["cusum"] = cs = _cusum(inc, self.cusum["cusum"])
            charts["cusum"] = cs.max(1)
        if ch["spread"]:
            d = np.repeat(np.asarray([[x, -x] for x in ch["spread"]]).ravel(), nn)
            inc = np.tile(Z, 2 * len(ch["spread"])) * d - d * d / 2
            carry["spread"] = cs = _cusum(inc, self.cusum["spread"])
            # per feature the larger of its CUSUMs; then sum_j log(1 - p0 + p0 * exp(S_j)): the likelihood
            # ratio of "each feature shifted with probability p0" (a few features adding up beat one)
            m = cs.reshape(n, -1, nn).max(1)
            charts["spread"] = np.logaddexp(math.log1p(-SPREAD_P0), math.log(SPREAD_P0) + m).sum(1)
        for lam in ch["sum"]:
            key = f"sum@{lam:g}"
            carry[key] = e = _ewma(Z, lam, self.ewma[key])
            v = lam / (2 - lam) * (1 - (1 - lam) ** (2 * t))
            charts[key] = _neglog_chi2_sf(nn, np.einsum("ij,ij->i", e, e) / v)
        H = S[:, nn:nn + len(self.cat_p)]  # the categories' one-hots
        if ch["cat"]:
            incs = []
            for lam in ch["cat"]:
                key = f"cat@{lam:g}"
                carry[key] = est = _ewma(H, lam, self.ewma[key])
                q = ADAPT_WEIGHT * _lagged(est, self.ewma[key]) + (1 - ADAPT_WEIGHT) * self.cat_p
                incs.append(np.add.reduceat(H * np.log(q / self.cat_p), self._cat_off, axis=1))
            carry["cat"] = cs = _cusum(np.concatenate(incs, 1), self.cusum["cat"])
            charts["cat"] = cs.max(1)
        for lam in ch["trend"]:
            k1, k2 = f"trend@{lam:g}", f"trend2@{lam:g}"
            carry[k1] = e1 = _ewma(Z, lam, self.ewma[k1])
            carry[k2] = e2 = _ewma(e1, lam, self.ewma[k2])
            f = 2 * e1 - e2
            charts[k1] = np.square(f).max(1) / trend_variance(lam, t)
        if ch["catrev"]:
            inc = np.concatenate([np.add.reduceat(H * llr, self._cat_off, axis=1) for llr in self._rev_llr], 1)
            carry["catrev"] = cs = _cusum(inc, self.cusum["catrev"])
            # one chart per feature (its own null tail): a rare category's reversal makes jumps of several
            # nats, a tail that would set the threshold of every other feature's smooth CUSUM in a maximum
            nf = len(self.cat_sizes)
            for j in range(nf):
                charts[f"catrev@{j}"] = cs[:, j::nf].max(1)
        if ch["joint"]:
            carry["joint"] = cs = _cusum(pair_increments(Z, self.pairs, ch["joint"]), self.cusum["joint"])
            charts["joint"] = cs.max(1)
        if ch["prior"] or ch["pred"]:
            P = S[:, self.width - self.n_pred:]
            pi = self.pred_mean
            incs = [np.log1p((m - 1) * P) - np.log1p((m - 1) * pi) for m in ch["prior"]]
            for lam in ch["pred"]:
                key = f"pred@{lam:g}"
                carry[key] = est = _ewma(P, lam, self.ewma[key])
                w = ADAPT_WEIGHT * _lagged(est, self.ewma[key]) / pi + (1 - ADAPT_WEIGHT)
                incs.append(np.log(np.maximum(np.einsum("ij,ij->i", w, P), MIN_P))[:, None])
            carry["prior"] = cs = _cusum(np.concatenate(incs, 1), self.cusum["prior"])
            n_grid = len(ch["prior"]) * self.n_pred
            if self.version < 3:  # version 2: one chart, the maximum over all the alternatives
                charts["prior"] = cs.max(1)
            else:
                # the adaptive alternatives' CUSUMs have a much lighter null tail than the fixed grid's
                # maximum: inside one maximum they would never be the one to alarm, so each is its own chart
                if n_grid:
                    charts["prior"] = cs[:, :n_grid].max(1)
                for i, lam in enumerate(ch["pred"]):
                    charts[f"pred@{lam:g}"] = cs[:, n_grid + i]
        for k, (q, beta) in self.norm.items():
            if k in charts:
                charts[k] = TAIL_LOGP + (charts[k] - q) / beta + self._log_w.get(k.split("@")[0], 0.0)
        combined = np.max(np.stack(list(charts.values())), 0) if charts else np.zeros(n)
        return carry, charts, combined

    def scores(self, S: np.ndarray) -> np.ndarray:
        """Combined per-row scores of a stream segment WITHOUT alarms/restarts (calibration uses this);
        advances the state."""
        S = np.asarray(S, dtype=np.float64).reshape(-1, self.width)
        if not len(S):
            return np.zeros(0)
        carry, charts, combined = self._run(S)
        self._advance(carry, charts, len(S) - 1)
        return combined

    def _advance(self, carry, charts, i: int) -> None:
        for k, v in carry.items():
            (self.cusum if k in self.cusum else self.ewma)[k] = v[i].copy()
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
            carry, charts, combined = self._run(seg)
            over = np.flatnonzero(combined > self.threshold)
            if not len(over):
                self._advance(carry, charts, len(seg) - 1)
                break
            i = int(over[0])
            self._advance(carry, charts, i)
            chart = max(self.last_scores, key=self.last_scores.get)
            alarms.append({"row": offset + i, "run_length": self.t, "chart": chart,
                           "score": self.last_scores[chart], "threshold": self.threshold,
                           "features": self.blame(chart, top=5)})
            self.alarms += 1
            self.reset()
            offset += i + 1
        return alarms

    def _name(self, j: int) -> str:
        names = self.feature_names or []
        return names[j] if j < len(names) else (f"num{j}" if j < self.n_num else f"cat{j - self.n_num}")

    def blame(self, chart: str, top: int = 5) -> list[str]:
        """The features behind `chart`'s current value (call before the restart)."""
        kind = chart.split("@")[0]
        if kind == "cusum":
            s = self.cusum["cusum"].reshape(-1, self.n_num).max(0)  # per feature, over sizes and directions
            order = [int(j) for j in np.argsort(-s)[:top]]
            return [self._name(j) for j in order if s[j] >= 0.5 * s[order[0]]]
        if kind == "sum":
            z = np.abs(self.ewma[chart])
            order = [int(j) for j in np.argsort(-z)[:top]]
            return [self._name(j) for j in order if z[j] >= 0.5 * z[order[0]]]
        if kind == "cat":
            s = self.cusum["cat"].reshape(-1, len(self.cat_sizes)).max(0)
            return [self._name(self.n_num + int(np.argmax(s)))]
        if kind == "trend":
            lam = chart.split("@")[1]
            f = np.abs(2 * self.ewma[f"trend@{lam}"] - self.ewma[f"trend2@{lam}"])
            order = [int(j) for j in np.argsort(-f)[:top]]
            return [self._name(j) for j in order if f[j] >= 0.5 * f[order[0]]]
        if kind == "catrev":
            return [self._name(self.n_num + int(chart.split("@")[1]))]
        if kind == "joint":
            i, j, _ = self.pairs[int(np.argmax(self.cusum["joint"])) // len(self.charts["joint"])]
            return [self._name(i), self._name(j)]
        return ["_prediction"]

    def describe(self) -> dict[str, Any]:
        return {"rows_since_restart": self.t, "alarms": self.alarms, "rows": self.rows,
                "threshold": self.threshold, "weights": dict(self.weights),
                "spec_version": self.version, "scores": dict(self.last_scores),
                "max_score": max(self.last_scores.values()) if self.last_scores else None}


def score_rows(profile, x_num: np.ndarray, x_cat: np.ndarray, proba: np.ndarray | None) -> np.ndarray:
    """Rows -> the detector's score vectors [n, width]: numeric normal scores | category one-hots |
    predicted probabilities (the reference's mean probabilities when the profile has predictions but the
    rows don't: a neutral value for every prediction chart)."""
    x_cat = np.asarray(x_cat, dtype=np.int64)
    n = len(x_num)
    sizes = [c.num_bins for c in profile.categorical]
    k_pred = 0 if profile.prediction is None else len(profile.prediction.mean)
    out = np.zeros((n, len(profile.numeric) + sum(sizes) + k_pred))
    out[:, :len(profile.numeric)] = profile.numeric_scores(x_num)
    if sizes:
        off = len(profile.numeric) + np.cumsum([0] + sizes[:-1])
        rows = np.arange(n)[:, None]
        out[rows, off + np.clip(x_cat.reshape(n, len(sizes)), 0, np.asarray(sizes) - 1)] = 1.0
    if k_pred:
        out[:, out.shape[1] - k_pred:] = profile.prediction.mean if proba is None else np.asarray(proba, float)
    return out


def is_current(detector_spec: dict[str, Any] | None) -> bool:
    """Whether a stored detector spec was calibrated for charts this version can run (its own, or an older
    layout it still runs as calibrated: `detector_for` warns)."""
    return bool(detector_spec) and detector_spec.get("version") in READABLE_SPEC_VERSIONS


def detector_for(profile, threshold: float | None = None) -> OnlineDetector:
    spec = profile.detector or {}
    if spec and not is_current(spec):
        raise ValueError("online detector: the profile's detector was calibrated by an older raysys; "
                         "recalibrate it (ReferenceProfile.calibrate) or re-register the model")
    version = spec.get("version", SPEC_VERSION)
    if spec and version != SPEC_VERSION:
        warnings.warn(f"online detector: the profile's detector was calibrated by an older raysys (spec version "
                      f"{version}); running its charts as calibrated, without the newer label-shift charts and "
                      "budget weights; re-register the model (or ReferenceProfile.calibrate) to use them",
                      stacklevel=2)
    if threshold is None:
        threshold = spec.get("threshold", math.inf)
    n_pred = 0 if profile.prediction is None else len(profile.prediction.mean)
    return OnlineDetector(len(profile.numeric), [c.num_bins for c in profile.categorical], n_pred,
                          threshold=threshold, charts=spec.get("charts"), feature_names=profile.feature_names,
                          norm=spec.get("norm"), cat_props=[c.ref_props for c in profile.categorical],
                          pred_mean=None if profile.prediction is None else profile.prediction.mean,
                          weights=spec.get("weights"), version=version, pairs=spec.get("pairs"))
