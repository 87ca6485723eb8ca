"""Accuracy under input perturbations: FGSM and PGD on the numeric features, random category flips.

The numeric inputs a model sees are standardized (`Preprocessor`: (x - mean) / std), so an L-inf budget
`epsilon` here is in standard deviations of each feature. Only the first `num_perturbed` numeric columns move
(the features; the is-missing indicators after them stay as they are).

- FGSM (Goodfellow et al., 2015): x + epsilon * sign(grad_x loss), one step.
- PGD (Madry et al., 2018): a uniform random start in the epsilon ball, then `steps` steps of
  `2.5 * epsilon / steps` along sign(grad), each projected back onto the ball (their step rule).
- Category flips: each categorical value is replaced, with probability `rate`, by another category of the same
  feature drawn uniformly (a typo / mis-entry model of noise, not an attack).

The gradient is taken through the model's own numeric input path (`model(x_num, x_cat)`, torch autograd on
`x_num`), so any model family works; a model without gradients (dynamic int8) is attacked through its float
twin (`attack_model`): a transfer attack, said on the card.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BATCH = 4096


def _grad_sign(model: nn.Module, xn: torch.Tensor, xc: torch.Tensor, y: torch.Tensor, cols: int) -> torch.Tensor:
    x = xn.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x, xc), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    s = torch.zeros_like(xn)
    s[:, :cols] = g[:, :cols].sign()
    return s


def fgsm(model: nn.Module, x_num: torch.Tensor, x_cat: torch.Tensor, y: torch.Tensor, epsilon: float,
         num_perturbed: int | None = None) -> torch.Tensor:
    """The FGSM inputs for one batch (float32 like `x_num`)."""
    cols = x_num.shape[1] if num_perturbed is None else num_perturbed
    return (x_num + epsilon * _grad_sign(model, x_num, x_cat, y, cols)).detach()


def pgd(model: nn.Module, x_num: torch.Tensor, x_cat: torch.Tensor, y: torch.Tensor, epsilon: float, *,
        steps: int = 10, num_perturbed: int | None = None, generator: torch.Generator | None = None
        ) -> torch.Tensor:
    """The PGD (L-inf, random start) inputs for one batch."""
    cols = x_num.shape[1] if num_perturbed is None else num_perturbed
    mask = torch.zeros_like(x_num)
    mask[:, :cols] = 1.0
    start = (torch.rand(x_num.shape, generator=generator) * 2 - 1) * epsilon * mask
    x = x_num + start
    alpha = 2.5 * epsilon / steps
    for _ in range(steps):
        x = x + alpha * _grad_sign(model, x, x_cat, y, cols)
        x = x_num + (x - x_num).clamp(-epsilon, epsilon)
    return x.detach()


def flip_categories(x_cat: np.ndarray, cardinalities: list[int], rate: float,
                    rng: np.random.Generator) -> np.ndarray:
    """`x_cat` with each value replaced, with probability `rate`, by a different category of its feature."""
    out = np.array(x_cat, dtype=np.int64, copy=True)
    for j, card in enumerate(cardinalities):
        if card < 2:
            continue
        hit = rng.random(len(out)) < rate
        # a shift of 1..card-1 modulo card is uniform over the other categories
        shift = rng.integers(1, card, size=int(hit.sum()))
        out[hit, j] = (out[hit, j] + shift) % card
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, xn: torch.Tensor, xc: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for i in range(0, len(y), BATCH):
        correct += int((model(xn[i:i + BATCH], xc[i:i + BATCH]).argmax(1) == y[i:i + BATCH]).sum())
    return correct / len(y)


def _attacked(attack, model: nn.Module, xn: torch.Tensor, xc: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    return torch.cat([attack(model, xn[i:i + BATCH], xc[i:i + BATCH], y[i:i + BATCH], **kw)
                      for i in range(0, len(y), BATCH)])


def _at(curve: list[dict[str, float]], key: str, value: float) -> dict[str, float]:
    return min(curve, key=lambda p: abs(p[key] - value))


def robustness_report(model: nn.Module, x_num, x_cat, y, *, epsilons: list[float], epsilon: float,
                      flip_rates: list[float], flip_rate: float, cardinalities: list[int],
                      num_perturbed: int | None = None, pgd_steps: int = 10, seed: int = 0,
                      attack_model: nn.Module | None = None) -> dict[str, Any]:
    """Clean accuracy, the FGSM / PGD accuracy curve over `epsilons`, the category-flip curve over
    `flip_rates`, and the drops (clean - perturbed) at the stated `epsilon` (PGD) and `flip_rate`.

    `attack_model` (default `model`) is the model whose gradients make the perturbations."""
    model.eval()
    src = (attack_model or model).eval()
    xn = torch.as_tensor(np.asarray(x_num), dtype=torch.float32)
    xc = torch.as_tensor(np.asarray(x_cat), dtype=torch.int64)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    if len(yt) == 0:
        raise ValueError("robustness_report: no rows")
    gen = torch.Generator().manual_seed(seed)
    clean = _accuracy(model, xn, xc, yt)
    eps_all = sorted(set(epsilons) | {epsilon})
    curve = []
    for eps in eps_all:
        a_fgsm = _attacked(fgsm, src, xn, xc, yt, epsilon=eps, num_perturbed=num_perturbed)
        a_pgd = _attacked(pgd, src, xn, xc, yt, epsilon=eps, steps=pgd_steps, num_perturbed=num_perturbed,
                          generator=gen)
        curve.append({"epsilon": eps, "fgsm_accuracy": _accuracy(model, a_fgsm, xc, yt),
                      "pgd_accuracy": _accuracy(model, a_pgd, xc, yt)})
    rng = np.random.default_rng(seed)
    flips = []
    for rate in sorted(set(flip_rates) | {flip_rate}):
        xf = torch.as_tensor(flip_categories(xc.numpy(), cardinalities, rate, rng))
        flips.append({"rate": rate, "accuracy": _accuracy(model, xn, xf, yt)})
    at_eps, at_flip = _at(curve, "epsilon", epsilon), _at(flips, "rate", flip_rate)
    return {"num_rows": len(yt), "clean_accuracy": clean, "curve": curve, "category_flips": flips,
            "epsilon": epsilon, "pgd_steps": pgd_steps, "flip_rate": flip_rate,
            "accuracy_at_epsilon": at_eps["pgd_accuracy"], "fgsm_accuracy_at_epsilon": at_eps["fgsm_accuracy"],
            "drop_at_epsilon": clean - at_eps["pgd_accuracy"],
            "accuracy_at_flip_rate": at_flip["accuracy"], "flip_drop": clean - at_flip["accuracy"],
            "transfer": attack_model is not None}
