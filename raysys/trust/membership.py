"""Membership inference: can an attacker tell a training row from a held-out row by the model's loss on it?

- Loss-threshold attack (Yeom et al., CSF 2018): score = -loss(row); a row is guessed a member when its loss
  is below a threshold. Its AUC over all thresholds (members = training rows, non-members = held-out rows of
  the same distribution, equal counts) measures the leak: 0.5 is none, 1.0 is total.
- Reference-model attack (the offline, one-reference variant of Carlini et al.'s LiRA, S&P 2022; Watson et
  al., ICLR 2022 "difficulty calibration"): score = loss_reference(row) - loss_target(row), where the reference
  model was trained on other rows of the distribution; a row that is easy for every model no longer looks like
  a member. Costs one more training run, so raysys runs it where a reference model exists (the benchmark).

The advantage is max over thresholds of TPR - FPR (the attack's best accuracy gain over guessing). Pure numpy
on per-row losses; `per_row_loss` computes them with torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def per_row_loss(model: nn.Module, x_num, x_cat, y, batch_size: int = 8192) -> np.ndarray:
    """Cross-entropy of each row (nats), float64."""
    model.eval()
    xn = torch.as_tensor(np.asarray(x_num), dtype=torch.float32)
    xc = torch.as_tensor(np.asarray(x_cat), dtype=torch.int64)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    out = [F.cross_entropy(model(xn[i:i + batch_size], xc[i:i + batch_size]).float(), yt[i:i + batch_size],
                           reduction="none") for i in range(0, len(yt), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties averaged."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def binary_auc(scores_pos, scores_neg) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney U)."""
    pos, neg = np.asarray(scores_pos, dtype=np.float64), np.asarray(scores_neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("binary_auc: needs at least one positive and one negative score")
    r = _ranks(np.concatenate([pos, neg]))
    return float((r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def advantage(scores_pos, scores_neg) -> float:
    """max over thresholds t of P(pos >= t) - P(neg >= t)."""
    pos, neg = np.sort(np.asarray(scores_pos, dtype=np.float64)), np.sort(np.asarray(scores_neg, dtype=np.float64))
    t = np.unique(np.concatenate([pos, neg]))
    tpr = 1 - np.searchsorted(pos, t, side="left") / len(pos)
    fpr = 1 - np.searchsorted(neg, t, side="left") / len(neg)
    return float(max(0.0, (tpr - fpr).max()))


def loss_threshold_attack(member_loss, nonmember_loss) -> dict[str, Any]:
    """AUC and advantage of guessing membership by low loss, with the mean losses of both groups."""
    m, n = np.asarray(member_loss, dtype=np.float64), np.asarray(nonmember_loss, dtype=np.float64)
    return {"auc": binary_auc(-m, -n), "advantage": advantage(-m, -n), "num_members": len(m),
            "num_nonmembers": len(n), "member_mean_loss": float(m.mean()), "nonmember_mean_loss": float(n.mean())}


def reference_attack(member_loss, nonmember_loss, ref_member_loss, ref_nonmember_loss) -> dict[str, Any]:
    """AUC and advantage of the difficulty-calibrated score loss_reference - loss_target."""
    sm = np.asarray(ref_member_loss, dtype=np.float64) - np.asarray(member_loss, dtype=np.float64)
    sn = np.asarray(ref_nonmember_loss, dtype=np.float64) - np.asarray(nonmember_loss, dtype=np.float64)
    return {"auc": binary_auc(sm, sn), "advantage": advantage(sm, sn)}


def membership_report(model: nn.Module, members: tuple, nonmembers: tuple,
                      reference: nn.Module | None = None) -> dict[str, Any]:
    """The loss-threshold attack (and the reference-model attack when `reference` is given) on (x_num, x_cat, y)
    member and non-member rows."""
    ml, nl = per_row_loss(model, *members), per_row_loss(model, *nonmembers)
    out = {"loss_threshold": loss_threshold_attack(ml, nl)}
    if reference is not None:
        out["reference_model"] = reference_attack(ml, nl, per_row_loss(reference, *members),
                                                  per_row_loss(reference, *nonmembers))
    out["auc"] = max(out["loss_threshold"]["auc"], (out.get("reference_model") or {}).get("auc", 0.0))
    return out
