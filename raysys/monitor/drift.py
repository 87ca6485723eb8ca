"""Streaming drift statistics: PSI, vectorised binning, a sliding window of bin indices, latency percentiles.

Everything here is plain numpy so that `Monitor.record` stays cheap: a batch is binned with one
`np.searchsorted` per numeric feature and copied into a ring buffer; counts are only taken (one
`np.bincount` per feature over the window) when a report is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import kolmogorov, ndtr

from raysys.monitor.profile import Z_CLIP, ReferenceProfile

DEFAULT_EPS = 1e-4


def psi(ref_props: Sequence[float] | np.ndarray, cur_counts: Sequence[float] | np.ndarray,
        eps: float = DEFAULT_EPS) -> float:
    """Population Stability Index of the current bin counts against the reference bin proportions.

        PSI = sum_i (p_cur_i - p_ref_i) * ln(p_cur_i / p_ref_i)

    This is the symmetrised KL divergence KL(cur||ref) + KL(ref||cur) over the bins; it is >= 0 and 0
    only for identical distributions. Rules of thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2
    significant shift.

    Smoothing: an empty bin on either side would make the log infinite, so both distributions get
    `eps` added to every bin and are renormalised to sum to 1 (p -> (p + eps) / (1 + k * eps)) before
    the sum. With eps = 1e-4 a bin seen in the window but empty in the reference contributes about
    p * ln(p / 1e-4), large but finite. An empty window has PSI 0 (nothing to compare yet).
    """
    ref = np.asarray(ref_props, dtype=np.float64)
    cur = np.asarray(cur_counts, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 1:
        raise ValueError(f"psi: ref_props and cur_counts need the same 1-D shape, got {ref.shape} and {cur.shape}")
    total = cur.sum()
    if total <= 0:
        return 0.0
    k = len(ref)
    p_cur = (cur / total + eps) / (1.0 + k * eps)
    p_ref = (ref / ref.sum() + eps) / (1.0 + k * eps)
    return float(np.sum((p_cur - p_ref) * np.log(p_cur / p_ref)))


def bin_numeric(profile: ReferenceProfile, x_num: np.ndarray) -> np.ndarray:
    """Raw numeric values float [n, n_num] -> bin indices int32 [n, n_num] on the profile's edges.

    Bin i holds values in [edges[i-1], edges[i]); bin 0 is everything below the first edge and the last
    bin everything at or above the last edge, so out-of-range values land in the outer bins.
    """
    x = np.asarray(x_num)
    if x.ndim != 2 or x.shape[1] != len(profile.numeric):
        raise ValueError(f"bin_numeric: expected x_num of shape [n, {len(profile.numeric)}], got {x.shape}")
    out = np.empty(x.shape, dtype=np.int32)
    for j, ref in enumerate(profile.numeric):
        out[:, j] = np.searchsorted(ref.edges, x[:, j], side="right")
    return out


class RingBuffer:
    """The last `capacity` rows of a [*, width] array, overwritten in place (no per-row Python work)."""

    def __init__(self, capacity: int, width: int, dtype=np.int32):
        if capacity < 1:
            raise ValueError(f"ring buffer: capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.buf = np.zeros((self.capacity, width), dtype=dtype)
        self.pos = 0  # next row to write
        self.size = 0  # rows held (<= capacity)

    def __len__(self) -> int:
        return self.size

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=self.buf.dtype)
        if rows.ndim == 1:
            rows = rows.reshape(-1, self.buf.shape[1])
        n = len(rows)
        if n == 0:
            return
        if n >= self.capacity:
            rows = rows[-self.capacity:]
            self.buf[:] = rows
            self.pos = 0
            self.size = self.capacity
            return
        first = min(n, self.capacity - self.pos)
        self.buf[self.pos:self.pos + first] = rows[:first]
        if first < n:
            self.buf[:n - first] = rows[first:]
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def values(self) -> np.ndarray:
        """The rows held, oldest first (a copy)."""
        if self.size < self.capacity:
            return self.buf[:self.size].copy()
        return np.concatenate([self.buf[self.pos:], self.buf[:self.pos]])

    def clear(self) -> None:
        self.pos = 0
        self.size = 0


class SlidingWindow:
    """Bin indices of the last `window_size` rows, one column per feature; `counts(j)` per feature.

    `bins_per_column[j]` is the number of bins of column j; an index equal to it (or above) marks a
    missing value and is left out of the counts.
    """

    def __init__(self, bins_per_column: Sequence[int], window_size: int):
        self.bins_per_column = [int(b) for b in bins_per_column]
        self.ring = RingBuffer(window_size, len(self.bins_per_column), dtype=np.int32)

    @property
    def window_size(self) -> int:
        return self.ring.capacity

    def __len__(self) -> int:
        return len(self.ring)

    def add(self, bins: np.ndarray) -> None:
        self.ring.add(bins)

    def counts(self, j: int) -> np.ndarray:
        k = self.bins_per_column[j]
        col = self.ring.buf[:self.ring.size, j]  # row order does not matter for counts
        return np.bincount(col, minlength=k + 1)[:k]

    def all_counts(self) -> list[np.ndarray]:
        return [self.counts(j) for j in range(len(self.bins_per_column))]

    def clear(self) -> None:
        self.ring.clear()


def latency_percentiles(values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p95/p99 of latencies (ms); None for each when there are none yet."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


# ----------------------------------------------------------------------------------------------------
# window tests: PSI, Jensen-Shannon, KS against the binned reference CDF, chi-squared, BH / Bonferroni
# ----------------------------------------------------------------------------------------------------


def jensen_shannon(ref_props: np.ndarray, cur_counts: np.ndarray, eps: float = DEFAULT_EPS) -> float:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) of the current bin counts vs the reference."""
    ref = np.asarray(ref_props, dtype=np.float64)
    cur = np.asarray(cur_counts, dtype=np.float64)
    if cur.sum() <= 0:
        return 0.0
    p, q = cur / cur.sum(), ref / ref.sum()
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log(q / m), 0.0).sum()
    return float((kl_p + kl_q) / 2)


