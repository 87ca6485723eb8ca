"""Column checks: class balance, constant and one-feature-predictive features, categories met only outside
train, numeric outliers and missing values. Each is a pass over the columns, linear in the rows."""

from __future__ import annotations

import numpy as np

from raysys.config.quality import QualityConfig
from raysys.data.quality_frame import CheckResult, QualityFrame

# what raysys's training does about imbalance (train/steps.py: plain cross-entropy, shuffled batches)
CLASS_WEIGHTING = "none: teacher and students train with unweighted cross-entropy on uniformly shuffled rows"


def class_imbalance(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Per-class shares of every split; the value is the train split's largest over smallest class share."""
    classes = frame.schema.classes
    details: dict = {"class_weighting": CLASS_WEIGHTING, "shares": {}}
    for name, s in frame.splits.items():
        counts = np.bincount(s.y, minlength=len(classes))
        details["shares"][name] = {c: round(float(n / max(len(s), 1)), 6) for c, n in zip(classes, counts)}
    counts = np.bincount(frame.train.y, minlength=len(classes))
    ratio = float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")
    details["train_counts"] = {c: int(n) for c, n in zip(classes, counts)}
    small = classes[int(counts.argmin())]
    examples = [{"class": c, "train_rows": int(n)} for c, n in zip(classes, counts) if n == 0 or n * 5 < counts.max()]
    return CheckResult(ratio, f"largest/smallest training class share {ratio:.3g} (smallest: {small!r}, "
                              f"{int(counts.min())} rows); class weighting: {CLASS_WEIGHTING}",
                       examples[: cfg.max_examples], details)


def _top_share(values: np.ndarray) -> tuple[float, object]:
    if len(values) == 0:
        return 1.0, None
    uniq, counts = np.unique(values, return_counts=True)
    k = int(counts.argmax())
    return float(counts[k] / len(values)), uniq[k]


def constant_features(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Share of each feature's non-null training values held by its most common value (1.0: constant)."""
    tr, shares = frame.train, []
    for j, f in enumerate(frame.schema.numeric):
        col = tr.num[:, j]
        share, top = _top_share(col[~np.isnan(col)])
        shares.append({"feature": f.name, "share": round(share, 6), "value": None if top is None else float(top)})
    for j, f in enumerate(frame.schema.categorical):
        col = tr.cat[:, j]
        share, top = _top_share(col[col >= 0])
        shares.append({"feature": f.name, "share": round(share, 6),
                       "value": None if top is None else frame.vocab[j][int(top)]})
    shares.sort(key=lambda d: -d["share"])
    worst = shares[0]
    return CheckResult(worst["share"], f"most nearly constant feature: {worst['feature']!r} ({worst['share']:.1%} of "
                                       f"training rows hold {worst['value']!r})",
                       shares[: cfg.max_examples], {"features": shares})


def _nearest_label_accuracy(train: np.ndarray, y: np.ndarray, val: np.ndarray, y_val: np.ndarray, k: int) -> float:
    """Accuracy on validation of 'the label of the training row with the nearest value of this feature'
    (a null predicts the majority label of the training nulls, else the overall majority)."""
    if len(y_val) == 0:
        return 0.0
    ok = ~np.isnan(train)
    order = np.argsort(train[ok], kind="stable")
    values, labels = train[ok][order], y[ok][order]
    majority = int(np.bincount(y[~ok] if (~ok).any() else y, minlength=k).argmax())
    pred = np.full(len(val), majority, dtype=np.int64)
    has = ~np.isnan(val)
    if len(values) and has.any():
        v = val[has]
        hi = np.clip(np.searchsorted(values, v), 0, len(values) - 1)
        lo = np.clip(hi - 1, 0, len(values) - 1)
        nearest = np.where(np.abs(values[lo] - v) <= np.abs(values[hi] - v), lo, hi)
        pred[has] = labels[nearest]
    return float((pred == y_val).mean())


def _rule_accuracy(train_codes: np.ndarray, y: np.ndarray, eval_codes: np.ndarray, y_eval: np.ndarray,
                   k: int) -> float:
    """Accuracy on eval of 'predict the training majority label of this code' (unseen code: overall majority)."""
    size = int(max(train_codes.max(initial=0), eval_codes.max(initial=0))) + 2
    table = np.zeros((size, k), dtype=np.int64)
    np.add.at(table, (train_codes + 1, y), 1)  # +1: the null code -1 gets a row
    majority = table.argmax(1)
    majority[table.sum(1) == 0] = int(np.bincount(y, minlength=k).argmax())
    return float((majority[eval_codes + 1] == y_eval).mean()) if len(y_eval) else 0.0


def predictive_features(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Skill of the best one-feature rule: the training majority label per category (the nearest training
    value's label for a numeric feature), scored on validation as (accuracy - majority rate) / (1 - majority
    rate). A feature that is the label in disguise scores near 1; the synthetic task's features below 0.3."""
    tr, va, k = frame.train, frame.splits["validation"], frame.schema.num_classes
    base = float((va.y == np.bincount(tr.y, minlength=k).argmax()).mean()) if len(va) else 0.0
    rows = []
    for j, f in enumerate(frame.schema.numeric):
        rows.append((f.name, _nearest_label_accuracy(tr.num[:, j], tr.y, va.num[:, j], va.y, k)))
    for j, f in enumerate(frame.schema.categorical):
        rows.append((f.name, _rule_accuracy(tr.cat[:, j], tr.y, va.cat[:, j], va.y, k)))
    out = sorted(({"feature": n, "validation_accuracy": round(a, 6),
                   "skill": round((a - base) / (1 - base), 6) if base < 1 else 0.0} for n, a in rows),
                 key=lambda d: -d["skill"])
    best = out[0]
    return CheckResult(best["skill"], f"best one-feature rule: {best['feature']!r}, validation accuracy "
                                      f"{best['validation_accuracy']:.3f} (majority class {base:.3f}), skill "
                                      f"{best['skill']:.3f}", out[: cfg.max_examples],
                       {"majority_accuracy": round(base, 6), "features": out})


def unseen_categories(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Validation/test rows holding a category that no training row holds (the model never learned it)."""
    details, examples, value = {}, [], 0.0
    seen = [np.unique(frame.train.cat[:, j]) for j in range(len(frame.schema.categorical))]
    for name in ("validation", "test"):
        s = frame.splits[name]
        unseen = np.zeros(s.cat.shape, dtype=bool)
        for j, codes in enumerate(seen):
            unseen[:, j] = (s.cat[:, j] >= 0) & ~np.isin(s.cat[:, j], codes)
        per_feature = {f.name: sorted({frame.vocab[j][c] for c in np.unique(s.cat[unseen[:, j], j])})
                       for j, f in enumerate(frame.schema.categorical) if unseen[:, j].any()}
        rows = unseen.any(1)
        details[name] = {"rows": len(s), "rows_with_unseen": int(rows.sum()), "categories": per_feature}
        value = max(value, float(rows.mean()) if len(s) else 0.0)
        for r, j in np.argwhere(unseen)[: cfg.max_examples]:
            examples.append({"split": name, "row": int(s.index[r]), "feature": frame.schema.categorical[j].name,
                             "value": frame.vocab[j][int(s.cat[r, j])]})
    counts = ", ".join(f"{k} {v['rows_with_unseen']}" for k, v in details.items())
    return CheckResult(value, f"rows with a category never seen in train: {counts}", examples[: cfg.max_examples],
                       details)


def _robust_scale(col: np.ndarray) -> tuple[float, float]:
    """Median and robust scale (1.4826 MAD; the IQR / 1.349 when the MAD is 0; 0 when both are)."""
    col = col[~np.isnan(col)]
    if len(col) == 0:
        return 0.0, 0.0
    med = float(np.median(col))
    mad = 1.4826 * float(np.median(np.abs(col - med)))
    if mad <= 1e-12:
        q1, q3 = np.quantile(col, [0.25, 0.75])
        mad = float(q3 - q1) / 1.349
    return med, mad if mad > 1e-12 else 0.0


def outliers(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Numeric values more than `outlier_z` robust standard deviations (train median/MAD) from the median."""
    details: dict = {}
    found = []
    value = 0.0
    for j, f in enumerate(frame.schema.numeric):
        med, scale = _robust_scale(frame.train.num[:, j])
        if scale == 0.0:
            continue
        for name, s in frame.splits.items():
            with np.errstate(invalid="ignore"):
                z = np.abs(s.num[:, j] - med) / scale
            out = np.nan_to_num(z) > cfg.outlier_z
            share = float(out.mean()) if len(s) else 0.0
            details.setdefault(f.name, {})[name] = {"rows": int(out.sum()), "share": round(share, 6)}
            value = max(value, share)
            found += [(float(z[i]), name, int(s.index[i]), f.name, float(s.num[i, j])) for i in np.flatnonzero(out)]
    found.sort(reverse=True)
    examples = [{"split": sp, "row": r, "feature": fn, "value": v, "robust_z": round(z, 2)}
                for z, sp, r, fn, v in found[: cfg.max_examples]]
    return CheckResult(value, f"{len(found)} numeric values beyond robust z {cfg.outlier_z:g} (largest share of a "
                              f"feature's rows {value:.2%})", examples, details)


def missing_values(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Null (or NaN) share of every feature per split; nulls are imputed by the Preprocessor."""
    details: dict = {}
    value = 0.0
    for name, s in frame.splits.items():
        miss = np.concatenate([np.isnan(s.num), s.cat < 0], 1)
        names = [f.name for f in frame.schema.numeric] + [f.name for f in frame.schema.categorical]
        for j, n in enumerate(names):
            if miss[:, j].any():
                details.setdefault(n, {})[name] = {"rows": int(miss[:, j].sum()), "share": round(float(miss[:, j].mean()), 6)}
                value = max(value, float(miss[:, j].mean()))
    examples = [{"feature": n, "split": sp, **v} for n, d in details.items() for sp, v in d.items()]
    worst = max(examples, key=lambda e: e["share"], default=None)
    msg = (f"features with nulls: {sorted(details)}; worst {worst['feature']!r} in {worst['split']} "
           f"({worst['share']:.1%})") if worst else "no nulls"
    return CheckResult(value, msg, examples[: cfg.max_examples], details)
