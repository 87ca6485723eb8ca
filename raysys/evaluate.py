"""Offline classification metrics, pure numpy, JSON-serialisable.

Conventions (the same as scikit-learn's `zero_division=0` with its default label set):

- precision of a class that is never predicted is 0; recall of a class with no true rows is 0; F1 is 0
  when precision + recall is 0.
- macro averages are the unweighted mean over the classes that occur in `y_true` or in `y_pred`. A
  class absent from both has no defined metrics: it is reported as 0 per class but left out of the
  macro averages, so evaluating a split that lacks a rare class does not drag every average down.
- `confusion_matrix[i][j]` counts rows of true class i predicted as class j (rows = true class).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.models import predict_logits


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


def predict_classes(model: nn.Module, x_num, x_cat, *, batch_size: int = 8192) -> np.ndarray:
    """Predicted class indices (int64), in eval mode, batched."""
    return predict_logits(model, x_num, x_cat, batch_size=batch_size).argmax(1).numpy().astype(np.int64)


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
