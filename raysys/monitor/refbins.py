"""The reference side of the window tests: each feature's bins and CDF grid laid end to end, so that a
window is binned, counted and compared for every feature at once (one `np.searchsorted` over all of them).
"""

from __future__ import annotations

import numpy as np
from scipy.special import kolmogorov, ndtr

from raysys.monitor.profile import Z_CLIP, ReferenceProfile
from raysys.monitor.stats import DEFAULT_EPS, ks_pvalue


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


class SegmentedRefs:
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
