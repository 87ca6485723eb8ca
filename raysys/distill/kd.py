"""The knowledge-distillation loss (Hinton, Vinyals and Dean, 2015).

    loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)

where p^T = softmax(logits / T). The KL term is averaged over the batch ("batchmean", the true
per-sample KL; PyTorch's "mean" would also divide by the number of classes). It is multiplied by T^2
because the gradient of the softened KL with respect to the student logits scales as 1/T^2: without the
factor, raising T would silently shrink the soft loss's share of the gradient and alpha would stop
meaning what it says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# label of an unlabeled transfer row: it takes part in the soft term only (F.cross_entropy's default)
IGNORE_INDEX = -100


def check_kd_args(temperature: float, alpha: float) -> None:
    """ValueError naming the argument when T or alpha is out of range."""
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature: must be > 0 (got {temperature}); typical values are 1-8")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: the soft-loss weight must be in [0, 1] (got {alpha})")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float, *, return_components: bool = False):
    """The distillation loss of a batch.

    Args:
        student_logits: (batch, classes), carries the gradient.
        teacher_logits: (batch, classes); treated as constants (detached).
        labels: (batch,) int64 class indices for the hard cross-entropy term; `IGNORE_INDEX` (-100)
            marks an unlabeled row, which gets the soft term only (the hard term averages over the
            labeled rows, and is 0 when there are none).
        temperature: softmax temperature T > 0 of the soft term.
        alpha: weight of the soft term in [0, 1]; alpha=0 is plain cross-entropy, alpha=1 pure KD.
        return_components: also return the two terms for logging.

    Returns:
        The scalar loss, or `(loss, soft, hard)` when `return_components` is true, where
        `soft = T^2 * KL(teacher || student)` (before alpha) and `hard = CE(student, labels)` (before
        1 - alpha), so that `loss == alpha * soft + (1 - alpha) * hard`.
    """
    check_kd_args(temperature, alpha)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"teacher_logits: shape {tuple(teacher_logits.shape)} must equal the student's "
            f"{tuple(student_logits.shape)}, both (batch, classes)"
        )
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} must be ({student_logits.shape[0]},)")
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=-1)
    # kl_div(input, target) = KL(target || input): the teacher's distribution is the reference
    soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)
    if bool((labels == IGNORE_INDEX).all()):
        hard = student_logits.sum() * 0.0  # no labeled row: cross_entropy would return NaN
    else:
        hard = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX)
    loss = alpha * soft + (1.0 - alpha) * hard
    if return_components:
        return loss, soft, hard
    return loss


# ----- hint loss (FitNets, Romero et al. 2015) ------------------------------------------------------------


def supports_hint(model: torch.nn.Module) -> bool:
    """True for models with a `body` (features) and a linear `head` (TabularMLP and its kin): the hint
    loss matches the student's last hidden features to the teacher's, so both need that shape."""
    return isinstance(getattr(model, "body", None), torch.nn.Module) and isinstance(
        getattr(model, "head", None), torch.nn.Linear)


def hint_width(model: torch.nn.Module) -> int:
    """Width of the features the head reads (the hint layer)."""
    if not supports_hint(model):
        raise ValueError(f"hint_weight: {type(model).__name__} has no body/head to take hint features from")
    return int(model.head.in_features)


class HiddenCapture:
    """Context manager that records the output of `model.body` on every forward (a forward hook, so the
    model code stays untouched); `.value` holds the last batch's features."""

    def __init__(self, model: torch.nn.Module):
        if not supports_hint(model):
            raise ValueError(f"hint_weight: {type(model).__name__} has no body/head to take hint features from")
        self.model = model
        self.value: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> HiddenCapture:
        def hook(_module, _inputs, output):
            self.value = output

        self._handle = self.model.body.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def hint_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, regressor: torch.nn.Module
              ) -> torch.Tensor:
    """Mean squared error between the regressed student features and the teacher's (constants).

    `regressor` (a Linear from the student's to the teacher's width) is trained with the student and
    thrown away afterwards: it lets a narrow student match a wide teacher's feature space.
    """
    pred = regressor(student_hidden)
    if pred.shape != teacher_hidden.shape:
        raise ValueError(f"teacher_hidden: shape {tuple(teacher_hidden.shape)} differs from the regressed "
                         f"student features {tuple(pred.shape)}")
    return F.mse_loss(pred, teacher_hidden.detach().to(pred.dtype))
