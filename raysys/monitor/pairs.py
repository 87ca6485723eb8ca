"""The online detector's `joint` chart: shifts of the joint distribution whose marginals stay the same.

Per-feature charts see each numeric feature's normal score z_j, N(0, 1) under the reference, and nothing
else: a pair of features whose correlation flips from rho to -rho keeps both marginals, so every
per-feature statistic (and every per-feature window test) stays at its null. For the pairs of numeric
features that the reference shows correlated (|rho| >= `MIN_ABS_RHO` on the held-out calibration rows, at
most `MAX_PAIRS`, the strongest first, each feature in one pair), the chart runs Page's CUSUM of the
bivariate-normal log-likelihood ratio of the pair's normal scores, from rho to each alternative correlation
r (by default -rho: the correlation flips; 0: it vanishes):

    log f_r(a, b) - log f_rho(a, b) = -1/2 log((1 - r^2) / (1 - rho^2))
                                      - (a^2 + b^2 - 2 r a b) / (2 (1 - r^2)) + (a^2 + b^2 - 2 rho a b) / (2 (1 - rho^2))

(normal scores are Gaussian marginally by construction; the pair's joint is taken as a Gaussian copula,
which is what a likelihood ratio on the correlation alone assumes). For the flip the increment reduces to
-2 rho a b / (1 - rho^2), with KL 2 rho^2 / (1 - rho^2) nats a row: 1.1 at rho = 0.6. The pairs and their
rhos are computed once from the calibration rows and stored in the detector spec (`pairs`).
"""

from __future__ import annotations

import numpy as np

MIN_ABS_RHO = 0.3  # a pair is watched from this reference correlation on (SE of rho on 10k rows: ~0.01)
MAX_PAIRS = 8
ALTERNATIVES = (-1.0, 0.0)  # alternative correlations as multiples of rho: rho -> -rho (flip), rho -> 0


def correlated_pairs(Z: np.ndarray, min_abs: float = MIN_ABS_RHO, max_pairs: int = MAX_PAIRS) -> list[list[float]]:
    """[[i, j, rho], ...]: the most correlated disjoint pairs of columns of Z (rows x numeric normal scores)."""
    n, m = Z.shape
    if m < 2 or n < 50:
        return []
    with np.errstate(invalid="ignore", divide="ignore"):
        C = np.corrcoef(Z, rowvar=False)
    C = np.nan_to_num(C, nan=0.0)
    iu, ju = np.triu_indices(m, 1)
    r = C[iu, ju]
    out: list[list[float]] = []
    used: set[int] = set()
    for k in np.argsort(-np.abs(r)):
        if abs(r[k]) < min_abs or len(out) >= max_pairs:
            break
        i, j = int(iu[k]), int(ju[k])
        if i in used or j in used:
            continue
        used.update((i, j))
        out.append([i, j, float(np.clip(r[k], -0.99, 0.99))])
    return out


def pair_increments(Z: np.ndarray, pairs: list[list[float]], alternatives=ALTERNATIVES) -> np.ndarray:
    """Per row, the log-likelihood ratios [n, len(pairs) * len(alternatives)] (pair-major) of each pair's
    correlation moving from its reference rho to each alternative (r = factor * rho)."""
    cols = []
    for i, j, rho in pairs:
        a, b = Z[:, int(i)], Z[:, int(j)]
        ss, ab = a * a + b * b, a * b
        q0 = (ss - 2 * rho * ab) / (2 * (1 - rho * rho))
        for r in (float(f) * rho for f in alternatives):
            cols.append(-0.5 * np.log((1 - r * r) / (1 - rho * rho)) - (ss - 2 * r * ab) / (2 * (1 - r * r)) + q0)
    return np.stack(cols, 1) if cols else np.zeros((len(Z), 0))