def ks_pvalue(d: np.ndarray | float, n: int, m: int) -> np.ndarray:
    """Two-sided p-value of a two-sample KS statistic `d` between samples of sizes `n` and `m`.

    scipy's `ks_2samp` (method='auto') computes the exact null distribution while both samples have at
    most 10,000 rows and otherwise takes Smirnov's formula, the one-sample statistic's distribution
    `kstwo.sf(d, round(nm / (n + m)))`; both cost milliseconds per feature (so does `scipy.special.smirnov`
    at n ~ 1000). Here: the same effective n, and `kstwo`'s own branches: for n d^2 >= 2.2 (p <~ 0.025,
    where every drift decision lies) twice the one-sided tail, taken from its expansion in 1/sqrt(n)
    (exp(-2t^2) (1 - 2t / (3 sqrt n) + (2t^2 / 3 - 4t^4 / 9) / n), t = sqrt(n) d, written as one exponent
    so it stays positive and decreasing: within 0.1% of `smirnov` at n = 909, 3% at n = 100), and below
    that Stephens' corrected Kolmogorov limit. For a 1k window against a 10k reference this is within 1% of
    `kstwo.sf` and within 2% of scipy's exact p-value (the effect of moving d by one step of 1/10,000)."""
    d = np.asarray(d, dtype=np.float64)
    if n <= 0 or m <= 0:
        return np.ones_like(d)
    en = max(round(n * m / (n + m)), 1)
    rt = math.sqrt(en)
    t = rt * d
    tail = 2.0 * np.exp(-2.0 * t * t - 2.0 * t / (3.0 * rt) + 4.0 * t * t * (1.0 - t * t) / (9.0 * en))
    p = np.where(en * d * d >= 2.2, tail, kolmogorov((rt + 0.12 + 0.11 / rt) * d))
    return np.clip(p, 0.0, 1.0)


