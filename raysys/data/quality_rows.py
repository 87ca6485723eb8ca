"""Row checks: exact and near duplicates within a split, and rows of validation/test repeated from train.

Rows are compared through 64-bit row hashes (`quality_frame.row_keys`), so a check costs a sort per split.
A near duplicate is a row equal to another after rounding every standardized numeric feature to
`quality.near_tolerance` training standard deviations (categories equal): a pair closer than the tolerance
that straddles a rounding boundary is missed, the price of a linear-time check.
"""

from __future__ import annotations

import numpy as np

from raysys.config.quality import QualityConfig
from raysys.data.quality_frame import CheckResult, QualityFrame, exact_num_keys, near_num_keys, row_keys


def _repeats(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose key appeared on an earlier row (bool [n]) and, per row, the first row with its key."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first_of_row = first[inverse]
    return first_of_row != np.arange(len(keys)), first_of_row


def _share(n: int, n_rows: int) -> float:
    return float(n / n_rows) if n_rows else 0.0


def duplicates(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Rows repeating an earlier row of their split exactly (features and label); also counts the rows whose
    features repeat an earlier row's with another label (conflicting duplicates: a label-noise sign)."""
    details, examples, value = {}, [], 0.0
    for name, s in frame.splits.items():
        num_keys = exact_num_keys(s.num)
        dup, first = _repeats(row_keys(num_keys, s.cat, s.y))
        feat_dup, feat_first = _repeats(row_keys(num_keys, s.cat))
        conflicting = feat_dup & (s.y != s.y[feat_first])
        details[name] = {"rows": len(s), "duplicate_rows": int(dup.sum()), "conflicting_label_rows":
                         int(conflicting.sum()), "share": round(_share(dup.sum(), len(s)), 6)}
        value = max(value, _share(dup.sum(), len(s)))
        examples += [{"split": name, "row": int(s.index[i]), "same_as_row": int(s.index[first[i]])}
                     for i in np.flatnonzero(dup)[: cfg.max_examples]]
    counts = ", ".join(f"{k} {v['duplicate_rows']}" for k, v in details.items())
    return CheckResult(value, f"exact duplicate rows per split: {counts}", examples[: cfg.max_examples], details)


def near_duplicates(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Rows within `near_tolerance` of an earlier row of their split that are not exact copies of it."""
    details, examples, value = {}, [], 0.0
    for name, s in frame.splits.items():
        near, first = _repeats(row_keys(near_num_keys(frame.standardized(name), cfg.near_tolerance), s.cat))
        exact, _ = _repeats(row_keys(exact_num_keys(s.num), s.cat))
        only_near = near & ~exact
        details[name] = {"rows": len(s), "near_duplicate_rows": int(only_near.sum()),
                         "share": round(_share(only_near.sum(), len(s)), 6)}
        value = max(value, _share(only_near.sum(), len(s)))
        examples += [{"split": name, "row": int(s.index[i]), "near_row": int(s.index[first[i]])}
                     for i in np.flatnonzero(only_near)[: cfg.max_examples]]
    counts = ", ".join(f"{k} {v['near_duplicate_rows']}" for k, v in details.items())
    return CheckResult(value, f"near-duplicate rows (tolerance {cfg.near_tolerance:g} std) per split: {counts}",
                       examples[: cfg.max_examples], details)


def _train_lookup(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train keys and, in the same order, the train row positions holding them (first of each)."""
    uniq, first = np.unique(keys, return_index=True)
    return uniq, first


def _find(uniq: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.minimum(np.searchsorted(uniq, keys), max(len(uniq) - 1, 0))
    found = uniq[pos] == keys if len(uniq) else np.zeros(len(keys), dtype=bool)
    return found, pos


def leakage(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Validation and test rows whose features equal a training row's, exactly or within `near_tolerance`."""
    tr = frame.train
    ex_u, ex_first = _train_lookup(row_keys(exact_num_keys(tr.num), tr.cat))
    nr_u, nr_first = _train_lookup(row_keys(near_num_keys(frame.standardized("train"), cfg.near_tolerance), tr.cat))
    details, examples, value = {}, [], 0.0
    for name in ("validation", "test"):
        s = frame.splits[name]
        exact, ex_pos = _find(ex_u, row_keys(exact_num_keys(s.num), s.cat))
        near, nr_pos = _find(nr_u, row_keys(near_num_keys(frame.standardized(name), cfg.near_tolerance), s.cat))
        leaked = exact | near
        train_row = np.where(exact, ex_first[ex_pos] if len(ex_u) else 0, nr_first[nr_pos] if len(nr_u) else 0)
        same_label = leaked & (s.y == tr.y[train_row]) if len(tr) else leaked
        details[name] = {"rows": len(s), "exact_in_train": int(exact.sum()), "near_in_train": int((near & ~exact).sum()),
                         "leaked_rows": int(leaked.sum()), "leaked_with_same_label": int(same_label.sum()),
                         "share": round(_share(leaked.sum(), len(s)), 6)}
        value = max(value, _share(leaked.sum(), len(s)))
        examples += [{"split": name, "row": int(s.index[i]), "train_row": int(tr.index[train_row[i]]),
                      "exact": bool(exact[i])} for i in np.flatnonzero(leaked)[: cfg.max_examples]]
    counts = ", ".join(f"{k} {v['leaked_rows']}/{v['rows']}" for k, v in details.items())
    return CheckResult(value, f"rows whose features repeat a training row: {counts}", examples[: cfg.max_examples],
                       details)
