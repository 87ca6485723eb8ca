"""What a student trains on: `StudentData` (features, labels, the teacher's logits), read from the soft
targets stored beside the data (`load_student_data`), or computed in-process (`precompute_teacher_logits`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from raysys.config import PipelineConfig
from raysys.data import DatasetSchema, Preprocessor, read_split
from raysys.distill.soft_targets import (
    SoftTargets,
    compute_soft_targets,
    compute_transfer_targets,
    read_soft_targets,
    read_transfer_targets,
)
from raysys.models import predict_logits


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


def precompute_teacher_logits(teacher_model: nn.Module, x_num, x_cat, *, batch_size: int = 8192) -> np.ndarray:
    """The teacher's logits, float32 (n, classes), computed in eval mode in batches, in this process.

    The model's train/eval mode is restored afterwards so a caller that keeps training is unaffected.
    (The sweep stores them once instead: `raysys.distill.soft_targets.compute_soft_targets`.)
    """
    was_training = teacher_model.training
    try:
        logits = predict_logits(teacher_model, x_num, x_cat, batch_size=batch_size)
    finally:
        teacher_model.train(was_training)
    return logits.detach().cpu().numpy().astype(np.float32, copy=False)


def load_student_data(cfg: PipelineConfig, preprocessor: Preprocessor, teacher_model: nn.Module, *,
                      hints: bool = False) -> tuple[StudentData, np.ndarray, SoftTargets]:
    """Train/validation arrays with the teacher's soft targets, computed once (Ray Data, or in this process for a
    small set: `raysys.distill.teacher_scoring`) and stored as Parquet beside the data (reused when the same
    teacher's targets are already there).

    Returns `(data, teacher_val_logits, soft_targets)`; the validation logits only serve to report the
    teacher's own accuracy (the selection rule compares against it). With `distill.transfer_multiplier`
    > 0 the data also carries that many unlabeled MUNGE rows per training row with the teacher's logits
    (scored the same way, stored beside the soft targets; `soft_targets.meta["transfer"]` says where).
    """
    targets = compute_soft_targets(cfg.data.root, preprocessor.schema, preprocessor, teacher_model,
                                   num_actors=cfg.distill.soft_target_actors, hints=hints,
                                   gpus=cfg.distill.gpus_per_trial)
    x_num, x_cat, y, t_logits, t_hints = read_soft_targets(targets, "train", preprocessor)
    vx_num, vx_cat, vy, t_val, _ = read_soft_targets(targets, "validation", preprocessor)
    transfer: dict[str, Any] = {}
    dc = cfg.distill
    if dc.transfer_multiplier > 0:
        num_rows = max(1, round(dc.transfer_multiplier * len(y)))
        path, seconds, reused = compute_transfer_targets(cfg.data.root, preprocessor.schema, preprocessor,
                                                         teacher_model, num_rows, seed=dc.seed,
                                                         num_actors=dc.soft_target_actors, gpus=dc.gpus_per_trial)
        tx_num, tx_cat, tx_logits = read_transfer_targets(path, preprocessor)
        transfer = dict(transfer_x_num=tx_num, transfer_x_cat=tx_cat, transfer_logits=tx_logits)
        targets.meta = {**targets.meta, "transfer": {"method": "munge", "num_rows": num_rows, "path": path,
                                                     "compute_seconds": round(seconds, 3), "reused": reused}}
    data = StudentData(x_num=x_num, x_cat=x_cat, y=y, teacher_logits=t_logits, val_x_num=vx_num,
                       val_x_cat=vx_cat, val_y=vy, teacher_hints=t_hints, **transfer)
    return data, t_val, targets


def split_raw_columns(cfg: PipelineConfig, schema: DatasetSchema, split: str) -> dict[str, np.ndarray]:
    """Raw feature columns of a split by name (slice metrics need the values before preprocessing)."""
    table = read_split(cfg.data.root, split, [f.name for f in schema.features])
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
