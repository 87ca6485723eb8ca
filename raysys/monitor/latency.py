"""Latency histograms with log-spaced buckets: percentiles accurate to one bucket at any scale.

Bucket i holds latencies in [LO * G^(i-1), LO * G^i); a percentile is reported as the geometric middle of
its bucket, so it is within sqrt(G) - 1 (4.9% for G = 1.1) of the true value, well inside one bucket
(<= 10% relative), for 10 us to 100 s with 170 counters per model version.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LO_MS = 0.01
GROWTH = 1.1
NUM_BUCKETS = int(math.ceil(math.log(1e5 / LO_MS) / math.log(GROWTH))) + 2  # [0, LO), ..., [1e5 ms, inf)


class LogHistogram:
    def __init__(self, counts: list[int] | None = None):
        self.counts = np.zeros(NUM_BUCKETS, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
        self.total_ms = 0.0

    @staticmethod
    def bucket(values_ms: np.ndarray) -> np.ndarray:
        v = np.maximum(np.asarray(values_ms, dtype=np.float64), 1e-12)
        idx = np.floor(np.log(v / LO_MS) / math.log(GROWTH)).astype(np.int64) + 1
        return np.clip(idx, 0, NUM_BUCKETS - 1)

    def add(self, values_ms) -> None:
        v = np.asarray(values_ms, dtype=np.float64).ravel()
        if v.size:
            self.counts += np.bincount(self.bucket(v), minlength=NUM_BUCKETS)
            self.total_ms += float(v.sum())

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float | None:
        n = self.count
        if not n:
            return None
        i = int(np.searchsorted(np.cumsum(self.counts), q * n, side="left"))
        if i == 0:
            return LO_MS / 2
        lo = LO_MS * GROWTH ** (i - 1)
        return float(lo * math.sqrt(GROWTH))

    def summary(self) -> dict[str, Any]:
        n = self.count
        return {"count": n, "mean": self.total_ms / n if n else None, "p50": self.quantile(0.5),
                "p95": self.quantile(0.95), "p99": self.quantile(0.99), "relative_error": math.sqrt(GROWTH) - 1}
