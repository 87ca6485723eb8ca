"""Live accuracy: delayed labels joined to logged predictions by request_id, and a confidence-based
estimate (in the manner of NannyML's CBPE) of accuracy before the labels arrive.

The estimate is the mean over the window of the estimated chance that each prediction is right: for a
calibrated model, P(prediction correct | x) = max_k p_k(x). At registration the profile fits, on held-out
labels, a temperature (the whole distribution) and then an isotonic map from the top-class confidence to
correctness (`PredictionRef.correct_probability`): temperature scaling alone can leave the top-class
confidence several points off the accuracy (a moderately trained MLP: 4 points under).

That registration-time map tracks covariate and label shift the model is uncertain about, but it cannot
see concept drift (P(y | x) changing): the model is as confident as before and only labels say it is now
wrong. So the map is re-fitted online (`OnlineRecalibration`) from the labelled feedback joined so far:
the latest labelled rows are binned by their registration-map P(correct) q0, and each bin's observed
accuracy minus its mean q0 shifts the estimate of the rows in that bin, weighted by n / (n + prior_rows)
for n labelled rows. With no labels the estimate is exactly the registration-time CBPE one; once
labels show confident predictions going wrong, the estimate for the traffic whose labels have not
arrived yet falls with them.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_BIN_ROWS = 50  # labelled rows per recalibration bin at least (fewer rows: fewer, wider bins)


class PredictionLog:
    """request_id -> (model_version, predicted classes, q0 per row or None), the latest `capacity`
    requests whose labels have not arrived yet (a label pops its request). q0 is the registration-time
    estimate that the row's prediction is right (`PredictionRef.correct_probability`)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._log: OrderedDict[str, tuple[str | None, tuple[int, ...], tuple[float, ...] | None]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._log)

    def add(self, request_id: str, version: str | None, preds: tuple[int, ...],
            q0: tuple[float, ...] | None = None) -> None:
        self._log[request_id] = (version, preds, q0)
        if len(self._log) > self.capacity:
            self._log.popitem(last=False)
            self.evicted += 1

    def pop(self, request_id: str):
        return self._log.pop(request_id, None)

    def get(self, request_id: str):
        """The entry of `request_id` (None: unknown), left in the log."""
        return self._log.get(request_id)

    def recent_q0(self, max_rows: int) -> np.ndarray:
        """q0 of the latest (at most) `max_rows` unlabelled rows that have one, newest first."""
        out: list[float] = []
        for _, _, q0 in reversed(self._log.values()):
            if q0 is not None:
                out.extend(q0)
                if len(out) >= max_rows:
                    break
        return np.asarray(out[:max_rows], dtype=np.float64)

    def state(self) -> list:
        return [[k, v[0], list(v[1]), None if v[2] is None else list(v[2])] for k, v in self._log.items()]

    def load_state(self, items: list) -> None:
        for item in items[-self.capacity:]:
            k, ver, preds, q0 = item
            self._log[k] = (ver, tuple(preds), None if q0 is None else tuple(q0))


@dataclass
class RecalibrationFit:
    """The online correction: rows with q0 in bin b (interior `edges`, `np.searchsorted(side="right")`)
    get q0 + weight * delta[b], clipped to [0, 1]."""

    edges: np.ndarray
    delta: np.ndarray
    weight: float
    rows: int

    def apply(self, q0: np.ndarray) -> np.ndarray:
        q0 = np.asarray(q0, dtype=np.float64)
        return np.clip(q0 + self.weight * self.delta[np.searchsorted(self.edges, q0, side="right")], 0.0, 1.0)


