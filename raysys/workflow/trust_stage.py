"""The evaluation stage's trust figures (`raysys.trust`) for a registered version: robustness on the test split,
membership inference of train against test rows, protected-group metrics, and the card's governance section
(NIST AI RMF Map / Measure / Manage) with the checks against `governance.thresholds`."""

from __future__ import annotations

import logging
from typing import Any

from raysys.config import PipelineConfig

log = logging.getLogger("raysys")
# figures behind a stage result: in the run's log file, not on the quiet console (raysys.cli.progress.ConsoleFilter)
details = logging.getLogger("raysys.details")


def _train_arrays(cfg: PipelineConfig, prep) -> tuple:
    from raysys.data import read_split

    return prep.preprocessor.transform_table(read_split(cfg.data.root, "train"))


def model_trust(cfg: PipelineConfig, prep, model, test: tuple, *, attack_model=None, privacy: dict | None = None,
                who: str = "model") -> dict[str, Any] | None:
    """`trust_figures` of `model` on the split arrays (None when `governance.enabled` is off). `attack_model`: the
    float twin whose gradients attack a model without them (dynamic int8)."""
    from raysys.distill import split_raw_columns
    from raysys.trust import trust_figures

    gov, schema = cfg.governance, prep.schema
    if not gov.enabled:
        return None
    protected = schema.protected
    fig = trust_figures(model, gov, test=test, train=_train_arrays(cfg, prep), num_classes=schema.num_classes,
                        cardinalities=schema.cardinalities, num_perturbed=len(schema.numeric),
                        raw_columns=split_raw_columns(cfg, schema, "test") if protected else None,
                        protected=protected, attack_model=attack_model, privacy=privacy)
    rob, mia = fig["robustness"], fig["membership"]
    details.info("[trust] %s: accuracy %.4f clean, %.4f under PGD at epsilon %g, %.4f with %g of categories flipped; "
             "membership-inference AUC %.3f (%s s)", who, rob["clean_accuracy"], rob["accuracy_at_epsilon"],
             rob["epsilon"], rob["accuracy_at_flip_rate"], rob["flip_rate"], mia["auc"], fig["seconds"])
    return fig


def governance(cfg: PipelineConfig, prep, trust: dict | None, teacher_trust: dict | None = None) -> dict | None:
    """The card's governance section (None without trust figures); logs the checks that fail."""
    from raysys.trust import governance_section

    if trust is None:
        return None
    sec = governance_section(cfg.governance, trust, teacher_trust=teacher_trust, sensitive=prep.schema.sensitive,
                             protected=prep.schema.protected,
                             data_quality_status=(prep.quality or {}).get("status"))
    for c in sec["checks"]:
        if not c["passed"]:
            log.warning("[trust] check %s failed: %s above its bound %s", c["check"], c["value"], c["threshold"])
    return sec


def privacy_of(result_metrics: Any) -> dict | None:
    """The DP-SGD accounting a training run reported (None: trained without DP-SGD)."""
    if isinstance(result_metrics, list):  # per-epoch metrics: the last epoch's accounting
        result_metrics = result_metrics[-1] if result_metrics else {}
    dp = (result_metrics or {}).get("dp") if isinstance(result_metrics, dict) else None
    return {"dp_sgd": True, **dp} if dp else None


def check_private_teacher(cfg: PipelineConfig, teacher_metrics: dict, teacher_version: int) -> None:
    """ValueError when students are to be trained with DP-SGD from the logits of a teacher trained without it
    (the config refuses that pairing up front; a retrain job's --skip-teacher brings a registered teacher)."""
    if cfg.distill.dp is None or not cfg.distill.uses_teacher_logits:
        return
    if not (teacher_metrics.get("privacy") or {}).get("dp_sgd"):
        raise ValueError(f"distill.dp: the teacher (version {teacher_version}) was trained without DP-SGD, and the "
                         "students learn from its logits on the training rows, so their epsilon would bound nothing; "
                         "train the teacher with train.dp, or train the students without distillation (alpha 0)")


def student_privacy(cfg: PipelineConfig, sweep_privacy: dict | None, teacher_privacy: dict | None) -> dict | None:
    """The chosen student's DP-SGD accounting for its card: `epsilon` composes (RDP, at distill.dp.delta) every
    trial of the sweep with the teacher whose logits they learnt from; `trial_epsilon`, `sweep_epsilon` and
    `teacher_epsilon` are the parts. None without DP-SGD."""
    from raysys.trust.dp import composed_epsilon

    if not sweep_privacy:
        return None
    out = {**sweep_privacy, "sweep_epsilon": sweep_privacy["epsilon"]}
    parts = [tuple(p) for p in sweep_privacy.get("parts", [])]
    if cfg.distill.uses_teacher_logits and (teacher_privacy or {}).get("dp_sgd"):
        t = teacher_privacy
        parts.append((float(t["noise_multiplier"]), float(t["sample_rate"]), int(t["steps"])))
        out["teacher_epsilon"] = t["epsilon"]
        out["epsilon"] = composed_epsilon(parts, float(sweep_privacy["delta"]))
        out["accountant"] = "rdp (opacus), the teacher and every trial of the sweep composed"
    return out
