"""Oracles for `drift.py`: detectors that KNOW the change, each alone at the benchmark's ERT.

Each one's threshold is simulated on undrifted streams (bootstrapped from an undrifted pool: mean run
length = rows watched / alarms, the censored-exponential estimate) to the same expected run length as the
online detector's, with nothing else to watch; its median delay from a fresh start at the change is the
floor the detector is compared with (`delay_over_oracle` = the detector's median delay / the oracle's).

- `alone_at_ert`: a max of CUSUMs over increment columns (the prior flip: the LLR of the known new
  priors; the categorical shift: the multinomial LLR log q(x) / p(x) of the known new frequencies; the
  joint shift: the bivariate-normal LLR of the known new correlation on the pair's normal scores).
- `ramp_oracle`: a mean that grows by a KNOWN slope b a row from an unknown start: the GLR over the
  start nu (window-limited: nu within `window` rows, on a grid) of sum_{s > nu} mu_s z_s - mu_s^2 / 2 with
  mu_s = b (s - nu), computed in O(1) per (t, nu) from two cumulative sums.
"""

from __future__ import annotations

import numpy as np

from raysys.monitor.online import _cusum


def _threshold(runmax: np.ndarray, ert: float, hs: np.ndarray) -> float:
    n0 = runmax.shape[1]
    rl = np.stack([np.searchsorted(r, hs, side="right") for r in runmax])  # [runs, h]: alarm row (0-based)
    arl = np.minimum(rl + 1, n0).sum(0) / np.maximum((rl < n0).sum(0), 1)
    return float(np.interp(np.log(ert), np.log(np.maximum.accumulate(arl)), hs))


def alone_at_ert(l0: np.ndarray, l1: np.ndarray, reps: int, ert: float, seed: int = 0, runs: int = 64,
                 horizon: int = 1000) -> dict:
    """A max-of-CUSUMs chart over increment columns l [rows, J], alone at `ert`: the threshold from `runs`
    bootstrapped undrifted runs of 4 ERT rows, then the delays of `reps` runs on the drifted pool from a
    fresh start (censored at `horizon` + 1)."""
    rng = np.random.default_rng(seed)

    def chart(pool, n):
        return _cusum(pool[rng.integers(0, len(pool), n)], np.zeros(pool.shape[1])).max(1)

    n0 = int(4 * ert)
    runmax = np.stack([np.maximum.accumulate(chart(l0, n0)) for _ in range(runs)])
    h = _threshold(runmax, ert, np.arange(2.0, 20.0, 0.05))
    d = []
    for _ in range(reps):
        over = np.flatnonzero(chart(l1, horizon) > h)
        d.append(over[0] + 1 if len(over) else horizon + 1)
    return {"threshold": h, "median_delay": float(np.median(d)), "kl_per_row": float(l1.mean(0).max())}


def ramp_glr(z: np.ndarray, slope: float, window: int, step: int = 5) -> np.ndarray:
    """Per row t, max over start offsets m in (step, 2 step, ..., window) (m <= t) of the log-likelihood
    ratio of 'the mean grew by `slope` a row over the last m rows' (mu = slope * 1 .. slope * m)."""
    n = len(z)
    s = np.arange(1, n + 1, dtype=np.float64)
    A = np.concatenate([[0.0], np.cumsum(s * z)])  # A[t] = sum_{s<=t} s z_s
    B = np.concatenate([[0.0], np.cumsum(z)])
    t = np.arange(1, n + 1)
    best = np.zeros(n)
    for m in range(step, window + 1, step):
        lo = np.maximum(t - m, 0)
        mm = t - lo  # = m where t >= m
        lin = (A[t] - A[lo]) - lo * (B[t] - B[lo])  # sum_{s in (lo, t]} (s - lo) z_s
        quad = mm * (mm + 1) * (2 * mm + 1) / 6.0
        np.maximum(best, slope * lin - slope * slope * quad / 2, out=best)
    return best


