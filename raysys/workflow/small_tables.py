"""What a small table changes in the loop: parts that need more rows than a split has are reduced or skipped,
and training is sized to the rows (`sizing:`), each with a line for the model card's limitations, never a
failed run after training.

`plan_for_table(cfg, rows)` is pure (split row counts in, decisions and notes out); `stage_data` computes it
once, and the evaluation, the monitor reference and the cards read it from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from raysys.config import PipelineConfig

log = logging.getLogger("raysys")

# raysys.monitor.online.calibrate_detector refuses fewer held-out rows than this (bootstrap streams resampled
# from fewer rows repeat them too often for the simulated run lengths to mean anything)
MIN_CALIBRATION_ROWS = 50
# the reference profile's prediction distributions need a covariance: two rows at least
MIN_PREDICTION_ROWS = 2
# test rows per confidence bin of the ECE at least (fewer rows: fewer, wider bins)
ROWS_PER_CALIBRATION_BIN = 10


@dataclass
class TablePlan:
    """The size-driven decisions for one dataset (see `plan_for_table`)."""

    rows: dict[str, int]
    num_calibration_bins: int
    latency_batch_size: int
    # held-out splits the monitor reference is built from: ("validation",), ("validation", "test") or ()
    reference_splits: tuple[str, ...] = ("validation",)
    calibrate_detector: bool = True
    detector_skipped: str | None = None  # why the online detector is not calibrated, when it is not
    notes: list[str] = field(default_factory=list)  # one line per reduction, for the model cards
    # sized training settings per config section, e.g. {"train": {"batch_size": 16, "num_epochs": 86}}
    training: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": dict(self.rows), "num_calibration_bins": self.num_calibration_bins,
                "latency_batch_size": self.latency_batch_size, "reference_splits": list(self.reference_splits),
                "calibrate_detector": self.calibrate_detector, "detector_skipped": self.detector_skipped,
                "training": {k: dict(v) for k, v in self.training.items()}, "notes": list(self.notes)}


def split_rows(root: str) -> dict[str, int]:
    """Rows per split, from the Parquet footers (no data read)."""
    from raysys.data.dataset import parquet_rows, split_files
    from raysys.data.synthetic import SPLITS

    return {s: parquet_rows(split_files(root, s)) for s in SPLITS}


def plan_for_table(cfg: PipelineConfig, rows: dict[str, int], *, has_slices: bool = True) -> TablePlan:
    """Reduce or skip each part of the loop that `rows` (train/validation/test row counts) cannot feed.
    `has_slices`: whether the evaluation reports slices at all (categorical features or numeric bins)."""
    ev = cfg.distill.evaluation
    n_test = rows.get("test", 0)
    plan = TablePlan(rows=dict(rows), num_calibration_bins=ev.num_calibration_bins,
                     latency_batch_size=ev.latency_batch_size)
    _plan_evaluation(cfg, plan, n_test, has_slices)
    _plan_reference(plan, rows.get("validation", 0), n_test)
    _plan_training(cfg, plan, rows.get("train", 0))
    for note in plan.notes:
        log.warning("[data] small table: %s", note)
    return plan


def _plan_evaluation(cfg: PipelineConfig, plan: TablePlan, n_test: int, has_slices: bool) -> None:
    ev = cfg.distill.evaluation
    bins = max(2, min(ev.num_calibration_bins, n_test // ROWS_PER_CALIBRATION_BIN))
    if bins < ev.num_calibration_bins:
        plan.num_calibration_bins = bins
        plan.notes.append(f"Calibration (ECE) uses {bins} confidence bins instead of "
                          f"distill.evaluation.num_calibration_bins={ev.num_calibration_bins}: the test split has "
                          f"{n_test} rows ({ROWS_PER_CALIBRATION_BIN} per bin at least); treat the ECE as rough.")
    if 0 < n_test < ev.latency_batch_size:
        plan.latency_batch_size = n_test
        plan.notes.append(f"Per-batch latency measured at batch {n_test} (the test split's rows) instead of "
                          f"distill.evaluation.latency_batch_size={ev.latency_batch_size}.")
    if has_slices and n_test < ev.slices.min_rows:
        plan.notes.append(f"No slice is named weakest: the test split has {n_test} rows, fewer than "
                          f"distill.evaluation.slices.min_rows={ev.slices.min_rows}; per-slice figures are listed "
                          "but rest on a handful of rows.")
    if n_test < 100:
        plan.notes.append(f"Test metrics rest on {n_test} rows: one row moves accuracy by "
                          f"{100 / max(n_test, 1):.1f} points.")


def _plan_reference(plan: TablePlan, n_val: int, n_test: int) -> None:
    """The monitor reference's held-out rows: validation, pooled with test when validation alone is too small
    for the online detector's calibration; the detector is skipped when even the pool is too small."""
    if n_val >= MIN_CALIBRATION_ROWS:
        return
    pool = n_val + n_test
    if pool >= MIN_CALIBRATION_ROWS:
        plan.reference_splits = ("validation", "test")
        plan.notes.append(f"Monitor reference: the validation split has {n_val} rows, fewer than the "
                          f"{MIN_CALIBRATION_ROWS} the online drift detector's calibration needs; it was "
                          f"calibrated on validation + test ({pool} held-out rows) instead.")
        return
    plan.reference_splits = ("validation", "test") if pool >= MIN_PREDICTION_ROWS else ()
    plan.calibrate_detector = False
    plan.detector_skipped = (f"the validation + test splits hold {pool} rows; the online drift detector's "
                             f"calibration needs {MIN_CALIBRATION_ROWS} held-out rows (add rows or raise "
                             "`raysys data import --val-fraction`)")
    plan.notes.append(f"Online drift detector not calibrated: {plan.detector_skipped}. The served model has no "
                      "online drift alarm; the monitor's windowed drift tests, latency and accuracy still run.")
    if not plan.reference_splits:
        plan.notes.append("Monitor reference has no prediction distributions (fewer than "
                          f"{MIN_PREDICTION_ROWS} held-out rows): no prediction drift and no confidence-based "
                          "accuracy estimate.")


