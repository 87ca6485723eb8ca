"""The online detector's charts for drifts of a known SHAPE: slow ramps (`trend`) and categorical
frequencies turning over (`catrev`).

- `trend@lambda`: per numeric feature, the double-exponential trend filter 2 E1 - E2 of its normal
  scores (E1 the EWMA of z with constant lambda, E2 the EWMA of E1): its kernel over a row's age a,
  lambda (1 - lambda)^a (2 - lambda (a + 1)), weighs recent rows up and old ones down (negative past
  2 / lambda), so it follows a mean that keeps growing with a lag of ~0 rows where the plain EWMA lags
  1 / lambda. The chart is the largest squared standardised filter over features (its exact null
  variance from the start, as the `sum` chart's): a 0 -> 1 sigma ramp over 1,000 rows reaches it before
  a CUSUM tuned to a step does.
- `catrev@w`: per categorical feature, Page's CUSUM of the multinomial log-likelihood ratio of a FIXED
  alternative, the reference frequencies turned over: q = w p_rev + (1 - w) p with p_rev_k = p_{K-1-k}
  (the schema's order of the categories reversed: an ordinal feature whose common end becomes rare).
  A fixed alternative is the optimal CUSUM for that shift and costs nothing to learn, unlike the adaptive
  `cat` chart (which must estimate 4 frequencies first: on a 0.055-nat shift it needs ~3x the rows of a
  CUSUM that knows them); for any other shift its increment has a negative mean and it stays quiet,
  leaving that to `cat`.
"""

from __future__ import annotations

import numpy as np

_VAR_CACHE: dict[float, np.ndarray] = {}


def trend_variance(lam: float, t: np.ndarray) -> np.ndarray:
    """Null variance of 2 E1 - E2 after t rows from zero (z iid N(0, 1))."""
    if lam not in _VAR_CACHE:
        n = int(np.ceil(40 / lam))
        a = np.arange(n, dtype=np.float64)
        k = lam * (1 - lam) ** a * (2 - lam * (a + 1))
        _VAR_CACHE[lam] = np.cumsum(k * k)
    v = _VAR_CACHE[lam]
    return v[np.minimum(t.astype(np.int64), len(v)) - 1]


def reversed_alternative_llr(cat_p: np.ndarray, cat_sizes: list[int], w: float) -> np.ndarray:
    """log q / p per one-hot column for q = w * (p reversed within each feature) + (1 - w) * p."""
    out = np.empty_like(cat_p)
    lo = 0
    for k in cat_sizes:
        p = cat_p[lo:lo + k]
        q = w * p[::-1] + (1 - w) * p
        out[lo:lo + k] = np.log(q / p)
        lo += k
    return out
