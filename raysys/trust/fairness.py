"""Per-group metrics of protected columns: accuracy, selection rate, true / false positive rates, and the
largest gaps between groups (equalized odds: Hardt, Price and Srebro, NeurIPS 2016; demographic parity).

Multi-class is handled one class against the rest: for class c and group g, selection rate = P(pred = c | g),
TPR = P(pred = c | y = c, g), FPR = P(pred = c | y != c, g). A gap is max - min over the groups with at least
`min_rows` rows (and, for TPR / FPR, at least one row in the conditioning set); the reported gap is the worst
class's. Groups: each category of a categorical column, quartiles of a numeric one; nulls form their own group.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _groups(values: np.ndarray) -> list[tuple[str, np.ndarray]]:
    if np.issubdtype(values.dtype, np.number):
        v = values.astype(np.float64)
        ok = ~np.isnan(v)
        edges = np.unique(np.quantile(v[ok], [0.25, 0.5, 0.75])) if ok.any() else np.array([])
        ids = np.searchsorted(edges, v, side="right")
        bounds = [-np.inf, *edges, np.inf]
        out = [(f"[{bounds[i]:.4g}, {bounds[i + 1]:.4g})", ok & (ids == i)) for i in range(len(edges) + 1)]
        return out + ([("null", ~ok)] if (~ok).any() else [])
    s = np.array(["null" if x is None else str(x) for x in values], dtype=object)
    return [(g, s == g) for g in sorted(set(s.tolist()))]


def _rate(hit: np.ndarray, where: np.ndarray) -> float | None:
    return float(hit[where].mean()) if where.any() else None


def _gap(rates: list[float | None]) -> float:
    r = [x for x in rates if x is not None]
    return float(max(r) - min(r)) if len(r) >= 2 else 0.0


def group_metrics(values, y_true, y_pred, num_classes: int, *, min_rows: int = 30) -> dict[str, Any]:
    """One protected column: per group rows, accuracy, per-class selection rate / TPR / FPR; the gaps."""
    values, t, p = np.asarray(values), np.asarray(y_true), np.asarray(y_pred)
    groups = []
    for name, mask in _groups(values):
        n = int(mask.sum())
        if n == 0:
            continue
        groups.append({"group": name, "num_rows": n, "accuracy": float((t[mask] == p[mask]).mean()),
                       "selection_rate": [_rate(p == c, mask) for c in range(num_classes)],
                       "tpr": [_rate(p == c, mask & (t == c)) for c in range(num_classes)],
                       "fpr": [_rate(p == c, mask & (t != c)) for c in range(num_classes)],
                       "compared": n >= min_rows})
    cmp = [g for g in groups if g["compared"]]
    sel = [_gap([g["selection_rate"][c] for g in cmp]) for c in range(num_classes)]
    eo = [max(_gap([g["tpr"][c] for g in cmp]), _gap([g["fpr"][c] for g in cmp])) for c in range(num_classes)]
    acc = [g["accuracy"] for g in cmp]
    return {"groups": groups, "min_rows": min_rows, "num_compared": len(cmp),
            "accuracy_gap": _gap(acc), "selection_rate_gap": max(sel), "equalized_odds_gap": max(eo),
            "worst_class_selection": int(np.argmax(sel)), "worst_class_equalized_odds": int(np.argmax(eo))}


def fairness_report(columns: dict[str, np.ndarray], protected: list[str], y_true, y_pred, num_classes: int, *,
                    min_rows: int = 30) -> dict[str, Any]:
    """`group_metrics` per protected column, and the largest gaps over them."""
    per = {}
    for name in protected:
        if name not in columns:
            raise ValueError(f"schema: protected feature {name!r} has no column among {sorted(columns)}")
        per[name] = group_metrics(columns[name], y_true, y_pred, num_classes, min_rows=min_rows)
    return {"columns": per,
            "equalized_odds_gap": max((c["equalized_odds_gap"] for c in per.values()), default=0.0),
            "selection_rate_gap": max((c["selection_rate_gap"] for c in per.values()), default=0.0)}
