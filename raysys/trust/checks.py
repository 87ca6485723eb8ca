"""The trust figures of one model (robustness, membership inference, protected groups, DP), the checks over them
against `governance.thresholds`, and the card's governance section mapped to the NIST AI RMF functions (Map,
Measure, Manage; NIST AI 100-1, 2023).

`trust_figures` measures; `run_checks` compares; `governance_section` assembles what the card shows;
`failed_checks(card)` is what the retrain job reads before it promotes a candidate.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch import nn

from raysys.config.governance import GovernanceConfig
from raysys.trust.fairness import fairness_report
from raysys.trust.membership import membership_report
from raysys.trust.robustness import robustness_report

# check name -> (figure path in the trust dict, what it bounds)
CHECKS: dict[str, tuple[tuple[str, ...], str]] = {
    "robustness_drop": (("robustness", "drop_at_epsilon"), "accuracy lost to PGD at the stated epsilon"),
    "category_flip_drop": (("robustness", "flip_drop"), "accuracy lost to random category flips at the stated rate"),
    "membership_auc": (("membership", "auc"), "membership-inference AUC, train vs held-out rows"),
    "equalized_odds_gap": (("fairness", "equalized_odds_gap"), "largest TPR/FPR gap between protected groups"),
    "selection_rate_gap": (("fairness", "selection_rate_gap"), "largest selection-rate gap between protected groups"),
    "dp_epsilon": (("privacy", "epsilon"), "DP-SGD epsilon at the configured delta (none: trained without)"),
}


def _sample(arrays: tuple, n: int, rng: np.random.Generator) -> tuple:
    rows = len(arrays[-1])
    if rows <= n:
        return arrays
    idx = np.sort(rng.choice(rows, n, replace=False))
    return tuple(np.asarray(a)[idx] for a in arrays)


def trust_figures(model: nn.Module, cfg: GovernanceConfig, *, test: tuple, train: tuple, num_classes: int,
                  cardinalities: list[int], num_perturbed: int, raw_columns: dict[str, np.ndarray] | None = None,
                  protected: list[str] | tuple = (), attack_model: nn.Module | None = None,
                  privacy: dict[str, Any] | None = None) -> dict[str, Any]:
    """Robustness on (a sample of) the test rows, the membership attack on as many train rows against them,
    per-group metrics of the `protected` columns of `raw_columns` (test rows), and `privacy` (the DP-SGD
    accounting, None: trained without). `seconds` holds what each part cost."""
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.max_rows, len(test[-1]), len(train[-1]))
    test_idx = np.sort(rng.choice(len(test[-1]), n, replace=False)) if len(test[-1]) > n else np.arange(len(test[-1]))
    test_s = tuple(np.asarray(a)[test_idx] for a in test)
    train_s = _sample(train, n, rng)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    rob = robustness_report(model, *test_s, epsilons=cfg.epsilons, epsilon=cfg.epsilon, flip_rates=cfg.flip_rates,
                            flip_rate=cfg.flip_rate, cardinalities=cardinalities, num_perturbed=num_perturbed,
                            pgd_steps=cfg.pgd_steps, seed=cfg.seed, attack_model=attack_model)
    seconds["robustness"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    mia = membership_report(model, train_s, test_s)
    seconds["membership"] = round(time.perf_counter() - t0, 3)
    out: dict[str, Any] = {"robustness": rob, "membership": mia,
                           "privacy": privacy or {"dp_sgd": False, "epsilon": None}}
    if protected and raw_columns is not None:
        t0 = time.perf_counter()
        from raysys.models import predict_logits

        pred = predict_logits(model, test[0], test[1]).argmax(1).numpy()
        out["fairness"] = fairness_report(raw_columns, list(protected), test[2], pred, num_classes,
                                          min_rows=cfg.min_group_rows)
        seconds["fairness"] = round(time.perf_counter() - t0, 3)
    out["seconds"] = seconds
    return out


def _figure(trust: dict[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = trust
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return None if v is None else float(v)


def run_checks(trust: dict[str, Any], cfg: GovernanceConfig) -> list[dict[str, Any]]:
    """One entry per check whose figure exists: value, threshold (None: not enforced), passed."""
    out = []
    for name, (path, what) in CHECKS.items():
        value, bound = _figure(trust, path), getattr(cfg.thresholds, name)
        if value is None and not (name == "dp_epsilon" and bound is not None and "privacy" in trust):
            continue
        if value is None:  # a bound on epsilon and no DP-SGD: no guarantee at all
            out.append({"check": name, "what": what, "value": None, "threshold": bound, "passed": False})
            continue
        out.append({"check": name, "what": what, "value": value, "threshold": bound,
                    "passed": bound is None or not value > bound})
    return out


def governance_section(cfg: GovernanceConfig, trust: dict[str, Any], *, teacher_trust: dict[str, Any] | None = None,
                       sensitive: list[str] | tuple = (), protected: list[str] | tuple = (),
                       data_quality_status: str | None = None) -> dict[str, Any]:
    """The card's `governance`: the trust figures of this model (and of its teacher), its checks, and the NIST AI
    RMF Map / Measure / Manage view of them."""
    checks = run_checks(trust, cfg)
    failed = [c["check"] for c in checks if not c["passed"]]
    return {
        "trust": trust, "teacher_trust": teacher_trust, "checks": checks, "failed": failed,
        "nist_ai_rmf": {
            "map": {"intended_use": cfg.intended_use, "out_of_scope_uses": list(cfg.out_of_scope_uses),
                    "sensitive_features": list(sensitive), "protected_features": list(protected),
                    "data_quality": data_quality_status},
            "measure": {c["check"]: {"value": c["value"], "threshold": c["threshold"]} for c in checks},
            "manage": {
                "promotion_gate": "the retrain job does not promote a candidate whose card fails a check "
                                  "(a value above its governance.thresholds bound)",
                "failed_checks": failed,
                "controls": ["data quality refusals before training", "canary gate before promotion",
                             "monitor drift alerts and retraining", "rollback of the production alias"]}},
    }


def failed_checks(card: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The checks a model card shows failing (none when the card has no governance section)."""
    gov = (card or {}).get("governance") or {}
    return [c for c in gov.get("checks") or [] if not c.get("passed", True)]
