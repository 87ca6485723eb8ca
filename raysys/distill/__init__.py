"""Knowledge distillation: the KD and hint losses, the student loop, soft targets with Ray Data, the Ray Tune
sweep (grid, or ASHA + Optuna over the size/accuracy trade-off)."""

from raysys.distill.kd import check_kd_args, hint_loss, kd_loss, supports_hint
from raysys.distill.soft_targets import SoftTargets, compute_soft_targets, read_soft_targets, teacher_key
from raysys.distill.student import EpochState, StudentFit, fit_student
from raysys.distill.student_data import (
    StudentData,
    load_student_data,
    precompute_teacher_logits,
    split_raw_columns,
)
from raysys.distill.sweep import SweepResult, pareto_front, run_sweep, select_student, summary_table

__all__ = [
    "EpochState", "SoftTargets", "StudentData", "StudentFit", "SweepResult", "check_kd_args",
    "compute_soft_targets", "fit_student", "hint_loss", "kd_loss", "load_student_data", "pareto_front",
    "precompute_teacher_logits", "read_soft_targets", "run_sweep", "select_student",
    "split_raw_columns", "summary_table", "supports_hint", "teacher_key",
]
