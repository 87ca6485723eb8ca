"""Trust checks of a trained model, pure torch / numpy (no Ray): robustness to input perturbations
(`robustness`), membership inference (`membership`), per-group metrics of protected columns (`fairness`), the
checks against `governance.thresholds` and the card's NIST AI RMF section (`checks`), DP-SGD (`dp`)."""

from raysys.trust.checks import failed_checks, governance_section, run_checks, trust_figures

__all__ = ["failed_checks", "governance_section", "run_checks", "trust_figures"]
