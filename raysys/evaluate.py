"""Offline classification metrics, pure numpy, JSON-serialisable.

Conventions (the same as scikit-learn's `zero_division=0` with its default label set):

- precision of a class that is never predicted is 0; recall of a class with no true rows is 0; F1 is 0
  when precision + recall is 0.
- macro averages are the unweighted mean over the classes that occur in `y_true` or in `y_pred`. A
  class absent from both has no defined metrics: it is reported as 0 per class but left out of the
  macro averages, so evaluating a split that lacks a rare class does not drag every average down.
- `confusion_matrix[i][j]` counts rows of true class i predicted as class j (rows = true class).
- ROC-AUC is one-vs-rest per class (the Mann-Whitney rank statistic, ties averaged); a class with no
  positive or no negative rows has none (`None`) and is left out of the macro average.
- Calibration uses the top-label confidence in `num_bins` equal-width bins; bin i holds confidences in
  (i/B, (i+1)/B] (the first bin also holds 0), scikit-learn's `calibration_curve` convention.
  ECE = sum over bins of (rows in bin / rows) * |accuracy - mean confidence|.
- Latency figures are wall-clock milliseconds on the calling process's torch threads: `per_row` is one
  row per call (a request scored alone), `per_batch` one `batch_size` batch per call.

`full_evaluation` composes all of these into the dict stored as a model version's metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.config import SliceConfig
from raysys.models import num_parameters, predict_logits


def _labels(arr, name: str, num_classes: int) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of class indices, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.equal(np.mod(a, 1), 0)):
            raise ValueError(f"{name}: class indices must be integers")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"{name}: class indices must lie in [0, {num_classes}); got {a.min()}..{a.max()}")
    return a


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """int64 (num_classes, num_classes); rows = true class, columns = predicted class."""
    if num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1 (got {num_classes})")
    t = _labels(y_true, "y_true", num_classes)
    p = _labels(y_pred, "y_pred", num_classes)
    if len(t) != len(p):
        raise ValueError(f"y_pred: length {len(p)} differs from y_true's {len(t)}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def classification_metrics(y_true, y_pred, num_classes: int, *, class_names: list[str] | None = None
                           ) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class metrics and the confusion matrix.

    Returns a JSON-serialisable dict:
        num_samples, num_classes, accuracy, macro_precision, macro_recall, macro_f1,
        per_class: {precision: [k], recall: [k], f1: [k], support: [k]} (support = true rows per class),
        support: [k] (the same list, at top level for convenience),
        confusion_matrix: k lists of k ints, rows = true class,
        classes: the class names (only when `class_names` is given).
    See the module docstring for the zero-division and macro-average rules.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    n = int(cm.sum())
    if n == 0:
        raise ValueError("y_true: no rows to evaluate")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names: {len(class_names)} names for {num_classes} classes")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = _safe_div(tp, predicted.astype(np.float64))
    recall = _safe_div(tp, support.astype(np.float64))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)
    out: dict[str, Any] = {
        "num_samples": n,
        "num_classes": int(num_classes),
        "accuracy": float(tp.sum() / n),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                      "support": support.astype(int).tolist()},
        "support": support.astype(int).tolist(),
        "confusion_matrix": cm.astype(int).tolist(),
    }
    if class_names is not None:
        out["classes"] = [str(c) for c in class_names]
    return out


def agreement(pred_a, pred_b) -> float:
    """Fraction of rows on which two models predict the same class (e.g. student vs teacher)."""
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"pred_b: shape {b.shape} must equal pred_a's {a.shape}, both 1-D")
    if a.size == 0:
        raise ValueError("pred_a: no rows to compare")
    return float((a == b).mean())


def evaluate_model(model: nn.Module, x_num, x_cat, y, num_classes: int, *, class_names: list[str] | None = None,
                   batch_size: int = 8192) -> dict[str, Any]:
    """`classification_metrics` of a model's predictions plus `log_loss` (mean cross-entropy, nats).

    The model is left in eval mode (see `raysys.models.predict_logits`).
    """
    y_arr = _labels(y, "y", num_classes)
    if len(y_arr) == 0:
        raise ValueError("y: no rows to evaluate")
    logits = predict_logits(model, x_num, x_cat, batch_size=batch_size)
    if len(y_arr) != len(logits):
        raise ValueError(f"y: length {len(y_arr)} differs from the {len(logits)} feature rows")
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"num_classes: {num_classes} differs from the model's {tuple(logits.shape)[1:]} logits")
    out = classification_metrics(y_arr, logits.argmax(1).numpy(), num_classes, class_names=class_names)
    out["log_loss"] = float(F.cross_entropy(logits.float(), torch.from_numpy(y_arr)).item())
    return out


# ----- probabilities: ROC-AUC and calibration ----------------------------------------------------------


def softmax(logits) -> np.ndarray:
    """Row-wise softmax of (n, k) logits, float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _proba(proba, n: int, num_classes: int) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape != (n, num_classes):
        raise ValueError(f"proba: expected shape ({n}, {num_classes}), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("proba: contains NaN or infinite values")
    return p


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values, and the average 1-based rank over the run
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc_ovr(y_true, proba, num_classes: int) -> dict[str, Any]:
    """One-vs-rest ROC-AUC: `{"per_class": [auc or None], "macro": mean of the defined ones or None}`."""
    y = _labels(y_true, "y_true", num_classes)
    p = _proba(proba, len(y), num_classes)
    per_class: list[float | None] = []
    for k in range(num_classes):
        pos = y == k
        n1, n0 = int(pos.sum()), int((~pos).sum())
        if n1 == 0 or n0 == 0:
            per_class.append(None)
            continue
        ranks = _average_ranks(p[:, k])
        per_class.append(float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0)))
    defined = [a for a in per_class if a is not None]
    return {"per_class": per_class, "macro": float(np.mean(defined)) if defined else None}


