"""The monitor's reference for a model about to be registered: what its served traffic is compared with."""

from __future__ import annotations

import logging

from raysys.config import PipelineConfig

log = logging.getLogger("raysys")


def monitor_reference(cfg: PipelineConfig, schema, preprocessor, model) -> dict:
    """The reference profile of `model`: the raw training features with the model's own predictions on them,
    its predicted-probability distributions, calibration and accuracy on the validation split, and the
    online drift detector calibrated on those held-out rows to `monitor.ert` rows between false alarms."""
    from raysys.data import read_split
    from raysys.models import predict_logits
    from raysys.monitor.profile import ReferenceProfile

    train = read_split(cfg.data.root, "train")
    tx_num, tx_cat, _ = preprocessor.transform_table(train)
    pred = predict_logits(model, tx_num, tx_cat).argmax(1).numpy()
    prof = ReferenceProfile.from_arrays(schema, preprocessor.raw_numeric(train), tx_cat,
                                        num_bins=cfg.monitor.num_bins, pred=pred)
    val = read_split(cfg.data.root, "validation")
    vx_num, vx_cat, vy = preprocessor.transform_table(val)
    v_proba = predict_logits(model, vx_num, vx_cat).double().softmax(1).numpy()
    prof.add_predictions(v_proba, vy)
    prof.calibrate(preprocessor.raw_numeric(val), vx_cat, v_proba, ert=cfg.monitor.ert,
                   num_rows=cfg.monitor.calibration_rows)
    log.info("[distill] monitor reference: online detector threshold %.2f for ERT %d rows (%.1fs)",
             prof.detector["threshold"], cfg.monitor.ert, prof.detector["calibration"]["seconds"])
    return prof.to_dict()
