"""One Tune trial: a plain function trainable around `fit_student`, checkpointing its best epochs.

Every epoch reports `val_accuracy` and `val_loss`; an epoch that improves the trial's `val_accuracy`, or ties it
with a lower `val_loss` (or ends at a promotion ASHA rung, where the trial may wait and later go on), also
reports a checkpoint: the student's weights as `model.safetensors` (never pickle), `resume.safetensors`
(optimizer and RNG state, from which a paused trial is resumed and a failed one retried) and a `meta.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raysys.distill.student import EpochState, fit_student
from raysys.distill.student_data import StudentData
from raysys.statefile import load_state, save_state

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
RESUME_FILE = "resume.safetensors"  # optimizer and RNG state after the checkpoint's epoch (raysys.statefile)
META_FILE = "meta.json"
METRIC = "val_accuracy"
MODE = "max"


def trial_spec(base_spec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The student spec of a trial: `base_spec` with `student_width` x `student_depth` hidden layers when
    the trial samples the architecture."""
    if "student_width" in params or "student_depth" in params:
        if "hidden_dims" not in base_spec:
            raise ValueError(f"distill.student.family: the search samples MLP widths and depths (student_widths, "
                             f"student_depths), which a {base_spec.get('family')!r} student does not have; use "
                             f"family: mlp, or search: grid")
        width = int(params.get("student_width", base_spec["hidden_dims"][0]))
        depth = int(params.get("student_depth", len(base_spec["hidden_dims"])))
        return {**base_spec, "hidden_dims": [width] * depth}
    return dict(base_spec)


def load_weights(checkpoint) -> dict[str, torch.Tensor]:
    """The student weights of a trial's Tune checkpoint."""
    with checkpoint.as_directory() as d:
        return load_file(os.path.join(d, WEIGHTS_FILE))


def epoch_rank(metrics: dict[str, Any]) -> tuple[float, float]:
    """How a trial's epochs are ordered (higher is better): val_accuracy, then the lower val_loss. A small
    validation split's accuracy saturates within the first epochs; the better fitted epochs after tie on it."""
    return float(metrics[METRIC]), -float(metrics.get("val_loss", math.inf))


def _restore(checkpoint) -> tuple[dict[str, Any], tuple[float, float]]:
    """`(fit_student's resume state, the best epoch_rank so far)` from a trial's latest checkpoint."""
    with checkpoint.as_directory() as d:
        meta = json.loads(Path(d, META_FILE).read_text())
        resume = {**load_state(Path(d, RESUME_FILE)), "weights": load_file(str(Path(d, WEIGHTS_FILE)))}
    best = meta.get("best_so_far", meta["metrics"][METRIC])
    return resume, (tuple(best) if isinstance(best, list) else (float(best), -math.inf))


class _Reporter:
    """`fit_student`'s report: metrics every epoch, a checkpoint only when the epoch ranks above the trial's best
    so far (`epoch_rank`, the order the sweep picks a trial's best checkpoint by), and at the promotion ASHA's
    rungs, where a trial may be paused and later resumed. The sweep only ever wants each trial's best epoch,
    and a checkpoint per epoch with num_to_keep=1 would force an experiment-state snapshot on every report
    (Tune warns that this becomes a bottleneck). A retried trial replays the epochs after its last checkpoint.
    `best`: the best rank so far (None: no epoch yet)."""

    def __init__(self, params: dict[str, Any], checkpoint_epochs: set[int], best: tuple[float, float] | None):
        self.params, self.checkpoint_epochs = params, checkpoint_epochs
        self.best = best or (-math.inf, -math.inf)

    def __call__(self, metrics: dict[str, Any], state: EpochState) -> None:
        from ray import tune

        rank = epoch_rank(metrics)
        if rank <= self.best and state.epoch not in self.checkpoint_epochs:
            tune.report(metrics)
            return
        self.best = max(self.best, rank)
        p = self.params
        with tempfile.TemporaryDirectory(prefix="raysys-student-") as d:
            save_file(state.weights, os.path.join(d, WEIGHTS_FILE))
            save_state(os.path.join(d, RESUME_FILE), state.resumable())
            meta = {"student_spec": p["student_spec"], "temperature": p["temperature"], "alpha": p["alpha"],
                    "lr": p["lr"], "metrics": metrics, "best_so_far": list(self.best)}
            Path(d, META_FILE).write_text(json.dumps(meta, indent=2))
            # report() copies the directory to the trial's storage before it returns
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def distill_trial(config: dict[str, Any], data: StudentData, fixed: dict[str, Any]) -> None:
    """One Tune trial (a plain function trainable: Tune over nested Ray Train runs deadlocks when a
    scheduler stops a trial early, ray-project/ray#54305).

    A trial that Tune retries after a failure (a lost node, a killed process: `distill.max_trial_failures`)
    goes on from its latest checkpoint, as the uninterrupted trial would (`fit_student(resume=...)`).
    """
    from ray import tune

    # a trial reserves one CPU; more intra-op threads would only fight the other trials for cores
    torch.set_num_threads(1)
    # the trial's checkpoints are listed in the sweep's summary: Ray's INFO line per checkpoint, forwarded
    # from every trial to the driver's console, is noise
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    params = {**fixed, **config, "student_spec": trial_spec(fixed["student_spec"], config)}
    resume, best = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume, best = _restore(checkpoint)
        # promoted by ASHA from the rung it was paused at, or retried after a failure
        log.info("distill: trial goes on after epoch %d of its checkpoint", resume["epoch"])
    report = _Reporter(params, set(fixed.get("checkpoint_epochs", ())), best)
    fit_student(params, data, report, resume=resume)