def calibration(y_true, proba, num_bins: int = 15) -> dict[str, Any]:
    """Top-label calibration: ECE, MCE (the worst bin's gap) and the reliability-diagram bins.

    Each bin: `lower`, `upper`, `count`, `confidence` (mean top probability), `accuracy` (fraction of
    correct top predictions); `confidence`/`accuracy` are None for an empty bin.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins: must be >= 1 (got {num_bins})")
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"proba: expected a 2-D array (rows, classes), got shape {p.shape}")
    y = _labels(y_true, "y_true", p.shape[1])
    p = _proba(p, len(y), p.shape[1])
    if len(y) == 0:
        raise ValueError("y_true: no rows to evaluate")
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf)  # (e_i, e_{i+1}] as in sklearn.calibration.calibration_curve
    counts = np.bincount(ids, minlength=num_bins)
    conf_sum = np.bincount(ids, weights=conf, minlength=num_bins)
    acc_sum = np.bincount(ids, weights=correct, minlength=num_bins)
    bins, ece, mce = [], 0.0, 0.0
    for i in range(num_bins):
        c = int(counts[i])
        if c:
            mc, ma = conf_sum[i] / c, acc_sum[i] / c
            gap = abs(ma - mc)
            ece += c / len(y) * gap
            mce = max(mce, gap)
        bins.append({"lower": float(edges[i]), "upper": float(edges[i + 1]), "count": c,
                     "confidence": float(mc) if c else None, "accuracy": float(ma) if c else None})
    return {"ece": float(ece), "mce": float(mce), "num_bins": int(num_bins),
            "mean_confidence": float(conf.mean()), "accuracy": float(correct.mean()), "bins": bins}


# ----- slices -------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def slice_metrics(columns: dict[str, np.ndarray], y_true, y_pred, num_classes: int,
                  slices: SliceConfig | dict | None = None, *, categorical: list[str] | None = None
                  ) -> dict[str, Any]:
    """Accuracy and macro F1 per slice of the rows, and the worst slice.

    `columns`: raw feature values by name (strings for categorical features, numbers for numeric ones).
    Slices: every value of each categorical feature in `slices.categorical` (None: all of
    `categorical`, the schema's categorical features), and for numeric features the bins given by
    `slices.numeric_bins` edges (or `num_quantile_bins` quantile bins of the evaluated rows).
    The worst slice is the one with the lowest accuracy among slices with at least `min_rows` rows;
    it is returned as `worst` and flagged `worst: true` in the list.
    """
    cfg = slices if isinstance(slices, SliceConfig) else SliceConfig.model_validate(slices or {})
    t = _labels(y_true, "y_true", num_classes)
    p = _labels(y_pred, "y_pred", num_classes)
    if len(t) != len(p):
        raise ValueError(f"y_pred: length {len(p)} differs from y_true's {len(t)}")
    cat_names = cfg.categorical if cfg.categorical is not None else list(categorical or [])
    out: list[dict[str, Any]] = []

    def add(feature: str, kind: str, name: str, mask: np.ndarray) -> None:
        n = int(mask.sum())
        row: dict[str, Any] = {"feature": feature, "kind": kind, "slice": name, "num_rows": n,
                               "accuracy": None, "macro_f1": None, "worst": False}
        if n:
            m = classification_metrics(t[mask], p[mask], num_classes)
            row["accuracy"], row["macro_f1"] = m["accuracy"], m["macro_f1"]
        out.append(row)

    for feat in cat_names:
        if feat not in columns:
            raise ValueError(f"distill.evaluation.slices.categorical: no column {feat!r}; columns are "
                             f"{sorted(columns)}")
        vals = np.asarray(columns[feat]).astype(str)
        if len(vals) != len(t):
            raise ValueError(f"columns[{feat!r}]: {len(vals)} rows, labels have {len(t)}")
        for v in sorted(set(vals.tolist())):
            add(feat, "categorical", f"{feat} = {v}", vals == v)
    numeric_feats = dict(cfg.numeric_bins)
    if cfg.num_quantile_bins:
        for feat, col in columns.items():
            if feat in numeric_feats or feat in cat_names:
                continue
            arr = np.asarray(col)
            if not np.issubdtype(arr.dtype, np.number):
                continue
            # nanquantile: a nullable feature's raw nulls (NaN) fall in no numeric slice instead of making NaN edges
            qs = np.nanquantile(arr.astype(np.float64), np.linspace(0, 1, cfg.num_quantile_bins + 1)[1:-1])
            numeric_feats[feat] = sorted(set(float(q) for q in qs))
    for feat, edges in numeric_feats.items():
        if feat not in columns:
            raise ValueError(f"distill.evaluation.slices.numeric_bins: no column {feat!r}; columns are "
                             f"{sorted(columns)}")
        vals = np.asarray(columns[feat], dtype=np.float64)
        e = sorted(float(x) for x in edges)
        if not e:
            continue
        add(feat, "numeric", f"{feat} < {_fmt(e[0])}", vals < e[0])
        for lo, hi in zip(e[:-1], e[1:]):
            add(feat, "numeric", f"{_fmt(lo)} <= {feat} < {_fmt(hi)}", (vals >= lo) & (vals < hi))
        add(feat, "numeric", f"{feat} >= {_fmt(e[-1])}", vals >= e[-1])
    eligible = [r for r in out if r["num_rows"] >= cfg.min_rows and r["accuracy"] is not None]
    worst = min(eligible, key=lambda r: (r["accuracy"], r["num_rows"])) if eligible else None
    if worst is not None:
        worst["worst"] = True
    return {"slices": out, "worst": dict(worst) if worst else None, "min_rows": cfg.min_rows}


# ----- latency ------------------------------------------------------------------------------------------


def _percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


@torch.inference_mode()
def measure_latency(model: nn.Module, x_num, x_cat, *, batch_size: int = 64, repeats: int = 200,
                    warmup: int = 10, seed: int = 0) -> dict[str, Any]:
    """Per-row (one row per call) and per-batch (`batch_size` rows per call) latency in ms, p50/p99.

    `per_row_in_batch_ms` is the per-batch p50 divided by the batch size: what a row costs when the
    server batches requests (Serve's `@serve.batch`). Measured on the caller's torch threads.
    """
    if repeats < 1 or batch_size < 1:
        raise ValueError("measure_latency: repeats and batch_size must be >= 1")
    model.eval()
    xn = torch.as_tensor(np.asarray(x_num), dtype=torch.float32)
    xc = torch.as_tensor(np.asarray(x_cat), dtype=torch.int64)
    n = len(xn)
    if n == 0:
        raise ValueError("measure_latency: no rows")
    rng = np.random.default_rng(seed)
    bs = min(batch_size, n)

    def timed(size: int) -> list[float]:
        out = []
        for r in range(warmup + repeats):
            i = int(rng.integers(0, n - size + 1))
            a, b = xn[i:i + size], xc[i:i + size]
            t0 = time.perf_counter_ns()
            model(a, b)
            dt = (time.perf_counter_ns() - t0) / 1e6
            if r >= warmup:
                out.append(dt)
        return out

    row = _percentiles(timed(1))
    batch = _percentiles(timed(bs))
    return {"per_row_ms": row, "per_batch_ms": {**batch, "batch_size": bs},
            "per_row_in_batch_ms": batch["p50"] / bs, "repeats": repeats, "threads": torch.get_num_threads()}


@torch.inference_mode()
def compare_latency(models: dict[str, nn.Module], x_num, x_cat, *, batch_sizes: tuple[int, ...] = (1, 64),
                    rounds: int = 20, block: int = 50, warmup: int = 5, seed: int = 0) -> dict[str, Any]:
    """Per-row latency of several models measured side by side, for ratios between them.

    For each batch size, `rounds` rounds; in each round every model in turn scores `warmup` + `block`
    calls (one `model(x_num, x_cat)` call each, in `inference_mode`, like a serving replica), on the
    SAME randomly drawn row slices for every model. Interleaving in blocks means a load change on the
    machine hits every model alike, while each block still runs with that model's own weights in the
    cache (the warmup calls refill it), as in a replica that serves one model. Returns, per model and
    batch size, the p50 / p99 / mean of per-row milliseconds (call time / batch size) over the
    `rounds * block` timed calls, on the caller's torch threads (set them before calling).
    """
    if not models:
        raise ValueError("compare_latency: no models")
    if rounds < 1 or block < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("compare_latency: rounds, block and every batch size must be >= 1, warmup >= 0")
    xn = torch.as_tensor(np.asarray(x_num), dtype=torch.float32)
    xc = torch.as_tensor(np.asarray(x_cat), dtype=torch.int64)
    n = len(xn)
    if n == 0:
        raise ValueError("compare_latency: no rows")
    for m in models.values():
        m.eval()
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {name: {} for name in models}
    for size in batch_sizes:
        bs = min(size, n)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            starts = rng.integers(0, n - bs + 1, size=warmup + block)
            for name, model in models.items():
                for k, i in enumerate(starts):
                    a, b = xn[i:i + bs], xc[i:i + bs]
                    t0 = time.perf_counter_ns()
                    model(a, b)
                    dt = (time.perf_counter_ns() - t0) / 1e6
                    if k >= warmup:
                        times[name].append(dt / bs)
        for name in models:
            out[name][f"batch{size}"] = {**_percentiles(times[name]), "batch_size": bs}
    return {"per_row_ms": out, "rounds": rounds, "block": block, "warmup": warmup,
            "threads": torch.get_num_threads()}


# ----- everything ---------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Parameters, counting the packed weights of quantized Linear layers too (they are not nn.Parameters)."""
    n = num_parameters(model)
    for m in model.modules():
        if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):
            b = m.bias()
            n += m.weight().numel() + (b.numel() if b is not None else 0)
    return n


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (latency as one serving replica thread sees it), then
    restore the caller's count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def full_evaluation(model: nn.Module, x_num, x_cat, y, num_classes: int, *, class_names: list[str] | None = None,
                    teacher_logits=None, raw_columns: dict[str, np.ndarray] | None = None,
                    categorical: list[str] | None = None, slices: SliceConfig | dict | None = None,
                    num_calibration_bins: int = 15, latency_batch_size: int = 64, latency_repeats: int = 200,
                    batch_size: int = 8192) -> dict[str, Any]:
    """`evaluate_model` plus ROC-AUC, calibration, teacher agreement (when `teacher_logits` are given),
    per-slice metrics (when `raw_columns` are given), latency (when `latency_repeats` > 0) and the
    parameter count. JSON-serialisable."""
    y_arr = _labels(y, "y", num_classes)
    logits = predict_logits(model, x_num, x_cat, batch_size=batch_size)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"num_classes: {num_classes} differs from the model's {tuple(logits.shape)[1:]} logits")
    if len(y_arr) != len(logits):
        raise ValueError(f"y: length {len(y_arr)} differs from the {len(logits)} feature rows")
    pred = logits.argmax(1).numpy().astype(np.int64)
    proba = softmax(logits.float().numpy())
    out = classification_metrics(y_arr, pred, num_classes, class_names=class_names)
    out["log_loss"] = float(F.cross_entropy(logits.float(), torch.from_numpy(y_arr)).item())
    out["roc_auc"] = roc_auc_ovr(y_arr, proba, num_classes)
    out["calibration"] = calibration(y_arr, proba, num_calibration_bins)
    out["num_parameters"] = count_parameters(model)
    if teacher_logits is not None:
        t_pred = np.asarray(teacher_logits).argmax(1)
        out["teacher_agreement"] = agreement(pred, t_pred)
        out["teacher_accuracy"] = float((t_pred == y_arr).mean())
    if raw_columns is not None:
        out["slices"] = slice_metrics(raw_columns, y_arr, pred, num_classes, slices, categorical=categorical)
    if latency_repeats > 0:
        out["latency"] = measure_latency(model, x_num, x_cat, batch_size=latency_batch_size,
                                         repeats=latency_repeats)
    return out