def ramp_oracle(z0: np.ndarray, drifted_streams: list[np.ndarray], slope: float, ert: float, seed: int = 0,
                runs: int = 32, window: int = 1000) -> dict:
    """`ramp_glr` alone at `ert` (threshold from `runs` bootstrapped undrifted runs of 4 ERT rows of the
    drifted feature's normal scores z0), then its delays on `drifted_streams` (normal scores from the
    ramp's start)."""
    rng = np.random.default_rng(seed)
    n0 = int(4 * ert)
    runmax = np.stack([np.maximum.accumulate(ramp_glr(z0[rng.integers(0, len(z0), n0)], slope, window))
                       for _ in range(runs)])
    h = _threshold(runmax, ert, np.arange(2.0, 25.0, 0.05))
    d = []
    for z in drifted_streams:
        over = np.flatnonzero(ramp_glr(z, slope, window) > h)
        d.append(over[0] + 1 if len(over) else len(z) + 1)
    return {"threshold": h, "median_delay": float(np.median(d)), "slope_per_row": slope, "window": window}


def prior_flip_oracle(world, profile, spec, ert: float, reps: int = 400) -> dict:
    """The best any detector watching this model's probabilities can do on the prior flip: a CUSUM that
    KNOWS the new priors (log-likelihood ratio log sum_k pi'_k / pi_k p_k(x)). Its median delay is the floor
    for `delay_median.prior_flip` with this student (a better model moves it, the monitor cannot).
    `direction_unknown`: the detector's own `prior` chart (one CUSUM per class and odds multiplier, their
    maximum) alone at the same ERT: the floor for a chart that does not know WHICH class moved; the gap
    to the oracle is the price of not knowing (about ln K nats of threshold), the gap from it to
    `delay_median.prior_flip` the share of the false-alarm budget the other charts take."""
    pri = np.array([spec.label_priors.get(c, 0.0) for c in world.task.classes])
    pi = profile.prediction.mean
    w = pri / pri.sum() / pi
    _, _, _, p0 = world.arrays(50_000, [0, 4])
    _, _, _, p1 = world.arrays(20_000, [0, 5], spec)
    l0, l1 = np.log(p0 @ w)[:, None], np.log(p1 @ w)[:, None]
    out = {"kl_per_row": float(l1.mean()), **alone_at_ert(l0, l1, reps, ert)}
    ms = (profile.detector or {}).get("charts", {}).get("prior") or []
    if ms:
        def grid(p):
            return np.concatenate([np.log1p((m - 1) * p) - np.log1p((m - 1) * pi) for m in ms], 1)
        out["direction_unknown"] = {"odds_multipliers": list(ms), **alone_at_ert(grid(p0), grid(p1), reps, ert)}
    return out


def categorical_oracle(world, feature: str, spec, ert: float, reps: int = 400) -> dict:
    """A multinomial CUSUM that KNOWS the feature's reference and new frequencies: log q(x) / p(x)."""
    j = world.task.cat_names.index(feature)
    p = world.task.cat_probs[j]
    q = world.task._category_probs(feature, spec.categorical[feature], j)
    llr = np.log(q / p)
    _, c0, _, _ = world.arrays(50_000, [0, 14])
    _, c1, _, _ = world.arrays(20_000, [0, 15], spec)
    return alone_at_ert(llr[c0[:, j]][:, None], llr[c1[:, j]][:, None], reps, ert)


def joint_oracle(world, profile, pair: tuple[str, str], rho: float, spec, ert: float, reps: int = 400) -> dict:
    """The bivariate-normal LLR of the pair's normal scores, correlation rho -> the KNOWN new one."""
    from raysys.monitor.pairs import pair_increments

    i, j = (world.task.num_names.index(x) for x in pair)
    new = spec.correlation[f"{pair[0]}:{pair[1]}"]
    x0, _, _, _ = world.arrays(50_000, [0, 24])
    x1, _, _, _ = world.arrays(20_000, [0, 25], spec)

    def llr(x):
        z = profile.numeric_scores(x)[:, [i, j]]
        return pair_increments(z, [[0, 1, rho]], (new / rho,))

    return alone_at_ert(llr(x0), llr(x1), reps, ert)


def ramp_oracle_for(world, profile, feature: str, spec, ert: float, reps: int = 40, rows: int = 2000) -> dict:
    """`ramp_oracle` on the feature the ramp moves, with its slope (shift / ramp_rows) known."""
    j = world.task.num_names.index(feature)
    slope = spec.covariate[feature] / spec.ramp_rows
    x0, _, _, _ = world.arrays(50_000, [0, 34])
    streams = [profile.numeric_scores(world.arrays(rows, [0, 35, r], spec)[0])[:, j] for r in range(reps)]
    return ramp_oracle(profile.numeric_scores(x0)[:, j], streams, slope, ert)
