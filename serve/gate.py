"""The canary gate, pure (no Ray, no HTTP): per-version figures out of two monitor reports, and the checks
a candidate must pass against the stable version over the same time before it is promoted.

What trusted rollout controllers do (Flagger, Argo Rollouts): promote only while the candidate keeps its
non-5xx ratio above a bound and its latency within a bound over several checks, roll back after a number
of failed checks. Here, per check, on the figures since the canary began (`CanaryConfig`):

- rows: the candidate scored at least `min_rows` rows (else the check waits; never promotes);
- server_errors: requests the candidate failed (5xx, or raised in shadow) / all it took <= 1 - min_success_ratio;
- client_errors: its share of refused (4xx) requests exceeds stable's by at most `max_client_error_increase`
  (a candidate whose schema the clients do not match refuses their rows);
- latency_p99: its p99 scoring time (validation + forward pass, in CPU time of the replica's thread, so that
  preemption on a busy node does not decide; measured on the same rows as stable's where both scored them)
  <= max_p99_factor x stable's + p99_slack_ms;
- agreement: on rows both scored, the share with the same top class >= min_agreement;
- accuracy (once both versions have `min_labels` labels from /v1/feedback): candidate accuracy >=
  stable's - max_accuracy_drop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from raysys.config import CanaryConfig
from raysys.monitor.latency import NUM_BUCKETS, LogHistogram


@dataclass
class VersionCounts:
    """One version's cumulative figures in a monitor report (or the difference of two)."""

    answered: int = 0  # requests it answered with scores
    rows: int = 0  # rows it scored, answered or for comparison
    errors: int = 0  # requests routed to it that got an error answer (4xx + 5xx)
    server_errors: int = 0  # the 5xx among them
    compare_requests: int = 0  # requests it scored for nobody (shadow, or beside a canary)
    compare_failed: int = 0
    compare_rejected: int = 0
    compared: int = 0  # rows it and the other version both scored ...
    agreed: int = 0  # ... with the same top class
    labelled: int = 0
    correct: int = 0
    score_hist: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BUCKETS, np.int64))
    compare_hist: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BUCKETS, np.int64))

    @classmethod
    def from_report(cls, report: dict[str, Any], version: int | str, other: int | str | None = None) -> VersionCounts:
        """`version`'s figures in a `Monitor.report()`; `other`: the version agreement is measured against."""
        v = str(version)
        fig = (report.get("version_figures") or {}).get(v) or {}
        lab = ((report.get("accuracy") or {}).get("labelled_by_version") or {}).get(v) or {}
        agree = (fig.get("agreement") or {}).get(str(other), [0, 0]) if other is not None else [0, 0]
        compare_rows = int(fig.get("compare_rows") or 0)
        return cls(
            answered=int(((report.get("latency_by_version") or {}).get(v) or {}).get("count") or 0),
            rows=int((report.get("predictions_by_version") or {}).get(v, 0)) + compare_rows,
            errors=int((report.get("errors_by_version") or {}).get(v, 0)),
            server_errors=int((report.get("server_errors_by_version") or {}).get(v, 0)),
            compare_requests=int(fig.get("compare_requests") or 0), compare_failed=int(fig.get("compare_failed") or 0),
            compare_rejected=int(fig.get("compare_rejected") or 0), compared=int(agree[0]), agreed=int(agree[1]),
            labelled=int(lab.get("labelled") or 0), correct=int(lab.get("correct") or 0),
            score_hist=_hist(fig.get("score_hist")), compare_hist=_hist(fig.get("compare_hist")))

    def since(self, before: VersionCounts) -> VersionCounts:
        """The figures added after `before` (the monitor restarted or reset in between: these, whole)."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(before, f.name)
            out[f.name] = a - b
        if any((np.asarray(x) < 0).any() for x in out.values()):
            return self
        return VersionCounts(**out)

    # ----- derived -----
    @property
    def attempts(self) -> int:
        return self.answered + self.errors + self.compare_requests

    @property
    def failures(self) -> int:
        return self.server_errors + self.compare_failed

    @property
    def refusals(self) -> int:
        return self.errors - self.server_errors + self.compare_rejected

    def p99(self, which: str = "all") -> float | None:
        """p99 scoring CPU time (ms) over its passes: "all", "compare" (passes for nobody) or "primary"."""
        counts = {"all": self.score_hist, "compare": self.compare_hist,
                  "primary": self.score_hist - self.compare_hist}[which]
        hist = LogHistogram(np.maximum(counts, 0))
        return hist.quantile(0.99)


def _hist(counts: Any) -> np.ndarray:
    out = np.zeros(NUM_BUCKETS, np.int64)
    if counts:
        c = np.asarray(counts, dtype=np.int64)[:NUM_BUCKETS]
        out[:len(c)] = c
    return out


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not enough data to judge yet
    detail: str


@dataclass
class Verdict:
    """One check of the gate: every check's outcome; `state` is "pass", "fail" or "wait" (too few rows)."""

    state: str
    checks: list[Check]
    figures: dict[str, Any]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def describe(self) -> str:
        if self.state == "fail":
            return "; ".join(f"{c.name} failed: {c.detail}" for c in self.failed)
        return "; ".join(f"{c.name} {'ok' if c.passed else 'n/a'}: {c.detail}" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "checks": [asdict(c) for c in self.checks], "figures": self.figures}