def adjust_pvalues(p: np.ndarray, method: str = "bh") -> np.ndarray:
    """Multiple-testing adjusted p-values: Benjamini-Hochberg (FDR) or Bonferroni (FWER)."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    if method == "bonferroni":
        return np.minimum(p * m, 1.0)
    if method != "bh":
        raise ValueError(f"monitor.multiple_testing: unknown method {method!r}; use 'bh' or 'bonferroni'")
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


class _SegmentedRefs:
    """Per-feature reference arrays of different lengths laid end to end, for one-call numpy reductions.

    The window's counts below every grid point and coarse edge of every feature come from ONE
    `np.searchsorted`: each feature's values are mapped by the same increasing affine map as its reference
    points (its grid onto [0, 1]), clipped to [-_PAD, 1 + _PAD] (beyond every reference point, so no count
    changes) and moved by 2 * _PAD + 2 per feature; the per-feature sorted columns laid end to end are then
    one sorted array. Equal values map to equal values (same float operations), so ties count exactly as
    in a per-feature search.
    """

    _PAD = 4.0

    def __init__(self, refs: list):
        self.refs = refs
        k = len(refs)
        self.k = k
        self.edges = [r.edges for r in refs]
        # the KS grid: the profile's dense KS grid where it has one, else its fine grid
        self.dense = [getattr(r, "ks_x", None) is not None and len(r.ks_x) >= 2 for r in refs]
        self.grid_x = [r.ks_x if d else r.grid_x for r, d in zip(refs, self.dense)]
        nb = np.array([len(e) + 1 for e in self.edges], dtype=np.int64)
        ng = np.array([len(g) for g in self.grid_x], dtype=np.int64)
        self.c_off = np.concatenate([[0], np.cumsum(nb)[:-1]]).astype(np.int64)
        self.c_total = int(nb.sum())
        self.c_props = np.concatenate([r.ref_props for r in refs]) if refs else np.zeros(0)
        self.nb = nb
        # fine grid: one extra slot per feature for values above its last grid point
        self.g_off = np.concatenate([[0], np.cumsum(ng + 1)[:-1]]).astype(np.int64)
        self.g_total = int((ng + 1).sum())
        self.ng = ng
        self.g_cdf = np.concatenate([np.append(r.ks_cdf if d else r.grid_cdf, 1.0) for r, d in zip(refs, self.dense)]) \
            if refs else np.zeros(0)
        self.g_feature = np.repeat(np.arange(k), ng + 1)
        # the affine map per feature and every reference point mapped by it
        # (a dense grid's feature: its fine grid's points too, tested beside the dense ones)
        pts = [np.concatenate([g[[0, -1]], e[[0, -1]] if len(e) else g[:0], r.grid_x[[0, -1]] if d else g[:0]])
               for g, e, r, d in zip(self.grid_x, self.edges, refs, self.dense)]
        lo = np.array([p.min() for p in pts]) if k else np.zeros(0)
        hi = np.array([p.max() for p in pts]) if k else np.zeros(0)
        self.a = lo
        self.s = np.where(hi > lo, hi - lo, 1.0)
        self.shift = np.arange(k) * (2 * self._PAD + 2.0)
        self.g_keys = np.concatenate([self._map1(j, np.append(g, np.inf)) for j, g in enumerate(self.grid_x)]) \
            if k else np.zeros(0)
        self.e_keys = np.concatenate([self._map1(j, e) for j, e in enumerate(self.edges)]) if k else np.zeros(0)
        self.e_feature = np.repeat(np.arange(k), nb - 1)
        # coarse bin counts = differences of [0, below(edges)..., n] per feature: where each piece goes
        ext_len = int((nb + 1).sum())
        starts = np.concatenate([[0], np.cumsum(nb + 1)[:-1]]).astype(np.int64)
        self._ext_len = ext_len
        self._ext_zero = starts
        self._ext_n = starts + nb
        self._ext_edges = np.concatenate([np.arange(s0 + 1, s0 + b) for s0, b in zip(starts, nb)]) if k else \
            np.zeros(0, dtype=np.int64)
        keep = np.ones(max(ext_len - 1, 0), dtype=bool)
        keep[self._ext_n[:-1]] = False  # the step from one feature's n to the next one's 0
        self._ext_keep = keep
        # features with a dense KS grid: their 49-point fine grid too (the reference CDF is exact there)
        fine = [j for j, d in enumerate(self.dense) if d]
        self.f_keys = np.concatenate([self._map1(j, refs[j].grid_x) for j in fine]) if fine else np.zeros(0)
        self.f_cdf = np.concatenate([refs[j].grid_cdf for j in fine]) if fine else np.zeros(0)
        self.f_feature = np.concatenate([np.full(len(refs[j].grid_x), j) for j in fine]).astype(np.int64) \
            if fine else np.zeros(0, dtype=np.int64)
        self._f_which = np.asarray(fine, dtype=np.int64)  # features with a dense grid, their fine-grid runs
        self._f_off = np.concatenate([[0], np.cumsum([len(refs[j].grid_x) for j in fine])[:-1]]).astype(np.int64) \
            if fine else np.zeros(0, dtype=np.int64)
        self._dense_points = np.concatenate([np.append(np.full(m, d), False) for m, d in zip(ng, self.dense)]) \
            if k else np.zeros(0, dtype=bool)  # the dense grid's points (not the slot above the last)
        self._cells()
        self._tol: dict[int, np.ndarray] = {}

    def _cells(self) -> None:
        """The reference CDF between and beyond the grid points, for KS at the window's own values.

        Slot c of the fine grid (one per grid point plus one above the last, laid out like `g_keys`) holds
        the keys in (g_keys[c-1], g_keys[c]]. Between two grid points the reference CDF is taken linear in
        the value, that is linear in the normal score (the grid is evenly spaced in z and the profile's
        normal scores are piecewise linear in the value): F = cdf[j-1] + rate * (key - g_keys[j-1]), equal
        to the stored CDF at both ends. Beyond the grid z is extrapolated with the outer step's slope, as
        `NumericRef.normal_scores` does, and clipped at +-Z_CLIP; below the first point
        F = cdf[0] Phi(z) / Phi(z[0]), above the last 1 - F = (1 - cdf[-1]) (1 - Phi(z)) / (1 - Phi(z[-1])).

        `excess` is cdf - Phi(z) at the slot's right-hand grid point (the last one for the slot above it):
        within 1 / n_ref for a continuous feature (np.quantile interpolates between order statistics); more
        means an atom there (tied quantiles, a discrete level), where the CDF just left of the point is
        unknown, so that slot is not interpolated (`_usable`). A format-1 profile's grid (the coarse edges,
        z at mid-bin) fails this everywhere and keeps the grid-point statistic."""
        parts: dict[str, list[np.ndarray]] = {f: [] for f in ("key", "cdf", "rate", "z", "zs", "tp", "tq", "tail",
                                                               "ok", "excess")}
        splits = np.split(self.g_keys, np.cumsum(self.ng + 1)[:-1]) if self.k else []
        for j, (ref, gk) in enumerate(zip(self.refs, splits)):
            if self.dense[j]:
                for name, v in self._dense_cells(j, ref, gk[:-1]).items():
                    parts[name].append(v)
                continue
            m = len(ref.grid_x)
            gk = gk[:m]
            gz = np.asarray(ref.grid_z, dtype=np.float64)
            cdf = np.asarray(ref.grid_cdf, dtype=np.float64)
            phi = ndtr(gz)
            rate, z, zs, tp, tq = (np.zeros(m + 1) for _ in range(5))
            ok = np.zeros(m + 1, dtype=bool)
            tail = np.zeros(m + 1, dtype=bool)
            tail[[0, m]] = True
            with np.errstate(divide="ignore", invalid="ignore"):
                if m >= 2:
                    width = np.diff(gk)
                    rate[1:m] = np.diff(cdf) / width
                    ok[1:m] = (width > 0) & np.isfinite(rate[1:m])
                    step = np.diff(gz) / width
                    z[0], zs[0], tq[0] = gz[0], step[0], cdf[0] / phi[0]
                    z[m], zs[m], tq[m] = gz[-1], step[-1], (1.0 - cdf[-1]) / (1.0 - phi[-1])
                    tp[m] = 1.0 - tq[m]
                    ok[[0, m]] = np.isfinite(zs[[0, m]]) & (zs[[0, m]] > 0) & np.isfinite(tq[[0, m]])
            parts["key"].append(np.concatenate([gk[:1], gk]))  # lower tail: anchored at the first point
            parts["cdf"].append(np.concatenate([cdf[:1], cdf]))
            for name, v in (("rate", rate), ("z", z), ("zs", zs), ("tp", tp), ("tq", tq), ("tail", tail), ("ok", ok)):
                parts[name].append(v)
            # the slot above the last point: its tail is extrapolated from the last point's normal score
            parts["excess"].append(np.append(cdf - phi, cdf[-1:] - phi[-1:]))
        for name, v in parts.items():
            arr = np.concatenate(v) if v else np.zeros(0, dtype=bool if name in ("tail", "ok") else np.float64)
            setattr(self, f"cell_{name}", np.nan_to_num(arr) if arr.dtype != bool and name != "excess" else arr)
        self._center: tuple[int, int, np.ndarray] | None = None

    def _dense_cells(self, j: int, ref, gk: np.ndarray) -> dict[str, np.ndarray]:
        """`_cells` of a feature with a dense KS grid: points x_i with the reference CDF F(x_i) (`ks_cdf`)
        and F(x_i-) (`ks_lo`), both exact. Between two points F rises linearly in the value from
        F(x_{i-1}) to F(x_i-) (so an atom at a point is no error there); beyond the first and last point
        the fine grid's normal-score extrapolation (`NumericRef.normal_scores`, slope of the fine grid's
        segment holding the point) continues F from F(x_0-) and F(x_last). `excess` is the reference's
        atom at the slot's right-hand point (F(x_i) - F(x_i-)): a window value exactly there is then only
        tested at the point itself."""
        m = len(gk)
        cdf = np.asarray(ref.ks_cdf, dtype=np.float64)
        lo = np.asarray(ref.ks_lo, dtype=np.float64)
        rate, z, zs, tp, tq = (np.zeros(m + 1) for _ in range(5))
        ok = np.zeros(m + 1, dtype=bool)
        tail = np.zeros(m + 1, dtype=bool)
        tail[[0, m]] = True
        with np.errstate(divide="ignore", invalid="ignore"):
            width = np.diff(gk)
            rate[1:m] = (lo[1:] - cdf[:-1]) / width
            ok[1:m] = (width > 0) & np.isfinite(rate[1:m])
            fx = np.asarray(ref.grid_x, dtype=np.float64)
            fz = np.asarray(ref.grid_z, dtype=np.float64)
            if len(fx) >= 2:
                fk = self._map1(j, fx)
                for c, x in ((0, ref.ks_x[0]), (m, ref.ks_x[-1])):
                    s = min(max(int(np.searchsorted(fx, x, side="right")) - 1, 0), len(fx) - 2)
                    zs[c] = (fz[s + 1] - fz[s]) / (fk[s + 1] - fk[s])
                    z[c] = float(np.clip(ref.normal_scores(np.array([x]))[0], -Z_CLIP, Z_CLIP))
                tq[0] = lo[0] / ndtr(z[0])
                tq[m] = (1.0 - cdf[-1]) / (1.0 - ndtr(z[m]))
                tp[m] = 1.0 - tq[m]
                ok[[0, m]] = np.isfinite(zs[[0, m]]) & (zs[[0, m]] > 0) & np.isfinite(tq[[0, m]])
        return {"key": np.concatenate([gk[:1], gk]), "cdf": np.concatenate([lo[:1], cdf]), "rate": rate, "z": z,
                "zs": zs, "tp": tp, "tq": tq, "tail": tail, "ok": ok, "excess": np.append(cdf - lo, 0.0)}

    def _usable(self, n_ref: int) -> np.ndarray:
        """Slots whose reference CDF may be interpolated, for a profile built from `n_ref` rows."""
        got = self._tol.get(n_ref)
        if got is None:
            tol = 1.5 / max(n_ref, 1) + 1e-12
            got = self._tol[n_ref] = self.cell_ok & (np.abs(self.cell_excess) <= tol)
        return got

    def _map(self, x: np.ndarray) -> np.ndarray:
        """Values [features, n] -> keys: increasing within a feature, features in disjoint ranges."""
        u = (x - self.a[:, None]) / self.s[:, None]
        u[np.isnan(u)] = np.inf  # NaN sorts after everything, as np.searchsorted treats it
        np.clip(u, -self._PAD, 1.0 + self._PAD, out=u)
        return u + self.shift[:, None]

    def _map1(self, j: int, x: np.ndarray) -> np.ndarray:
        """`_map` of one feature's reference points (the same float operations, so ties stay ties)."""
        u = (np.asarray(x, dtype=np.float64) - self.a[j]) / self.s[j]
        return np.clip(u, -self._PAD, 1.0 + self._PAD) + self.shift[j]

    def stats(self, x: np.ndarray, n_ref: int, exact: bool = False) -> dict[str, np.ndarray]:
        """x [n, features] raw values -> per-feature psi, js, ks, ks_p.

        KS: sup |F_window - F_ref| over the fine grid's points, where F_ref is known exactly (a lower bound
        on the two-sample statistic); with `exact`, also over the dense KS grid's points (where the profile
        has one, F_ref exact there too) and over the window's own values, F_ref there interpolated
        (`_cells`), which is what scipy's two-sample statistic against the raw reference sees.
        """
        n, k = x.shape
        if k:
            keys = np.sort(self._map(np.ascontiguousarray(x.T)), axis=1).ravel()  # globally sorted
            # counts of window values <= each grid point (the extra slot: +inf, i.e. all n) and < each edge
            le_abs = np.searchsorted(keys, self.g_keys, side="right")
            le = le_abs - self.g_feature * n
            below = np.searchsorted(keys, self.e_keys, side="left") - self.e_feature * n
            ext = np.empty(self._ext_len)
            ext[self._ext_zero] = 0.0
            ext[self._ext_n] = n
            ext[self._ext_edges] = below
            cc = np.diff(ext)[self._ext_keep]
        else:
            le, cc = np.zeros(0), np.zeros(0)
        f_win = le / max(n, 1)
        dev = np.abs(f_win - self.g_cdf)
        if not exact and len(self.f_keys):  # the statistic at the fine grid's points only
            dev[self._dense_points] = 0.0
        ks = np.maximum.reduceat(dev, self.g_off) if k else np.zeros(0)
        if len(self.f_keys) and k:
            f_le = np.searchsorted(keys, self.f_keys, side="right") - self.f_feature * n
            fine = np.maximum.reduceat(np.abs(f_le / max(n, 1) - self.f_cdf), self._f_off)
            ks[self._f_which] = np.maximum(ks[self._f_which], fine)
        if exact and k and n:
            ks = np.maximum(ks, self._ks_at_window(keys, le_abs, n, k, n_ref))
        if exact:
            ks_p = ks_pvalue(ks, n, n_ref) if n else np.ones(k)
        else:
            n_eff = n * n_ref / (n + n_ref) if n else 0.0
            ks_p = kolmogorov(np.sqrt(n_eff) * ks) if n else np.ones(k)
        eps = DEFAULT_EPS
        p_cur = cc / max(n, 1)
        nbr = np.repeat(self.nb, self.nb)
        pc = (p_cur + eps) / (1 + nbr * eps)
        pr = (self.c_props + eps) / (1 + nbr * eps)
        psi_v = np.add.reduceat((pc - pr) * np.log(pc / pr), self.c_off) if k else np.zeros(0)
        m = (p_cur + self.c_props) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p_cur > 0, p_cur * np.log(p_cur / m), 0.0) + \
                np.where(self.c_props > 0, self.c_props * np.log(self.c_props / m), 0.0)
        js = np.add.reduceat(terms, self.c_off) / 2 if k else np.zeros(0)
        if not n:
            psi_v, js = np.zeros(k), np.zeros(k)
        return {"psi": psi_v, "js": js, "ks": ks, "ks_p": np.clip(ks_p, 0.0, 1.0),
                "counts": [cc[o:o + b] for o, b in zip(self.c_off, self.nb)]}

    def _ks_at_window(self, keys: np.ndarray, le_abs: np.ndarray, n: int, k: int, n_ref: int) -> np.ndarray:
        """Per feature, the max over the window's sorted values x_i (i = 0..n-1 within the feature) of
        (i + 1) / n - F(x_i) and F(x_i) - i / n: the window ECDF at and just below x_i against the
        interpolated reference CDF F (`_cells`), i.e. |F(x_i) - (i + 1/2) / n| + 1 / (2n). Over a run of tied
        values the largest of these is the true value at (and just below) the run, so ties need no
        grouping; but a value that repeats in the window is an atom of the feature, where the reference's own
        jump is unknown, so such runs are left to the grid points (as are slots next to a reference atom)."""
        # slot of each window value: the first grid key >= it (keys and g_keys share one sorted axis)
        slot = np.repeat(np.arange(self.g_total), np.diff(le_abs, prepend=0))
        f = self.cell_cdf.take(slot) + self.cell_rate.take(slot) * (keys - self.cell_key.take(slot))
        tails = np.flatnonzero(self.cell_tail.take(slot))
        if len(tails):
            st = slot[tails]
            z = self.cell_z.take(st) + self.cell_zs.take(st) * (keys[tails] - self.cell_key.take(st))
            f[tails] = self.cell_tp.take(st) + self.cell_tq.take(st) * ndtr(np.clip(z, -Z_CLIP, Z_CLIP))
        use = self._usable(n_ref).take(slot)
        tied = keys[1:] == keys[:-1]
        use[1:] &= ~tied
        use[:-1] &= ~tied
        center = self._center
        if center is None or center[:2] != (n, k):
            center = self._center = (n, k, np.tile((np.arange(n) + 0.5) / n, k))
        dev = np.abs(f - center[2])
        dev += 0.5 / n
        dev *= use
        return dev.reshape(k, n).max(1)