class OnlineRecalibration:
    """Re-fits the confidence -> P(correct) map from the latest `window` labelled rows.

    Each labelled row contributes (q0, correct), q0 being the registration-time map's P(correct) of its
    prediction. `fit()` cuts the rows into up to `max_bins` equal-count bins of q0 (at least MIN_BIN_ROWS
    rows each) and per bin takes delta = observed accuracy - mean q0; `apply` shifts a row's q0 by its bin's
    delta times n / (n + prior_rows): the registration map counts as `prior_rows` labelled rows that agree
    with it, so a few labels move the estimate a little and many labels move it to what they show. A bin
    keeps the within-bin ordering of q0 (a shift, not a constant), so the estimate still follows covariate
    and label shift between label arrivals.
    """

    def __init__(self, window: int, prior_rows: float, max_bins: int = 10):
        self.pairs: deque[tuple[float, bool]] = deque(maxlen=int(window))
        self.prior_rows = float(prior_rows)
        self.max_bins = int(max_bins)

    def __len__(self) -> int:
        return len(self.pairs)

    def add(self, q0: Iterable[float], correct: Iterable[bool]) -> None:
        for q, c in zip(q0, correct, strict=True):
            if not math.isnan(q):  # NaN: no probabilities were logged for this row
                self.pairs.append((float(q), bool(c)))

    def fit(self) -> RecalibrationFit | None:
        n = len(self.pairs)
        if n == 0:
            return None
        arr = np.asarray(self.pairs, dtype=np.float64)
        q, y = arr[:, 0], arr[:, 1]
        bins = max(1, min(self.max_bins, n // MIN_BIN_ROWS))
        # data points as edges ("inverted_cdf"), so every bin but possibly the first holds rows; ties (the
        # isotonic map is flat in places) stay in one bin, for the fit and for `apply` alike; rows outside
        # the labelled range take the shift of the nearest bin
        edges = np.unique(np.quantile(q, np.arange(1, bins) / bins, method="inverted_cdf"))
        if len(edges) and not (q < edges[0]).any():
            edges = edges[1:]  # the first bin would be empty: rows below the labelled range get the lowest bin's
        b = np.searchsorted(edges, q, side="right")
        count = np.bincount(b, minlength=len(edges) + 1)
        gap = np.bincount(b, weights=y - q, minlength=len(edges) + 1)
        delta = np.divide(gap, count, out=np.zeros_like(gap), where=count > 0)
        weight = n / (n + self.prior_rows) if n + self.prior_rows > 0 else 0.0
        return RecalibrationFit(edges, delta, weight, n)

    def state(self) -> list:
        return [[q, c] for q, c in self.pairs]

    def load_state(self, items: list) -> None:
        self.pairs.extend((float(q), bool(c)) for q, c in items)


class AccuracyTracker:
    """Correctness of the latest `window` labelled predictions (overall and per model version)."""

    def __init__(self, window: int):
        self.window = int(window)
        self.recent: deque[tuple[str | None, bool]] = deque(maxlen=self.window)
        self.labels = 0
        self.unmatched = 0
        self.invalid = 0  # feedback items rejected (unknown class, wrong number of labels)
        self.totals: dict[str, list[int]] = {}  # version -> [labelled rows, correct], since start (canary gates)
        # /v1/feedback items refused for a request id the endpoint never answered (or already labelled, or
        # evicted from the prediction log): counted once, after the replica's second ask
        self.refused = 0

    def add(self, version: str | None, correct: list[bool]) -> None:
        for c in correct:
            self.recent.append((version, bool(c)))
        self.labels += len(correct)
        tot = self.totals.setdefault(str(version), [0, 0])
        tot[0] += len(correct)
        tot[1] += sum(bool(c) for c in correct)

    def summary(self) -> dict[str, Any]:
        n = len(self.recent)
        by_version: dict[str, list[int]] = {}
        for v, c in self.recent:
            agg = by_version.setdefault(str(v), [0, 0])
            agg[0] += c
            agg[1] += 1
        return {"realised": sum(c for _, c in self.recent) / n if n else None, "labelled_in_window": n,
                "labels_total": self.labels, "unmatched_labels": self.unmatched, "invalid_labels": self.invalid,
                "refused_unknown_ids": self.refused,
                "realised_by_version": {k: a[0] / a[1] for k, a in by_version.items()},
                "labelled_by_version": {k: {"labelled": t[0], "correct": t[1]} for k, t in self.totals.items()}}

    def state(self) -> dict[str, Any]:
        return {"recent": [[v, c] for v, c in self.recent], "labels": self.labels, "unmatched": self.unmatched,
                "invalid": self.invalid, "refused": self.refused, "totals": self.totals}

    def load_state(self, st: dict[str, Any]) -> None:
        self.recent.extend((v, bool(c)) for v, c in st.get("recent", []))
        self.labels, self.unmatched = int(st.get("labels", 0)), int(st.get("unmatched", 0))
        self.invalid, self.refused = int(st.get("invalid", 0)), int(st.get("refused", 0))
        self.totals = {str(k): [int(t[0]), int(t[1])] for k, t in (st.get("totals") or {}).items()}


def confidence_estimate(prediction, proba: np.ndarray, recal: OnlineRecalibration, pred_log: PredictionLog,
                        window_size: int) -> dict[str, Any]:
    """The confidence-based accuracy estimate of the window's rows (`proba` [rows, K]; a NaN row sent no
    probabilities) and of the latest `window_size` rows still waiting for labels, through the profile's
    registration-time confidence map re-fitted online (`recal`). `prediction`: the profile's PredictionRef
    (None: the profile has no held-out predictions, so there is no estimate)."""
    rows = len(proba)
    ok = ~np.isnan(proba[:, 0]) if rows else np.zeros(0, dtype=bool)
    fit = recal.fit() if prediction is not None else None
    est = est0 = est_unl = None
    unlabelled = np.zeros(0)
    if prediction is not None:
        if ok.any():
            q0 = prediction.correct_probability(proba[ok])
            est0 = float(q0.mean())
            est = float(fit.apply(q0).mean()) if fit is not None else est0
        unlabelled = pred_log.recent_q0(window_size)
        if len(unlabelled):
            est_unl = float((fit.apply(unlabelled) if fit is not None else unlabelled).mean())
    return {
        "estimated": est,  # over the window's rows, labelled or not
        "estimated_rows": int(ok.sum()),
        "estimated_unlabelled": est_unl,  # over the latest window_size rows still waiting for labels
        "unlabelled_rows": int(len(unlabelled)),
        "estimated_registration_map": est0,  # the same window through the registration-time map alone
        "recalibration": {"labelled_rows": fit.rows if fit is not None else 0, "prior_rows": recal.prior_rows,
                          "weight": fit.weight if fit is not None else 0.0,
                          "bins": int(len(fit.delta)) if fit is not None else 0},
        "method_estimated": _estimate_method(prediction, fit, recal.prior_rows),
    }


def _estimate_method(prediction, fit: RecalibrationFit | None, prior_rows: float) -> str:
    if prediction is None:
        return "n/a (the reference profile has no held-out predictions)"
    method = (f"CBPE-style mean P(top class right): temperature {prediction.temperature:.3f}"
              + (", then the held-out isotonic confidence map" if prediction.confidence_map is not None else ""))
    if fit is None:
        return method + "; no labels joined yet, so the registration-time map alone"
    return method + (f"; re-fitted online on {fit.rows} labelled rows ({len(fit.delta)} confidence bins, "
                     f"weight {fit.weight:.3f} = n / (n + {prior_rows:g}))")
