"""The student training loop: plain single-process torch, no Ray.

`fit_student` is what each Ray Tune trial runs (raysys.distill.sweep wraps it in a plain function
trainable); keeping it free of Ray makes it a unit-testable function and lets the CLI run one student
without a cluster. The teacher's logits come precomputed (`StudentData.teacher_logits`), so a trial
never runs the teacher.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.distill.kd import IGNORE_INDEX, HiddenCapture, check_kd_args, hint_loss, kd_loss, supports_hint
from raysys.models import build_model, predict_logits


@dataclass
class EpochState:
    """What `fit_student`'s `report` gets after each epoch beside the metrics.

    `weights`: a copy of the student's state dict (the caller may keep it). `resumable()`: everything
    `fit_student(resume=...)` needs, with the weights, to go on after `epoch` exactly as the uninterrupted run
    does (optimizer state, RNG states, the hint regressor); call it during `report`, as training changes that
    state once `report` returns.
    """

    epoch: int
    weights: dict[str, torch.Tensor]
    resumable: Callable[[], dict[str, Any]]


# one epoch's metrics and its EpochState
ReportFn = Callable[[dict[str, Any], EpochState], None]


@dataclass
class StudentData:
    """The arrays a student trains on: preprocessed features, labels and the teacher's logits.

    x_num float32 (n, num_numeric) standardised; x_cat int64 (n, num_categorical) category indices;
    y int64 (n,); teacher_logits float32 (n, num_classes), on the training rows only;
    teacher_hints float32 (n, teacher hidden width) or None: the teacher's last hidden features, only
    needed for the hint loss.
    transfer_x_num / transfer_x_cat / transfer_logits: optional UNLABELED transfer rows (m, ...) with the
    teacher's logits and no labels (Bucila et al. 2006, "Model compression": the teacher labels extra
    inputs for free). They only feed the soft term of a KD run (alpha > 0); all three or none.
    """

    x_num: np.ndarray
    x_cat: np.ndarray
    y: np.ndarray
    teacher_logits: np.ndarray
    val_x_num: np.ndarray
    val_x_cat: np.ndarray
    val_y: np.ndarray
    teacher_hints: np.ndarray | None = None
    transfer_x_num: np.ndarray | None = None
    transfer_x_cat: np.ndarray | None = None
    transfer_logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.x_num = np.ascontiguousarray(self.x_num, dtype=np.float32)
        self.x_cat = np.ascontiguousarray(self.x_cat, dtype=np.int64)
        self.y = np.ascontiguousarray(self.y, dtype=np.int64)
        self.teacher_logits = np.ascontiguousarray(self.teacher_logits, dtype=np.float32)
        self.val_x_num = np.ascontiguousarray(self.val_x_num, dtype=np.float32)
        self.val_x_cat = np.ascontiguousarray(self.val_x_cat, dtype=np.int64)
        self.val_y = np.ascontiguousarray(self.val_y, dtype=np.int64)
        if self.teacher_hints is not None:
            self.teacher_hints = np.ascontiguousarray(self.teacher_hints, dtype=np.float32)
            if self.teacher_hints.ndim != 2 or len(self.teacher_hints) != len(self.y):
                raise ValueError(f"StudentData.teacher_hints: expected a 2-D array with {len(self.y)} rows, "
                                 f"got shape {self.teacher_hints.shape}")
        n, nv = len(self.y), len(self.val_y)
        for name, arr, want in [("x_num", self.x_num, n), ("x_cat", self.x_cat, n),
                                ("teacher_logits", self.teacher_logits, n),
                                ("val_x_num", self.val_x_num, nv), ("val_x_cat", self.val_x_cat, nv)]:
            if arr.ndim != 2 or len(arr) != want:
                raise ValueError(f"StudentData.{name}: expected a 2-D array with {want} rows, got shape {arr.shape}")
        if self.y.ndim != 1 or self.val_y.ndim != 1:
            raise ValueError("StudentData.y / val_y: labels must be 1-D int arrays")
        if n == 0 or nv == 0:
            raise ValueError("StudentData: the training and validation splits must be non-empty")
        transfer = (self.transfer_x_num, self.transfer_x_cat, self.transfer_logits)
        if any(a is not None for a in transfer):
            if any(a is None for a in transfer):
                raise ValueError("StudentData.transfer_*: give transfer_x_num, transfer_x_cat and transfer_logits "
                                 "together (or none)")
            self.transfer_x_num = np.ascontiguousarray(self.transfer_x_num, dtype=np.float32)
            self.transfer_x_cat = np.ascontiguousarray(self.transfer_x_cat, dtype=np.int64)
            self.transfer_logits = np.ascontiguousarray(self.transfer_logits, dtype=np.float32)
            m = len(self.transfer_logits)
            for name, arr, like in [("transfer_x_num", self.transfer_x_num, self.x_num),
                                    ("transfer_x_cat", self.transfer_x_cat, self.x_cat),
                                    ("transfer_logits", self.transfer_logits, self.teacher_logits)]:
                if arr.ndim != 2 or len(arr) != m or arr.shape[1] != like.shape[1]:
                    raise ValueError(f"StudentData.{name}: expected shape ({m}, {like.shape[1]}), got {arr.shape}")

    @property
    def num_transfer(self) -> int:
        """Unlabeled transfer rows (0 when there are none)."""
        return 0 if self.transfer_logits is None else len(self.transfer_logits)

    @property
    def num_classes(self) -> int:
        return int(self.teacher_logits.shape[1])


@dataclass
class StudentFit:
    """What `fit_student` returns: the final weights, the final epoch's metrics and every epoch's."""

    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def _view(a: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor over training data that may be read-only (Tune trials get the shared arrays from
    Ray's object store as read-only views). Training only gathers batches from it (indexing makes new
    tensors) and never writes it, so torch's "NumPy array is not writable" warning (once per process, in
    every trial's log) does not apply: silenced. Torch warns once per process, so the first call here also
    keeps the later conversions of the same arrays (predict_logits on the validation rows) quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(a)


@torch.no_grad()
def _validate(model: torch.nn.Module, data: StudentData) -> tuple[float, float]:
    logits = predict_logits(model, data.val_x_num, data.val_x_cat)
    y = _view(data.val_y)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).double().mean().item()
    return acc, loss


def fit_student(config: dict[str, Any], data: StudentData, report: ReportFn | None = None, *,
                teacher: nn.Module | None = None, resume: dict[str, Any] | None = None) -> StudentFit:
    """Train a student with the KD loss and validate it after every epoch.

    `config` keys: `student_spec` (a `raysys.models.model_spec` dict, required), `temperature`,
    `alpha`, `num_epochs`, `batch_size`, `lr`, and optionally `weight_decay` (1e-4), `seed` (0) and
    `hint_weight` (0: off; > 0 adds `hint_weight * hint_loss` on the last hidden features, which needs
    `data.teacher_hints` and a body/head student).
    Unlabeled transfer rows (`data.transfer_*`) join a KD run (alpha > 0): every step appends the next
    slice of them to the labeled batch, so one epoch is one pass over both; they get the soft term only
    (label `IGNORE_INDEX`). The labeled batches, their order and the number of steps are exactly those of
    the same config without transfer rows (a separate random stream shuffles the transfer rows), so a
    no-KD baseline (alpha = 0, which ignores them) takes the same steps on the same labeled data.
    `teacher`: run this model on every batch instead of reading `data.teacher_logits` (online KD; only
    for measuring what precomputed soft targets save).
    After each epoch `report(metrics, state)` is called with metrics `epoch` (1-based), `train_loss`,
    `train_soft`, `train_hard`, `val_loss` (cross-entropy on the true labels) and `val_accuracy`, and an
    `EpochState`.
    `resume`: `EpochState.resumable()` of an earlier run of the same config and data plus `weights`: training
    goes on from the epoch after it, with the same batches, steps and result as the uninterrupted run.
    Threads are left as the caller set them (Tune trials set one thread).
    """
    if "student_spec" not in config:
        raise ValueError("config.student_spec: missing; pass raysys.models.model_spec(schema, cfg.distill.student)")
    temperature = float(config["temperature"])
    alpha = float(config["alpha"])
    check_kd_args(temperature, alpha)
    num_epochs = int(config["num_epochs"])
    batch_size = int(config["batch_size"])
    lr = float(config["lr"])
    if num_epochs < 1:
        raise ValueError(f"num_epochs: must be >= 1 (got {num_epochs})")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1 (got {batch_size})")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0 (got {lr})")
    seed = int(config.get("seed", 0))
    spec = config["student_spec"]
    if int(spec["num_classes"]) != data.num_classes:
        raise ValueError(f"student_spec.num_classes ({spec['num_classes']}) != the teacher's "
                         f"logit width ({data.num_classes})")

    hint_w = float(config.get("hint_weight", 0.0) or 0.0)
    if hint_w < 0:
        raise ValueError(f"hint_weight: must be >= 0 (got {hint_w})")

    torch.manual_seed(seed)
    model = build_model(spec)
    params = list(model.parameters())
    regressor = None
    if hint_w > 0:
        if data.teacher_hints is None:
            raise ValueError("hint_weight: > 0 needs the teacher's hidden features (StudentData.teacher_hints); "
                             "compute soft targets with hints=True or set hint_weight to 0")
        if not supports_hint(model):
            raise ValueError(f"hint_weight: the hint loss needs a same-family student with body/head, "
                             f"got {type(model).__name__}")
        # the regressor maps the student's hidden width onto the teacher's; trained, then discarded
        regressor = nn.Linear(model.head.in_features, data.teacher_hints.shape[1])
        params += list(regressor.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(config.get("weight_decay", 1e-4)))
    hints = _view(data.teacher_hints) if regressor is not None else None
    if teacher is not None:
        teacher.eval()
    rng = np.random.default_rng(seed)
    x_num, x_cat, y, t_logits = (_view(a) for a in (data.x_num, data.x_cat, data.y, data.teacher_logits))
    n = len(y)
    steps = math.ceil(n / batch_size)
    nt = data.num_transfer if alpha > 0 else 0
    if nt:
        t_rng = np.random.default_rng([seed, 1])  # its own stream: the labeled batches stay those of no transfer
        tx_num, tx_cat, tt_logits = (_view(a) for a in (data.transfer_x_num, data.transfer_x_cat, data.transfer_logits))
        per_step = math.ceil(nt / steps)

    start = 1
    if resume is not None:
        done = int(resume["epoch"])
        if not 0 <= done <= num_epochs:
            raise ValueError(f"resume.epoch: {done} is outside this run's 0..{num_epochs} epochs (num_epochs)")
        model.load_state_dict(resume["weights"])
        opt.load_state_dict(resume["optimizer"])
        rng.bit_generator.state = resume["rng"]
        if nt:
            t_rng.bit_generator.state = resume["transfer_rng"]
        if regressor is not None:
            regressor.load_state_dict(resume["regressor"])
        torch.set_rng_state(resume["torch_rng"])
        start = done + 1

    def resumable() -> dict[str, Any]:
        return {"epoch": epoch, "optimizer": opt.state_dict(), "rng": rng.bit_generator.state,
                "transfer_rng": t_rng.bit_generator.state if nt else None, "torch_rng": torch.get_rng_state(),
                "regressor": regressor.state_dict() if regressor is not None else None}

    history: list[dict[str, Any]] = []
    for epoch in range(start, num_epochs + 1):
        model.train()
        perm = torch.from_numpy(rng.permutation(n))
        t_perm = torch.from_numpy(t_rng.permutation(nt)) if nt else None
        tot = soft_tot = hard_tot = 0.0
        for step, i in enumerate(range(0, n, batch_size)):
            idx = perm[i:i + batch_size]
            m = len(idx)
            xb_num, xb_cat, yb = x_num[idx], x_cat[idx], y[idx]
            if teacher is None:
                t_batch = t_logits[idx]
            if nt:
                tidx = t_perm[step * per_step:(step + 1) * per_step]
                xb_num, xb_cat = torch.cat([xb_num, tx_num[tidx]]), torch.cat([xb_cat, tx_cat[tidx]])
                yb = torch.cat([yb, torch.full((len(tidx),), IGNORE_INDEX, dtype=yb.dtype)])
                if teacher is None:
                    t_batch = torch.cat([t_batch, tt_logits[tidx]])
            if teacher is not None:
                with torch.no_grad():
                    t_batch = teacher(xb_num, xb_cat)
            if regressor is not None:
                with HiddenCapture(model) as cap:
                    logits = model(xb_num, xb_cat)
                loss, soft, hard = kd_loss(logits, t_batch, yb, temperature, alpha, return_components=True)
                loss = loss + hint_w * hint_loss(cap.value[:m], hints[idx], regressor)  # hints: labeled rows
            else:
                logits = model(xb_num, xb_cat)
                loss, soft, hard = kd_loss(logits, t_batch, yb, temperature, alpha, return_components=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * m
            soft_tot += soft.item() * m
            hard_tot += hard.item() * m
        val_acc, val_loss = _validate(model, data)
        metrics = {"epoch": epoch, "train_loss": tot / n, "train_soft": soft_tot / n, "train_hard": hard_tot / n,
                   "val_loss": val_loss, "val_accuracy": val_acc}
        if not math.isfinite(metrics["train_loss"]):
            raise FloatingPointError(f"student loss diverged at epoch {epoch} ({metrics['train_loss']}); lower lr")
        history.append(metrics)
        if report is not None:
            report(dict(metrics), EpochState(epoch, _cpu_copy(model), resumable))
    return StudentFit(state_dict=_cpu_copy(model), metrics=history[-1] if history else {}, history=history)
