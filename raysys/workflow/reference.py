"""The monitor's reference for a model about to be registered: what its served traffic is compared with."""

from __future__ import annotations

import logging

import numpy as np

from raysys.config import PipelineConfig

log = logging.getLogger("raysys")
# figures behind a stage result: in the run's log file, not on the quiet console (raysys.cli.progress.ConsoleFilter)
details = logging.getLogger("raysys.details")


def _held_out(cfg: PipelineConfig, preprocessor, splits: tuple[str, ...]):
    """Raw numeric, transformed categorical columns and labels of the held-out `splits`, concatenated."""
    import pyarrow as pa

    from raysys.data import read_split

    table = pa.concat_tables([read_split(cfg.data.root, s) for s in splits])
    x_num, x_cat, y = preprocessor.transform_table(table)
    return preprocessor.raw_numeric(table), x_num, x_cat, y


def monitor_reference(cfg: PipelineConfig, schema, preprocessor, model, plan=None) -> dict:
    """The reference profile of `model`: the raw training features with the model's own predictions on them,
    its predicted-probability distributions, calibration and accuracy on the validation split, and the
    online drift detector calibrated on those held-out rows to `monitor.ert` rows between false alarms.

    `plan` (`small_tables.TablePlan`) names the held-out rows of a small table: validation pooled with test
    when validation alone is too small, and no detector (`detector_skipped` says why) when even the pool is."""
    from raysys.data import read_split
    from raysys.models import predict_logits
    from raysys.monitor.profile import ReferenceProfile

    train = read_split(cfg.data.root, "train")
    tx_num, tx_cat, _ = preprocessor.transform_table(train)
    pred = predict_logits(model, tx_num, tx_cat).argmax(1).numpy()
    prof = ReferenceProfile.from_arrays(schema, preprocessor.raw_numeric(train), tx_cat,
                                        num_bins=cfg.monitor.num_bins, pred=pred)
    splits = ("validation",) if plan is None else plan.reference_splits
    if not splits:
        return {**prof.to_dict(), "detector_skipped": plan.detector_skipped}
    raw_num, vx_num, vx_cat, vy = _held_out(cfg, preprocessor, splits)
    v_proba = predict_logits(model, vx_num, vx_cat).double().softmax(1).numpy()
    prof.add_predictions(v_proba, np.asarray(vy))
    if plan is not None and not plan.calibrate_detector:
        log.warning("[distill] monitor reference: online detector not calibrated: %s", plan.detector_skipped)
        return {**prof.to_dict(), "detector_skipped": plan.detector_skipped}
    prof.calibrate(raw_num, vx_cat, v_proba, ert=cfg.monitor.ert, num_rows=cfg.monitor.calibration_rows)
    details.info("[distill] monitor reference: online detector threshold %.2f for ERT %d rows on %s (%.1fs)",
             prof.detector["threshold"], cfg.monitor.ert, "+".join(splits),
             prof.detector["calibration"]["seconds"])
    return prof.to_dict()
