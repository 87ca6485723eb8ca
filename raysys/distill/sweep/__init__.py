"""The distillation sweep: Ray Tune over (temperature, alpha[, lr, student width, depth]), one plain function
trainable per trial.

Each trial is `fit_student` under one CPU and one torch thread, not a nested Ray Train run: Tune over Ray
Train deadlocks on a 2-CPU box when a scheduler stops a trial early (ray-project/ray#54305, Ray 2.60), and a
student is small enough to train in one process, so ASHA can stop trials freely.

Soft targets come once, before the sweep: the teacher's logits on the transfer set are computed with Ray
Data batch inference and stored as Parquet beside the data (raysys.distill.soft_targets); trials get
those arrays through the object store (`tune.with_parameters`) and never run the teacher.

Modules, in the order a sweep runs: `run` (`run_sweep`, the driver), `tuner` (search modes, scheduler,
concurrency, the `Tuner`), `trial` (the trainable and its checkpoints), `progress` (console lines),
`results` (trial rows, the Pareto front, the selection rule, summary files).
"""

from raysys.distill.sweep.results import SweepResult, pareto_front, select_student, summary_table
from raysys.distill.sweep.run import run_sweep
from raysys.distill.sweep.trial import trial_spec
from raysys.distill.sweep.tuner import default_concurrency

__all__ = ["SweepResult", "default_concurrency", "pareto_front", "run_sweep", "select_student", "summary_table",
           "trial_spec"]
