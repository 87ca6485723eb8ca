"""The `governance:` section (what the model is for, which trust checks run on each registered version and the
thresholds past which the retrain job will not promote a candidate) and the `dp:` option of `train` and
`distill` (DP-SGD through Opacus).

A threshold is a bound on one number the model card shows; the check fails when the value is strictly above it
(`None`: reported, never enforced). Defaults are set so that the demo data's models pass them.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from raysys.config.strict import Strict


class DPConfig(Strict):
    """DP-SGD (Abadi et al., 2016) through Opacus: per-sample gradients clipped to `max_grad_norm`, Gaussian noise
    of std `noise_multiplier * max_grad_norm` added to their sum, epsilon at `delta` from Opacus's RDP
    accountant. Single process or data parallel (`train.strategy: ddp`) only; `pip install raysys[dp]`."""

    noise_multiplier: float = Field(1.0, gt=0, description="Noise std over the clipping norm (sigma).")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient L2 clipping bound (C).")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee reported.")


class TrustThresholds(Strict):
    """Bounds on the trust figures of the model card (a value strictly above its bound fails the check)."""

    robustness_drop: float | None = Field(
        0.5, ge=0, le=1, description="Clean accuracy minus PGD accuracy at `governance.epsilon`.")
    category_flip_drop: float | None = Field(
        0.5, ge=0, le=1, description="Clean accuracy minus accuracy with `governance.flip_rate` of the "
                                     "categorical values replaced at random.")
    membership_auc: float | None = Field(
        0.75, ge=0, le=1, description="Loss-threshold membership-inference AUC, train vs held-out rows (0.5: "
                                      "nothing learned about membership).")
    equalized_odds_gap: float | None = Field(
        None, ge=0, le=1, description="Largest gap in true or false positive rate between groups of a "
                                      "protected column (one class vs the rest, worst class).")
    selection_rate_gap: float | None = Field(
        None, ge=0, le=1, description="Largest gap in the share of rows predicted as a class between groups of a "
                                      "protected column (demographic parity, worst class).")
    dp_epsilon: float | None = Field(
        None, gt=0, description="Largest DP epsilon (at the dp delta); a model trained without DP-SGD has "
                                "epsilon infinity and fails a set bound.")


class GovernanceConfig(Strict):
    """Trust checks on every registered version's card, and the uses the card states (NIST AI RMF Map)."""

    enabled: bool = Field(True, description="Measure robustness, membership inference and protected-group metrics "
                                            "in the evaluation stage and put them on the card.")
    intended_use: str | None = Field(None, description="What the model is for (None: a generic sentence).")
    out_of_scope_uses: list[str] = Field(default_factory=list, description="Uses the model must not be put to.")
    epsilons: list[float] = Field([0.05, 0.1, 0.25, 0.5], description="L-inf budgets of the FGSM/PGD curve, in "
                                                                        "standard deviations of each numeric feature.")
    epsilon: float = Field(0.1, gt=0, description="The budget whose accuracy drop the card states and checks.")
    pgd_steps: int = Field(10, ge=1, description="PGD iterations (step 2.5 * epsilon / steps, random start).")
    flip_rates: list[float] = Field([0.05, 0.1, 0.25], description="Shares of categorical values replaced by "
                                                                    "another category at random.")
    flip_rate: float = Field(0.1, gt=0, le=1, description="The flip rate whose drop the card states and checks.")
    max_rows: int = Field(2000, ge=50, description="Rows (test, and as many train rows) the checks use at most.")
    min_group_rows: int = Field(30, ge=1, description="Protected groups with fewer rows are shown, not compared.")
    seed: int = Field(0, description="Seed of the row samples, PGD starts and category flips.")
    thresholds: TrustThresholds = Field(default_factory=TrustThresholds, description="Per-check bounds.")

    @field_validator("epsilons", "flip_rates")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < x <= 10 for x in v):
            raise ValueError("must be a non-empty list of numbers in (0, 10], e.g. [0.05, 0.1, 0.25]")
        return sorted(set(v))
