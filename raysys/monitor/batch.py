"""What `Monitor.record` takes: a batch of scored rows from a serving replica, checked against the profile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class RecordBatch:
    """A checked batch: `pred` is -1 where a row has no (valid) predicted class; `proba` None when the
    replica sent none; `key` names the model version its counters go under ("unknown" when none)."""

    x_num: np.ndarray
    x_cat: np.ndarray
    pred: np.ndarray
    proba: np.ndarray | None
    latency: np.ndarray
    key: str

    @property
    def n(self) -> int:
        return len(self.x_num)


def parse_batch(batch: dict[str, Any], *, n_num: int, cat_bins: np.ndarray, num_classes: int | None,
                model_version: str | None) -> RecordBatch:
    """Check `batch` (the `Monitor.record` contract) against a profile of `n_num` numeric features,
    categorical ones of `cat_bins[j]` categories and `num_classes` classes; ValueError says what is wrong."""
    x_num, x_cat = _features(batch, n_num, len(cat_bins))
    n = len(x_num)
    if n and len(cat_bins) and ((x_cat < 0).any() or (x_cat >= cat_bins).any()):
        raise ValueError("monitor.record: category index outside the profile's categories")
    latency = batch.get("latency_ms")
    latency = np.asarray([] if latency is None else latency, dtype=np.float64).ravel()
    version = batch.get("model_version")
    version = model_version if version is None else str(version)
    key = version if version is not None else "unknown"
    pred, proba = _predictions(batch, n, num_classes)
    return RecordBatch(x_num, x_cat, pred, proba, latency, key)


def _features(batch: dict[str, Any], n_num: int, n_cat: int) -> tuple[np.ndarray, np.ndarray]:
    x_num = np.asarray(batch["x_num"], dtype=np.float64)
    x_cat = np.asarray(batch["x_cat"], dtype=np.int64)
    n = len(x_num)
    if x_num.ndim == 1 and n == 0:
        x_num = x_num.reshape(0, n_num)
    if x_cat.ndim == 1 and len(x_cat) == 0:
        x_cat = x_cat.reshape(0, n_cat)
    if x_num.shape != (n, n_num) or x_cat.shape != (n, n_cat):
        raise ValueError(f"monitor.record: expected x_num [n, {n_num}] and x_cat [n, {n_cat}], "
                         f"got {x_num.shape} and {x_cat.shape}")
    return x_num, x_cat


def _predictions(batch: dict[str, Any], n: int, num_classes: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(predicted class per row, -1 for none or out of range; probabilities or None). Without `pred` the
    prediction is the most probable class."""
    pred = batch.get("pred")
    proba = batch.get("proba")
    if proba is not None:
        proba = np.asarray(proba, dtype=np.float64)
        if proba.shape != (n, num_classes or 0):
            raise ValueError(f"monitor.record: proba must be [n, {num_classes}], got {proba.shape}")
        if pred is None:
            pred = proba.argmax(1)
    if pred is None:
        return np.full(n, -1, dtype=np.int64), proba
    pred = np.asarray(pred, dtype=np.int64).ravel()
    if len(pred) != n:
        raise ValueError(f"monitor.record: pred has {len(pred)} entries for {n} rows")
    k = num_classes or 0
    return np.where((pred >= 0) & (pred < k), pred, -1), proba


def request_rows(batch: dict[str, Any], n: int) -> list[int] | None:
    """Rows per request id of a batch with `request_ids` (one each unless `rows_per_request` says), None
    without ids."""
    ids = batch.get("request_ids")
    if not ids:
        return None
    per = batch.get("rows_per_request")
    per = [1] * len(ids) if per is None else [int(r) for r in per]
    if len(per) != len(ids) or sum(per) != n:
        raise ValueError(f"monitor.record: rows_per_request must give one count per request id summing to {n}")
    return per


def text_request_ids(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` with its request ids as UTF-8-writable text: an id with a lone surrogate (not valid UTF-8,
    which Parquet refuses) is kept with it escaped (`\\ud800`), so one bad id cannot fail a whole batch.
    The same batch when every id is already fine (the usual case: one isascii() per id)."""
    ids = batch.get("request_ids")
    if not ids or all(isinstance(r, str) and r.isascii() for r in ids):
        return batch
    return dict(batch, request_ids=[str(r).encode("utf-8", "backslashreplace").decode("utf-8") for r in ids])
