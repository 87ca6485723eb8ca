"""Sliding windows over the live traffic: ring buffers that overwrite in place, so that `Monitor.record`
costs one array copy per batch and no per-row Python work."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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

    def clear(self) -> None:
        self.ring.clear()


class LiveWindow:
    """The latest `size` rows of live traffic as the window tests see them: raw numeric values, category
    indices, predicted classes (-1: none) and class probabilities (a NaN row: none sent)."""

    def __init__(self, size: int, n_num: int, n_cat: int, num_classes: int | None):
        self.num = RingBuffer(size, n_num, dtype=np.float64)
        self.cat = RingBuffer(size, n_cat, dtype=np.int64)
        self.pred = RingBuffer(size, 1, dtype=np.int64)
        self.proba = RingBuffer(size, max(num_classes or 0, 1), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.num)

    def add(self, x_num: np.ndarray, x_cat: np.ndarray, pred: np.ndarray, proba: np.ndarray | None) -> None:
        self.num.add(x_num)
        self.cat.add(x_cat)
        self.pred.add(pred.reshape(-1, 1))
        self.proba.add(proba.astype(np.float32) if proba is not None
                       else np.full((len(x_num), self.proba.buf.shape[1]), np.nan, dtype=np.float32))

    def clear(self) -> None:
        for ring in (self.num, self.cat, self.pred, self.proba):
            ring.clear()

    def arrays(self) -> dict[str, np.ndarray]:
        """The rows held, oldest first, by snapshot name."""
        return {"win_num": self.num.values(), "win_cat": self.cat.values(), "win_pred": self.pred.values(),
                "win_proba": self.proba.values()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        self.num.add(arrays["win_num"])
        self.cat.add(arrays["win_cat"])
        self.pred.add(arrays["win_pred"])
        self.proba.add(arrays["win_proba"])
