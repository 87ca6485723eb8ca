"""The `quality:` section: which data quality checks run before training and when a finding warns or refuses.

Every check measures one number per dataset (a share of rows, a ratio, an accuracy); `warn` and `refuse` are
thresholds on that number: a value strictly above `warn` is a warning, strictly above `refuse` a refusal to
train (a ValueError naming the check and example rows). `None` turns that level off. The defaults are tuned
so that the synthetic data (`SyntheticTask`, with its 3% label noise) raises no finding.
"""

from __future__ import annotations

from pydantic import Field

from raysys.config.strict import Strict


def _levels(warn: float | None, refuse: float | None, what: str):
    return Field(default_factory=lambda: CheckLevels(warn=warn, refuse=refuse), description=what)


class CheckLevels(Strict):
    """Thresholds of one check (the value it measures must be strictly above a threshold to fire)."""

    warn: float | None = Field(None, description="Warn when the check's value is above this (None: never warn).")
    refuse: float | None = Field(None, description="Refuse to train when the value is above this (None: never).")


class QualityConfig(Strict):
    """Data quality report before training (`raysys data check`, and the pipeline's `quality` stage)."""

    enabled: bool = Field(True, description="Run the report as a stage before training (refusals stop the run).")
    max_rows: int = Field(100_000, ge=100, description="Rows per split the checks read at most (a seeded sample "
                                                        "beyond that), so the report's cost stays bounded.")
    max_examples: int = Field(10, ge=1, description="Example rows listed per finding (all counts are exact).")
    seed: int = Field(0, description="Seed of the row sample, the folds and the label-issue model.")
    near_tolerance: float = Field(
        0.01, gt=0, description="Near duplicates: rows equal after rounding every numeric feature to this many "
                                "training standard deviations (categories equal).")
    num_folds: int = Field(4, ge=2, description="Label issues: folds of the out-of-fold predicted probabilities.")
    label_model_epochs: int = Field(15, ge=1, description="Label issues: epochs of the small MLP of each fold.")
    min_rows_to_refuse: int = Field(
        100, ge=0, description="Smallest split size at which a check may refuse: on a table with a smaller "
                               "split one or two rows decide a share, so a refusal is a warning that says so "
                               "(0: refuse at any size).")
    outlier_z: float = Field(8.0, gt=0, description="Outliers: robust z (|x - median| / (1.4826 MAD)) beyond "
                                                    "which a numeric value is an outlier.")
    duplicates: CheckLevels = _levels(0.0, None, "Share of a split's rows that repeat an earlier row of the same "
                                                 "split exactly (features and label).")
    near_duplicates: CheckLevels = _levels(0.01, None, "Share of a split's rows that are near (not exact) "
                                                       "duplicates of another row of the same split.")
    leakage: CheckLevels = _levels(0.0, 0.05, "Share of validation or test rows whose features equal (exactly "
                                              "or nearly) a training row's: leakage between the splits.")
    class_imbalance: CheckLevels = _levels(5.0, None, "Largest over smallest class share in the training split "
                                                      "(inf when a class has no training row).")
    label_issues: CheckLevels = _levels(0.08, None, "Share of training rows that confident learning marks as "
                                                    "likely mislabeled.")
    constant_features: CheckLevels = _levels(0.99, None, "Share of a feature's training rows that hold its most "
                                                         "common value (1.0: constant).")
    predictive_features: CheckLevels = _levels(0.9, 0.99, "Validation skill of the best one-feature rule fitted "
                                                          "on train, (accuracy - majority rate) / (1 - majority "
                                                          "rate): near 1.0 is a leakage sign.")
    unseen_categories: CheckLevels = _levels(0.0, None, "Share of validation or test rows with a category "
                                                        "that the training split never holds.")
    outliers: CheckLevels = _levels(0.005, None, "Share of a numeric feature's rows beyond `outlier_z`, the "
                                                 "largest over features and splits.")
    missing_values: CheckLevels = _levels(0.3, None, "Share of a feature's rows that are null (imputed), the "
                                                     "largest over features and splits.")

    def levels(self, check: str) -> CheckLevels:
        return getattr(self, check)


QUALITY_CHECKS = ("duplicates", "near_duplicates", "leakage", "class_imbalance", "label_issues",
                  "constant_features", "predictive_features", "unseen_categories", "outliers", "missing_values")