MIN_ATTEMPTS = 20  # error ratios are judged from this many requests: 1 failure of 1 is not yet a 100% failure rate


def _ratio(n: int, d: int) -> float | None:
    return n / d if d >= MIN_ATTEMPTS else None


def evaluate(cfg: CanaryConfig, cand: VersionCounts, stable: VersionCounts, *, shadow: bool) -> Verdict:
    """The gate's checks on the candidate's and stable's figures over the same time (`since` the start)."""
    checks = [Check("rows", cand.rows >= cfg.min_rows, f"{cand.rows} rows scored (need {cfg.min_rows})")]
    fail_ratio = _ratio(cand.failures, cand.attempts)
    checks.append(Check("server_errors", None if fail_ratio is None else 1 - fail_ratio >= cfg.min_success_ratio,
                        f"{cand.failures} of {cand.attempts} requests failed by the server (5xx); non-5xx ratio must "
                        f"be >= {cfg.min_success_ratio:g}"))
    c_ref, s_ref = _ratio(cand.refusals, cand.attempts), (_ratio(stable.refusals, stable.attempts) or 0.0)
    checks.append(Check("client_errors", None if c_ref is None else c_ref <= s_ref + cfg.max_client_error_increase,
                        f"{cand.refusals} of {cand.attempts} requests refused (4xx), {100 * (c_ref or 0):.2f}% against "
                        f"stable's {100 * s_ref:.2f}% (+{100 * cfg.max_client_error_increase:g} points allowed)"))
    # the same rows: beside a canary, stable re-scores the canary's rows (its compare passes); in shadow mode the
    # candidate scores a copy of rows stable answered (stable's primary passes)
    c99, s99 = cand.p99("all"), stable.p99("primary" if shadow else "compare")
    bound = None if s99 is None else cfg.max_p99_factor * s99 + cfg.p99_slack_ms
    checks.append(Check("latency_p99", None if c99 is None or bound is None else c99 <= bound,
                        f"candidate p99 scoring CPU time {_ms(c99)} against stable's {_ms(s99)} on the same rows "
                        f"(bound {cfg.max_p99_factor:g} x stable + {cfg.p99_slack_ms:g} ms = {_ms(bound)})"))
    agree = cand.agreed / cand.compared if cand.compared else None
    checks.append(Check("agreement", None if agree is None else agree >= cfg.min_agreement,
                        f"same class as stable on {cand.agreed} of {cand.compared} rows"
                        f"{'' if agree is None else f' ({100 * agree:.1f}%)'}, need >= {100 * cfg.min_agreement:g}%"))
    checks.append(_accuracy_check(cfg, cand, stable))
    judged = [c for c in checks if c.name != "rows"]
    if any(c.passed is False for c in judged):
        state = "fail"
    elif checks[0].passed and all(c.passed is not False for c in judged):
        state = "pass"
    else:
        state = "wait"
    figures = {"candidate_rows": cand.rows, "candidate_attempts": cand.attempts, "failures": cand.failures,
               "refusals": cand.refusals, "candidate_p99_ms": c99, "stable_p99_ms": s99, "agreement": agree,
               "candidate_labels": cand.labelled, "stable_labels": stable.labelled}
    return Verdict(state, checks, figures)


def _accuracy_check(cfg: CanaryConfig, cand: VersionCounts, stable: VersionCounts) -> Check:
    if cand.labelled < cfg.min_labels or stable.labelled < cfg.min_labels:
        return Check("accuracy", None, f"{cand.labelled} candidate and {stable.labelled} stable labels so far "
                                       f"(judged from {cfg.min_labels} each)")
    ca, sa = cand.correct / cand.labelled, stable.correct / stable.labelled
    return Check("accuracy", ca >= sa - cfg.max_accuracy_drop,
                 f"live accuracy {ca:.4f} against stable's {sa:.4f} on {cand.labelled}/{stable.labelled} labels "
                 f"(may trail by {cfg.max_accuracy_drop:g})")


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f} ms"
