"""Streaming drift statistics: PSI, vectorised binning, a sliding window of bin indices, latency percentiles.

Everything here is plain numpy so that `Monitor.record` stays cheap: a batch is binned with one
`np.searchsorted` per numeric feature and copied into a ring buffer; counts are only taken (one
`np.bincount` per feature over the window) when a report is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raysys.monitor.profile import ReferenceProfile

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
