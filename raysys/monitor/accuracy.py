"""Live accuracy: delayed labels joined to logged predictions by request_id, and a confidence-based
estimate (in the manner of NannyML's CBPE) of accuracy before any label arrives.

The estimate is the mean over the window of the estimated chance that each prediction is right: for a
calibrated model, P(prediction correct | x) = max_k p_k(x). At registration the profile fits, on held-out
labels, a temperature (the whole distribution) and then an isotonic map from the top-class confidence to
correctness (`PredictionRef.correct_probability`): temperature scaling alone can leave the top-class
confidence several points off the accuracy (a moderately trained MLP: 4 points under). It tracks covariate and label shift the model is
uncertain about; it cannot see concept drift (P(y | x) changing), which only realised labels reveal.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any


class PredictionLog:
    """request_id -> (model_version, predicted classes), the latest `capacity` requests."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._log: OrderedDict[str, tuple[str | None, tuple[int, ...]]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._log)

    def add(self, request_id: str, version: str | None, preds: tuple[int, ...]) -> None:
        self._log[request_id] = (version, preds)
        if len(self._log) > self.capacity:
            self._log.popitem(last=False)
            self.evicted += 1

    def pop(self, request_id: str):
        return self._log.pop(request_id, None)

    def state(self) -> list:
        return [[k, v[0], list(v[1])] for k, v in self._log.items()]

    def load_state(self, items: list) -> None:
        for k, ver, preds in items[-self.capacity:]:
            self._log[k] = (ver, tuple(preds))


class AccuracyTracker:
    """Correctness of the latest `window` labelled predictions (overall and per model version)."""

    def __init__(self, window: int):
        self.window = int(window)
        self.recent: deque[tuple[str | None, bool]] = deque(maxlen=self.window)
        self.labels = 0
        self.unmatched = 0
        self.invalid = 0  # feedback items rejected (unknown class, wrong number of labels)

    def add(self, version: str | None, correct: list[bool]) -> None:
        for c in correct:
            self.recent.append((version, bool(c)))
        self.labels += len(correct)

    def summary(self) -> dict[str, Any]:
        n = len(self.recent)
        by_version: dict[str, list[int]] = {}
        for v, c in self.recent:
            agg = by_version.setdefault(str(v), [0, 0])
            agg[0] += c
            agg[1] += 1
        return {"realised": sum(c for _, c in self.recent) / n if n else None, "labelled_in_window": n,
                "labels_total": self.labels, "unmatched_labels": self.unmatched, "invalid_labels": self.invalid,
                "realised_by_version": {k: a[0] / a[1] for k, a in by_version.items()}}

    def state(self) -> dict[str, Any]:
        return {"recent": [[v, c] for v, c in self.recent], "labels": self.labels, "unmatched": self.unmatched,
                "invalid": self.invalid}

    def load_state(self, st: dict[str, Any]) -> None:
        self.recent.extend((v, bool(c)) for v, c in st.get("recent", []))
        self.labels, self.unmatched = int(st.get("labels", 0)), int(st.get("unmatched", 0))
        self.invalid = int(st.get("invalid", 0))
