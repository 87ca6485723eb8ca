"""The student training loop: plain single-process torch, no Ray.

`fit_student` is what each Ray Tune trial runs (raysys.distill.sweep wraps it in a plain function
trainable); keeping it free of Ray makes it a unit-testable function and lets the CLI run one student
without a cluster. The teacher's logits come precomputed (`StudentData.teacher_logits`), so a trial
never runs the teacher.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysys.config import DPConfig
from raysys.distill.kd import IGNORE_INDEX, HiddenCapture, check_kd_args, hint_loss, kd_loss, supports_hint
from raysys.distill.student_data import StudentData
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


@dataclass(frozen=True)
class _Settings:
    """`fit_student`'s config, checked."""

    spec: dict[str, Any]
    temperature: float
    alpha: float
    num_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    hint_weight: float
    dp: DPConfig | None = None  # DP-SGD (raysys.trust.dp): Poisson batches, per-row clipping, noise
    device: str = "cpu"  # where the student trains: "cuda" in a Tune trial given a GPU (distill.gpus_per_trial)


def _settings(config: dict[str, Any], data: StudentData) -> _Settings:
    if "student_spec" not in config:
        raise ValueError("config.student_spec: missing; pass raysys.models.model_spec(schema, cfg.distill.student)")
    temperature, alpha = float(config["temperature"]), float(config["alpha"])
    check_kd_args(temperature, alpha)
    num_epochs, batch_size, lr = int(config["num_epochs"]), int(config["batch_size"]), float(config["lr"])
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
    hint_weight = float(config.get("hint_weight", 0.0) or 0.0)
    if hint_weight < 0:
        raise ValueError(f"hint_weight: must be >= 0 (got {hint_weight})")
    dp = DPConfig.model_validate(config["dp"]) if config.get("dp") is not None else None
    if dp is not None and hint_weight > 0:
        raise ValueError("dp: the hint loss trains a regressor outside DP-SGD's per-row clipping; set hint_weight "
                         "to 0 or remove dp")
    if dp is not None and alpha > 0 and data.num_transfer:
        raise ValueError("dp: transfer rows are made from the training rows, so DP-SGD's guarantee would not cover "
                         "them; train without transfer rows or remove dp")
    device = str(config.get("device") or "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("distill.gpus_per_trial > 0, but this trial sees no CUDA device (torch "
                           f"{torch.__version__}); install a CUDA build of torch on the GPU nodes, or set "
                           "distill.gpus_per_trial: 0")
    return _Settings(spec, temperature, alpha, num_epochs, batch_size, lr, float(config.get("weight_decay", 1e-4)),
                     seed, hint_weight, dp, device)


def _hint_regressor(model: nn.Module, data: StudentData) -> nn.Linear:
    """Maps the student's hidden width onto the teacher's for the hint loss; trained, then discarded."""
    if data.teacher_hints is None:
        raise ValueError("hint_weight: > 0 needs the teacher's hidden features (StudentData.teacher_hints); "
                         "compute soft targets with hints=True or set hint_weight to 0")
    if not supports_hint(model):
        raise ValueError(f"hint_weight: the hint loss needs a same-family student with body/head, "
                         f"got {type(model).__name__}")
    return nn.Linear(model.head.in_features, data.teacher_hints.shape[1])


class _StudentRun:
    """One student's training state: model, optimizer, the shuffling streams and the data as tensors."""

    def __init__(self, s: _Settings, data: StudentData, teacher: nn.Module | None):
        self.s, self.data, self.teacher = s, data, teacher
        torch.manual_seed(s.seed)
        self.device = torch.device(s.device)
        self.model = build_model(s.spec).to(self.device)
        params = list(self.model.parameters())
        self.regressor = _hint_regressor(self.model, data) if s.hint_weight > 0 else None
        if self.regressor is not None:
            self.regressor = self.regressor.to(self.device)
            params += list(self.regressor.parameters())
        self.opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        self.runner = self.model  # what runs the batches: the model, under Opacus's hooks with DP-SGD
        self.dp_rate = min(s.batch_size, len(data.y)) / len(data.y)  # DP-SGD's Poisson sampling rate
        if s.dp is not None:
            from raysys.trust.dp import private_training

            self.runner, self.opt = private_training(self.model, self.opt, s.dp,
                                                     expected_batch_size=self.dp_rate * len(data.y))
        self.hints = _view(data.teacher_hints) if self.regressor is not None else None
        if teacher is not None:
            teacher.eval().to(self.device)
        self.rng = np.random.default_rng(s.seed)
        self.x_num, self.x_cat, self.y, self.t_logits = (
            _view(a) for a in (data.x_num, data.x_cat, data.y, data.teacher_logits))
        self.n = len(self.y)
        # transfer rows take part in a KD run only; their own stream keeps the labeled batches those of
        # the same run without transfer rows
        self.nt = data.num_transfer if s.alpha > 0 else 0
        self.t_rng = np.random.default_rng([s.seed, 1]) if self.nt else None
        if self.nt:
            self.tx_num, self.tx_cat, self.tt_logits = (
                _view(a) for a in (data.transfer_x_num, data.transfer_x_cat, data.transfer_logits))
            self.per_step = math.ceil(self.nt / math.ceil(self.n / s.batch_size))

    def restore(self, resume: dict[str, Any]) -> int:
        """Put back the state `resumable` returned; returns the epoch it was taken after."""
        done = int(resume["epoch"])
        if not 0 <= done <= self.s.num_epochs:
            raise ValueError(f"resume.epoch: {done} is outside this run's 0..{self.s.num_epochs} epochs (num_epochs)")
        now = None if self.s.dp is None else {**self.s.dp.model_dump(), "batch_size": self.s.batch_size}
        if resume.get("dp") != now:  # epsilon counts every step at the current settings: the saved ones must match
            raise ValueError(f"dp: cannot resume a trial trained with DP-SGD settings {resume.get('dp')} under "
                             f"{now}; epsilon would not cover its first epochs; resume with the same dp and batch_size")
        self.model.load_state_dict(resume["weights"])
        self.opt.load_state_dict(resume["optimizer"])
        self.rng.bit_generator.state = resume["rng"]
        if self.nt:
            self.t_rng.bit_generator.state = resume["transfer_rng"]
        if self.regressor is not None:
            self.regressor.load_state_dict(resume["regressor"])
        torch.set_rng_state(resume["torch_rng"])
        if self.device.type == "cuda" and resume.get("cuda_rng") is not None:  # dropout and DP noise draw there
            torch.cuda.set_rng_state(resume["cuda_rng"], self.device)
        return done

    def resumable(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "optimizer": self.opt.state_dict(), "rng": self.rng.bit_generator.state,
                "dp": None if self.s.dp is None else {**self.s.dp.model_dump(), "batch_size": self.s.batch_size},
                "transfer_rng": self.t_rng.bit_generator.state if self.nt else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "regressor": self.regressor.state_dict() if self.regressor is not None else None}

    def _batch(self, idx: torch.Tensor, tidx: torch.Tensor | None):
        """Features, labels and teacher logits of the labeled rows `idx` plus the transfer rows `tidx`."""
        xb_num, xb_cat, yb = self.x_num[idx], self.x_cat[idx], self.y[idx]
        t_batch = self.t_logits[idx] if self.teacher is None else None
        if tidx is not None:
            xb_num, xb_cat = torch.cat([xb_num, self.tx_num[tidx]]), torch.cat([xb_cat, self.tx_cat[tidx]])
            yb = torch.cat([yb, torch.full((len(tidx),), IGNORE_INDEX, dtype=yb.dtype)])
            if self.teacher is None:
                t_batch = torch.cat([t_batch, self.tt_logits[tidx]])
        # the rows stay in host memory (shared with the other trials); each batch goes to the trial's device
        xb_num, xb_cat, yb = (t.to(self.device) for t in (xb_num, xb_cat, yb))
        if self.teacher is not None:
            with torch.no_grad():
                t_batch = self.teacher(xb_num, xb_cat)
        return xb_num, xb_cat, yb, t_batch.to(self.device)

    def _step(self, idx: torch.Tensor, tidx: torch.Tensor | None) -> tuple[float, float, float]:
        """One optimizer step; returns the (total, soft, hard) loss."""
        s = self.s
        xb_num, xb_cat, yb, t_batch = self._batch(idx, tidx)
        if self.regressor is not None:
            with HiddenCapture(self.model) as cap:
                logits = self.runner(xb_num, xb_cat)
            loss, soft, hard = kd_loss(logits, t_batch, yb, s.temperature, s.alpha, return_components=True)
            # hints exist for the labeled rows only
            loss = loss + s.hint_weight * hint_loss(cap.value[:len(idx)], self.hints[idx].to(self.device),
                                                    self.regressor)
        else:
            logits = self.runner(xb_num, xb_cat)
            loss, soft, hard = kd_loss(logits, t_batch, yb, s.temperature, s.alpha, return_components=True)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item(), soft.item(), hard.item()

    def _batches(self):
        """(labeled rows, transfer rows or None) of each step of an epoch: a shuffled pass, or DP-SGD's Poisson
        batches (each row with probability dp_rate, round(n / batch) steps: one pass expected)."""
        n, bs = self.n, self.s.batch_size
        if self.s.dp is not None:
            from raysys.trust.dp import poisson_rows, steps_per_epoch

            for _ in range(steps_per_epoch(n, bs)):
                yield torch.from_numpy(poisson_rows(n, self.dp_rate, self.rng)), None
            return
        perm = torch.from_numpy(self.rng.permutation(n))
        t_perm = torch.from_numpy(self.t_rng.permutation(self.nt)) if self.nt else None
        for step, i in enumerate(range(0, n, bs)):
            yield perm[i:i + bs], t_perm[step * self.per_step:(step + 1) * self.per_step] if self.nt else None

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the labeled rows (and the transfer rows), then validation; the epoch's metrics."""
        self.model.train()
        tot = soft_tot = hard_tot = 0.0
        seen = steps = 0
        for idx, tidx in self._batches():
            steps += 1
            loss, soft, hard = self._step(idx, tidx)
            if len(idx):  # an empty DP-SGD batch (a noise-only step) has a nan mean loss
                tot, soft_tot, hard_tot = tot + loss * len(idx), soft_tot + soft * len(idx), hard_tot + hard * len(idx)
                seen += len(idx)
        val_acc, val_loss = _validate(self.model, self.data)
        seen = max(seen, 1)
        metrics = {"epoch": epoch, "train_loss": tot / seen, "train_soft": soft_tot / seen,
                   "train_hard": hard_tot / seen, "val_loss": val_loss, "val_accuracy": val_acc}
        if self.s.dp is not None:
            from raysys.trust.dp import dp_accounting

            metrics["dp"] = dp_accounting(self.s.dp, sample_rate=self.dp_rate, steps=epoch * steps, epochs=epoch)
        if not math.isfinite(metrics["train_loss"]):
            raise FloatingPointError(f"student loss diverged at epoch {epoch} ({metrics['train_loss']}); lower lr")
        return metrics


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
    run = _StudentRun(_settings(config, data), data, teacher)
    start = 1 if resume is None else run.restore(resume) + 1
    history: list[dict[str, Any]] = []
    for epoch in range(start, run.s.num_epochs + 1):
        metrics = run.train_epoch(epoch)
        history.append(metrics)
        if report is not None:
            report(dict(metrics), EpochState(epoch, _cpu_copy(run.model), functools.partial(run.resumable, epoch)))
    return StudentFit(state_dict=_cpu_copy(run.model), metrics=history[-1] if history else {}, history=history)
