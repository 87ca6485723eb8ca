"""The model card's governance sections (Markdown): the NIST AI RMF functions Map (intended and out-of-scope uses,
sensitive and protected features), Measure (robustness curve and the drop at the stated epsilon, membership
inference, DP-SGD epsilon, protected-group metrics, for the model and its teacher) and Manage (each check
against its bound, and what a failing check stops)."""

from __future__ import annotations

from typing import Any


def md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "/")

    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(cell(c) for c in r) + " |" for r in rows]


def governance_limitations(gov: dict[str, Any] | None) -> list[str]:
    """The card's limitation lines for failing checks and the stated uses it must not be put to."""
    if not gov:
        return []
    lines = [f"Trust check {c['check']} fails: {c['what']} is {c['value']}, above its bound {c['threshold']} "
             "(the retrain job will not promote this version)." for c in gov.get("checks") or [] if not c["passed"]]
    uses = ((gov.get("nist_ai_rmf") or {}).get("map") or {}).get("out_of_scope_uses") or []
    return lines + [f"Out of scope: {u}" for u in uses]


def _map_lines(m: dict[str, Any]) -> list[str]:
    lines = ["### Map (context and uses)", ""]
    if m.get("intended_use"):
        lines.append(f"- intended use (as configured): {m['intended_use']}")
    uses = m.get("out_of_scope_uses") or []
    lines.append("- out-of-scope uses: " + ("; ".join(uses) if uses else "none stated (set governance.out_of_scope_uses)"))
    lines.append(f"- sensitive features: {m.get('sensitive_features') or 'none'}; protected features: "
                 f"{m.get('protected_features') or 'none'}")
    if m.get("data_quality"):
        lines.append(f"- data quality report: {m['data_quality']}")
    return lines + [""]


def _robustness_lines(who: str, rob: dict[str, Any]) -> list[str]:
    lines = [f"#### Robustness ({who}): PGD accuracy {rob['accuracy_at_epsilon']:.4f} at epsilon {rob['epsilon']:g} "
             f"(clean {rob['clean_accuracy']:.4f}, drop {rob['drop_at_epsilon']:.4f}; {rob['pgd_steps']} steps, "
             f"{rob['num_rows']} test rows" + (", transfer attack from the float weights" if rob.get("transfer")
                                                 else "") + ")", ""]
    lines += md_table(["epsilon (std units)", "FGSM accuracy", "PGD accuracy"],
                      [[p["epsilon"], p["fgsm_accuracy"], p["pgd_accuracy"]] for p in rob["curve"]])
    lines += [""] + md_table(["categories flipped", "accuracy"], [[p["rate"], p["accuracy"]]
                                                                   for p in rob["category_flips"]])
    return lines + ["", f"Drop at flip rate {rob['flip_rate']:g}: {rob['flip_drop']:.4f}.", ""]


def _privacy_lines(who: str, trust: dict[str, Any]) -> list[str]:
    mia = trust.get("membership") or {}
    lt = mia.get("loss_threshold") or {}
    line = (f"- {who}: membership-inference AUC {mia.get('auc', float('nan')):.4f} (loss threshold: AUC "
            f"{lt.get('auc', float('nan')):.4f}, advantage {lt.get('advantage', float('nan')):.4f}, "
            f"{lt.get('num_members')} train vs {lt.get('num_nonmembers')} held-out rows)")
    if mia.get("reference_model"):
        line += f"; reference-model attack AUC {mia['reference_model']['auc']:.4f}"
    p = trust.get("privacy") or {}
    dp = (f"DP-SGD epsilon {p['epsilon']:.3g} at delta {p.get('delta'):g} (noise {p.get('noise_multiplier')}, "
          f"clip {p.get('max_grad_norm')})") if p.get("dp_sgd") else "trained without DP-SGD (no epsilon)"
    if p.get("sweep_trials") is not None:  # a student chosen among DP-SGD trials on the same rows
        parts = [f"this trial alone {p['trial_epsilon']:.3g}",
                 f"the sweep's {p['sweep_trials']} trials composed {p['sweep_epsilon']:.3g}"]
        if p.get("teacher_epsilon") is not None:
            parts.append(f"the teacher alone {p['teacher_epsilon']:.3g}")
        dp += f"; epsilon composes ({p.get('accountant', 'rdp')}): {', '.join(parts)}"
    return [line + f"; {dp}"]


def _fairness_lines(fair: dict[str, Any] | None) -> list[str]:
    if not fair:
        return []
    lines = []
    for col, m in fair["columns"].items():
        lines += [f"#### Protected feature `{col}`: equalized-odds gap {m['equalized_odds_gap']:.4f}, selection-rate "
                  f"gap {m['selection_rate_gap']:.4f}, accuracy gap {m['accuracy_gap']:.4f}", ""]
        lines += md_table(["group", "rows", "accuracy", "selection rate (per class)", "TPR (per class)",
                           "FPR (per class)", "compared"],
                          [[g["group"], g["num_rows"], g["accuracy"], _vec(g["selection_rate"]), _vec(g["tpr"]),
                            _vec(g["fpr"]), "yes" if g["compared"] else f"no (< {m['min_rows']} rows)"]
                           for g in m["groups"]]) + [""]
    return lines


def _vec(v: list[float | None]) -> str:
    return " ".join("-" if x is None else f"{x:.3f}" for x in v)


def governance_lines(gov: dict[str, Any] | None) -> list[str]:
    """The card's `## Governance (NIST AI RMF)` section, empty without governance figures."""
    if not gov:
        return []
    nist = gov.get("nist_ai_rmf") or {}
    trust, teacher = gov.get("trust") or {}, gov.get("teacher_trust")
    lines = ["## Governance (NIST AI RMF)", ""] + _map_lines(nist.get("map") or {})
    lines += ["### Measure (what raysys measured)", ""]
    lines += _robustness_lines("this model", trust["robustness"]) if trust.get("robustness") else []
    if teacher and teacher.get("robustness"):
        lines += _robustness_lines("teacher", teacher["robustness"])
    lines += ["#### Privacy", ""] + _privacy_lines("this model", trust)
    lines += (_privacy_lines("teacher", teacher) if teacher else []) + [""]
    lines += _fairness_lines(trust.get("fairness"))
    if trust.get("seconds"):
        lines += [f"Cost of the checks (s): {trust['seconds']}", ""]
    manage = nist.get("manage") or {}
    lines += ["### Manage (checks and what they stop)", ""] + md_table(
        ["check", "value", "bound", "result", "measures"],
        [[c["check"], c["value"], c["threshold"] if c["threshold"] is not None else "not enforced",
          "pass" if c["passed"] else "FAIL", c["what"]] for c in gov.get("checks") or []])
    lines += ["", f"- {manage.get('promotion_gate', '')}"]
    lines += [f"- also in place: {', '.join(manage.get('controls') or [])}", ""]
    return lines