class WindowTester:
    """Vectorised window tests of one profile: per numeric feature PSI and Jensen-Shannon on the coarse
    reference-quantile bins and KS against the binned reference CDF (the fine grid); per categorical feature
    PSI, JS and Pearson's chi-squared; per class KS on the predicted probabilities and chi-squared on the
    predicted classes (black-box shift detection). p-values are adjusted across features (BH or
    Bonferroni) and a feature is drifted when its adjusted p-value is below `alpha`; the dataset drifts
    when any feature does (for BH this is Simes' global test)."""

    def __init__(self, profile):
        from raysys.monitor.profile import CAT_PROP_FLOOR

        self.profile = profile
        self.num = _SegmentedRefs(profile.numeric)
        self.pred = _SegmentedRefs(profile.prediction.per_class) if profile.prediction is not None else None
        self.cat_k = np.array([c.num_bins for c in profile.categorical], dtype=np.int64)
        self.cat_off = np.concatenate([[0], np.cumsum(self.cat_k)[:-1]]).astype(np.int64)
        props = [np.maximum(c.ref_props, CAT_PROP_FLOOR) for c in profile.categorical]
        self.cat_props = np.concatenate([p / p.sum() for p in props]) if props else np.zeros(0)
        self.cat_raw = np.concatenate([c.ref_props for c in profile.categorical]) if props else np.zeros(0)

    def _categorical(self, x_cat: np.ndarray) -> dict[str, np.ndarray]:
        from scipy.special import chdtrc

        n, k = x_cat.shape
        if not k:
            z = np.zeros(0)
            return {"psi": z, "js": z, "chi2": z, "chi2_p": z, "counts": []}
        counts = np.bincount((x_cat + self.cat_off).ravel(), minlength=int(self.cat_k.sum())).astype(np.float64)
        exp = self.cat_props * n
        chi = np.add.reduceat((counts - exp) ** 2 / np.maximum(exp, 1e-12), self.cat_off)
        p = chdtrc(np.maximum(self.cat_k - 1, 1), chi) if n else np.ones(k)
        # PSI and Jensen-Shannon of every feature at once (the same formulas as `psi`, `jensen_shannon`)
        kr = np.repeat(self.cat_k, self.cat_k)
        ref = self.cat_raw / np.repeat(np.add.reduceat(self.cat_raw, self.cat_off), self.cat_k)
        cur = counts / max(n, 1)
        eps = DEFAULT_EPS
        pc, pr = (cur + eps) / (1 + kr * eps), (ref + eps) / (1 + kr * eps)
        psi_v = np.add.reduceat((pc - pr) * np.log(pc / pr), self.cat_off) if n else np.zeros(k)
        m = (cur + ref) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(cur > 0, cur * np.log(cur / m), 0.0) + np.where(ref > 0, ref * np.log(ref / m), 0.0)
        js = np.add.reduceat(terms, self.cat_off) / 2 if n else np.zeros(k)
        return {"psi": psi_v, "js": js, "chi2": chi, "chi2_p": p,
                "counts": [counts[o:o + b] for o, b in zip(self.cat_off, self.cat_k)]}

    def test(self, x_num: np.ndarray, x_cat: np.ndarray, *, proba: np.ndarray | None = None,
             pred: np.ndarray | None = None, alpha: float = 0.01, method: str = "bh",
             armed: bool = True) -> dict[str, Any]:
        prof = self.profile
        n = len(x_num)
        num = self.num.stats(np.asarray(x_num, dtype=np.float64).reshape(n, len(prof.numeric)), prof.num_rows,
                             exact=True)
        cat = self._categorical(np.asarray(x_cat, dtype=np.int64).reshape(n, len(prof.categorical)))
        pvals = np.concatenate([num["ks_p"], cat["chi2_p"]])
        adj = adjust_pvalues(pvals, method)
        drifted = (adj < alpha) & armed & (n > 0)
        features: dict[str, dict[str, Any]] = {}
        n_num = len(prof.numeric)
        for j, ref in enumerate(prof.numeric):
            features[ref.name] = {"kind": "numeric", "test": "ks", "statistic": float(num["ks"][j]),
                                  "p_value": float(num["ks_p"][j]), "p_adjusted": float(adj[j]),
                                  "threshold": alpha, "psi": float(num["psi"][j]), "js": float(num["js"][j]),
                                  "drifted": bool(drifted[j])}
        for j, ref in enumerate(prof.categorical):
            i = n_num + j
            features[ref.name] = {"kind": "categorical", "test": "chi2", "statistic": float(cat["chi2"][j]),
                                  "p_value": float(cat["chi2_p"][j]), "p_adjusted": float(adj[i]),
                                  "threshold": alpha, "psi": float(cat["psi"][j]), "js": float(cat["js"][j]),
                                  "drifted": bool(drifted[i])}
        m = len(pvals)
        dataset_p = float(np.min(adj)) if m else 1.0
        return {"rows": n, "features": features, "dataset": {
            "p_value": dataset_p, "drifted": bool(drifted.any()), "num_drifted": int(drifted.sum()),
            "num_features": m, "share_drifted": float(drifted.sum() / m) if m else 0.0,
            "method": method, "alpha": alpha}, "prediction": self._prediction(proba, pred, alpha, method, armed)}

    def _prediction(self, proba, pred, alpha, method, armed) -> dict[str, Any]:
        from scipy.special import chdtrc

        prof = self.profile
        out: dict[str, Any] = {"classes": list(prof.classes), "drifted": False, "per_class": {},
                               "current": None, "reference": None, "rows": 0, "psi": None}
        if pred is not None and len(pred) and prof.classes:
            k = len(prof.classes)
            pc = np.bincount(np.asarray(pred, dtype=np.int64), minlength=k)[:k].astype(np.float64)
            total = pc.sum()
            out["rows"] = int(total)
            out["current"] = (pc / total).tolist() if total else None
            if prof.class_priors is not None and total:
                out["reference"] = prof.class_priors.tolist()
                out["psi"] = psi(prof.class_priors, pc)
                exp = np.maximum(prof.class_priors, 1e-4) * total
                chi = float(((pc - exp) ** 2 / exp).sum())
                out["chi2"] = chi
                out["chi2_p"] = float(chdtrc(k - 1, chi))
        pvals = [out["chi2_p"]] if "chi2_p" in out else []
        if proba is not None and len(proba) and self.pred is not None:
            st = self.pred.stats(np.asarray(proba, dtype=np.float64), prof.prediction.num_rows or prof.num_rows,
                                 exact=True)
            for i, c in enumerate(prof.classes):
                out["per_class"][c] = {"test": "ks", "statistic": float(st["ks"][i]),
                                       "p_value": float(st["ks_p"][i]), "psi": float(st["psi"][i])}
            pvals += [float(p) for p in st["ks_p"]]
            cal = prof.prediction.calibrated(np.asarray(proba, dtype=np.float64))
            out["mean_confidence"] = float(cal.max(1).mean())
        if pvals:
            adj = adjust_pvalues(np.asarray(pvals), method)
            out["p_adjusted"] = float(adj.min())
            out["threshold"] = alpha
            out["drifted"] = bool(armed and adj.min() < alpha)
        return out