def _plan_training(cfg: PipelineConfig, plan: TablePlan, n_train: int) -> None:
    """The teacher's and the students' batch and epochs sized to a small training split (`cfg.sizing`, see
    `raysys.config.sizing`); with sizing off, the card still says when a batch holds the whole split."""
    for section, what in (("train", "teacher"), ("distill", "student")):
        sec = getattr(cfg, section)
        batch, epochs = sec.batch_size, sec.num_epochs
        new_batch, new_epochs = sized_training(cfg, section, n_train)
        if (new_batch, new_epochs) != (batch, epochs):
            plan.training[section] = {"batch_size": new_batch, "num_epochs": new_epochs}
            steps = -(-n_train // new_batch) * new_epochs
            plan.notes.append(f"The {what} trained with batch {new_batch} for {new_epochs} epochs ({steps} optimizer "
                              f"steps) instead of {section}.batch_size={batch} for {section}.num_epochs={epochs}: "
                              f"the training split has {n_train} rows (sizing.enabled: false keeps the configured "
                              "values).")
        elif n_train and -(-n_train // batch) <= 1:
            plan.notes.append(f"The {what} took one optimizer step per epoch ({epochs} in all): its batch size "
                              f"{batch} holds all {n_train} training rows; lower {section}.batch_size for a small "
                              "table.")


def sized_training(cfg: PipelineConfig, section: str, n_train: int) -> tuple[int, int]:
    """(batch_size, num_epochs) for `section` ('train' or 'distill') on a training split of `n_train` rows: the
    configured ones unless `cfg.sizing` resizes them (a split of fewer than `batches_per_epoch` batches: the batch
    halved down to 1/`batches_per_epoch` of the rows, not below `min_batch`; then epochs raised to reach
    `min_steps` steps, at most `max_epochs`). DP-SGD runs and pipeline/tensor-parallel teachers (whose batch
    splits into micro-batches or must fill each rank) keep their batch; DP-SGD runs their epochs too."""
    sz, sec = cfg.sizing, getattr(cfg, section)
    batch, epochs = sec.batch_size, sec.num_epochs
    if not sz.enabled or n_train <= 0 or sec.dp is not None or n_train >= sz.batches_per_epoch * batch:
        return batch, epochs
    fixed_batch = section == "train" and (cfg.train.strategy in ("pipeline", "tensor") or cfg.train.parallel)
    if not fixed_batch:
        floor = max(sz.min_batch, cfg.train.num_workers if section == "train" else 1)
        cap = 1 << max(0, (n_train // sz.batches_per_epoch).bit_length() - 1)  # a power of two <= rows / batches
        batch = min(batch, max(floor, cap))
    steps_per_epoch = -(-n_train // batch)
    if steps_per_epoch * epochs < sz.min_steps:
        epochs = max(epochs, min(sz.max_epochs, -(-sz.min_steps // steps_per_epoch)))
    return batch, epochs


def sized(cfg: PipelineConfig, plan: TablePlan | None) -> PipelineConfig:
    """`cfg` with the plan's sized training settings (the teacher's and the students' stages train with it)."""
    if plan is None or not plan.training:
        return cfg
    cfg = cfg.model_copy(deep=True)
    for section, update in plan.training.items():
        setattr(cfg, section, getattr(cfg, section).model_copy(update=update))
    return cfg


def quality_notes(summary: dict | None) -> list[str]:
    """Card lines for the data quality checks a small table weakened: refusals downgraded to warnings and
    checks skipped for too few rows (from `raysys.data.quality.card_summary`)."""
    if not summary:
        return []
    out = [f"Data quality check {name} skipped: {msg}" for name, msg in (summary.get("skipped") or {}).items()]
    out += [f"Data quality check {f['check']}: {f['message']}" for f in summary.get("findings", [])
            if f.get("downgraded")]
    return out
