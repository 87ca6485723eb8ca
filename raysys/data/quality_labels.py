"""Label issues by confident learning (Northcutt, Jiang and Chuang, JAIR 2021), in numpy.

Out-of-fold predicted probabilities come from a small MLP trained on the other folds (standardized numeric
features, one-hot categories), so no row is scored by a model that saw its label. Then:

1. per class j, the threshold t_j is the mean probability of j over the rows labelled j;
2. the confident joint C[i][j] counts rows labelled i whose most probable class among those above their
   threshold is j; its rows are calibrated to the label counts;
3. per given label i, the sum of C[i][j != i] rows with the largest margin max_j P[j] - P[i] are flagged
   ("prune by noise rate"), and of those only rows off the confident joint's diagonal are kept ("both").

A flagged row's suspected label is its most probable other class.
"""

from __future__ import annotations

import numpy as np

from raysys.config.quality import QualityConfig
from raysys.data.quality_frame import CheckResult, QualityFrame

HIDDEN = 64
BATCH = 512
LR = 2e-2


def design_matrix(frame: QualityFrame, split: str) -> np.ndarray:
    """Standardized numeric values (null -> 0, plus a null indicator where a column has nulls) and one-hot
    categories (null -> all zero), float32."""
    z = np.nan_to_num(frame.standardized(split)).astype(np.float32)
    nulls = np.isnan(frame.splits[split].num)
    parts = [z, nulls[:, nulls.any(0)].astype(np.float32)]
    cat = frame.splits[split].cat
    for j, vocab in enumerate(frame.vocab):
        onehot = np.zeros((len(cat), len(vocab)), dtype=np.float32)
        ok = cat[:, j] >= 0
        onehot[np.flatnonzero(ok), cat[ok, j]] = 1.0
        parts.append(onehot)
    return np.concatenate(parts, 1)


def _fit_predict(x: np.ndarray, y: np.ndarray, x_out: np.ndarray, k: int, epochs: int, seed: int) -> np.ndarray:
    """Train a small MLP on (x, y) and return its softmax probabilities on x_out."""
    import torch
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: one thread is as fast, and it does not fight other work for cores
    try:
        return _train_mlp(torch, nn, x, y, x_out, k, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_mlp(torch, nn, x: np.ndarray, y: np.ndarray, x_out: np.ndarray, k: int, epochs: int,
               seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, k))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * -(-len(xt) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for s in range(0, len(xt), BATCH):
            b = perm[s:s + BATCH]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x_out)), 1).numpy().astype(np.float64)


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, k: int, *, num_folds: int, epochs: int,
                              seed: int) -> np.ndarray:
    """P[n, k]: each row's class probabilities from a model trained on the other folds (seeded folds)."""
    fold = np.random.default_rng(seed).permutation(len(y)) % num_folds
    probs = np.zeros((len(y), k))
    for f in range(num_folds):
        held = fold == f
        probs[held] = _fit_predict(x[~held], y[~held], x[held], k, epochs, seed + f)
    return probs


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning on out-of-fold probabilities: (flagged bool [n], suspected label int64 [n])."""
    n, k = probs.shape
    counts = np.bincount(labels, minlength=k)
    thresholds = np.array([probs[labels == j, j].mean() if counts[j] else 1.0 for j in range(k)])
    above = probs >= thresholds - 1e-9
    confident = above.any(1)
    guess = np.where(above, probs, -1.0).argmax(1)
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[confident], guess[confident]), 1)
    joint = joint / np.maximum(joint.sum(1, keepdims=True), 1) * counts[:, None]
    other = probs.copy()
    other[np.arange(n), labels] = -np.inf
    suspected = other.argmax(1)
    margin = other.max(1) - probs[np.arange(n), labels]
    flagged = np.zeros(n, dtype=bool)
    for i in range(k):
        n_off = int(round(joint[i].sum() - joint[i, i]))
        rows = np.flatnonzero(labels == i)
        if n_off and len(rows):
            flagged[rows[np.argsort(-margin[rows], kind="stable")[:n_off]]] = True
    flagged &= confident & (guess != labels)
    return flagged, suspected


def label_issues(frame: QualityFrame, cfg: QualityConfig) -> CheckResult:
    """Training rows likely mislabeled, with their given and suspected labels, most confident first."""
    tr, classes = frame.train, frame.schema.classes
    k = len(classes)
    present = np.bincount(tr.y, minlength=k) >= cfg.num_folds
    if len(tr) < 10 * cfg.num_folds or present.sum() < 2:
        return CheckResult(0.0, "skipped: too few training rows per class for out-of-fold probabilities",
                           details={"skipped": True})
    probs = out_of_fold_probabilities(design_matrix(frame, "train"), tr.y, k, num_folds=cfg.num_folds,
                                      epochs=cfg.label_model_epochs, seed=cfg.seed)
    flagged, suspected = find_label_issues(tr.y, probs)
    idx = np.flatnonzero(flagged)
    idx = idx[np.argsort(probs[idx, tr.y[idx]], kind="stable")]  # lowest self-confidence first
    examples = [{"split": "train", "row": int(tr.index[i]), "given": classes[tr.y[i]],
                 "suspected": classes[suspected[i]], "given_probability": round(float(probs[i, tr.y[i]]), 4),
                 "suspected_probability": round(float(probs[i, suspected[i]]), 4)} for i in idx[: cfg.max_examples]]
    oof_acc = float((probs.argmax(1) == tr.y).mean())
    share = float(flagged.mean())
    details = {"rows": len(tr), "flagged_rows": int(flagged.sum()), "share": round(share, 6),
               "out_of_fold_accuracy": round(oof_acc, 4), "num_folds": cfg.num_folds,
               "flagged_row_indices": [int(tr.index[i]) for i in idx]}
    return CheckResult(share, f"{int(flagged.sum())} of {len(tr)} training rows likely mislabeled "
                              f"(out-of-fold accuracy of the check's model {oof_acc:.3f})", examples, details)
