"""Knowledge distillation: the KD loss, the student loop and the Ray Tune sweep over (T, alpha)."""

from raysys.distill.kd import check_kd_args, kd_loss
from raysys.distill.student import StudentData, StudentFit, fit_student
from raysys.distill.sweep import SweepResult, load_student_data, precompute_teacher_logits, run_sweep

__all__ = [
    "StudentData", "StudentFit", "SweepResult", "check_kd_args", "fit_student", "kd_loss", "load_student_data",
    "precompute_teacher_logits", "run_sweep",
]
