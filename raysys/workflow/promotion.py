"""Judge a retrained candidate against the served version on the holdout, canary it in the Serve
application that serves the model, then promote it or stop the canary."""

from __future__ import annotations

import logging
import time
from typing import Any

from raysys.workflow.labelled_traffic import RetrainError

log = logging.getLogger("raysys")


def holdout_predictions(reg, name: str, version: int, holdout):
    """(predicted classes, labels) of registered `version` on the raw holdout rows (its own preprocessor)."""
    from raysys.models import predict_logits

    loaded = reg.load(name, version)
    x_num, x_cat, y = loaded.preprocessor.transform_table(holdout)
    return predict_logits(loaded.model, x_num, x_cat).argmax(1).numpy(), y


def holdout_accuracy(reg, name: str, version: int, holdout) -> float:
    """Accuracy of registered `version` on the raw holdout rows (through its own preprocessor)."""
    pred, y = holdout_predictions(reg, name, version, holdout)
    return float((pred == y).mean())


AGREEMENT_TOLERANCE = 0.15  # live agreement may fall this far below the holdout's before the gate objects


def expected_agreement(reg, name: str, candidate: int, served: int, holdout) -> float:
    """How often the candidate and the served version predict the same class on the holdout: a retrain after
    the labels' rule changed is SUPPOSED to disagree with production, so the canary gate expects live
    agreement near this, not near 1 (far below it means the live inputs are not what the holdout was)."""
    a, _ = holdout_predictions(reg, name, candidate, holdout)
    b, _ = holdout_predictions(reg, name, served, holdout)
    return float((a == b).mean())


def judge(candidate_acc: float, production_acc: float | None, min_improvement: float) -> tuple[bool, str]:
    """(candidate wins, why) on the holdout."""
    if production_acc is None:
        return False, "no production version to compare against; the candidate stays a candidate"
    gain = candidate_acc - production_acc
    if gain > min_improvement:
        return True, (f"candidate holdout accuracy {candidate_acc:.4f} beats production {production_acc:.4f} "
                      f"by {gain:+.4f} (> {min_improvement:g})")
    return False, (f"candidate holdout accuracy {candidate_acc:.4f} does not beat production {production_acc:.4f} "
                   f"by more than {min_improvement:g} ({gain:+.4f}); production keeps serving")


def governance_gate(reg, name: str, version: int, wins: bool, why: str) -> tuple[bool, str, list[dict]]:
    """(wins, why, failed checks): a candidate whose model card shows a trust check failing beyond its
    `governance.thresholds` bound is not promoted, whatever its holdout accuracy."""
    from raysys.trust import failed_checks

    _, card, _ = reg.model_card(name, version)
    failed = failed_checks(card)
    if not failed:
        return wins, why, []
    names = "; ".join(f"{c['check']} = {c['value']} above {c['threshold']}" for c in failed)
    return False, (f"v{version}'s model card fails trust check(s) {names} (governance.thresholds), so it is not "
                   f"promoted and stays the candidate (holdout: {why})"), failed


def find_app(admin, registry_uri: str, model_name: str, app: str | None) -> dict | None:
    """The declaratively deployed Serve application serving `model_name` from `registry_uri` (or `app`)."""
    from serve.contract import resolve_registry_uri

    config = admin.config()
    for a in config["applications"]:
        args = a.get("args") or {}
        if app is not None:
            if a.get("name") == app:
                return a
        elif args.get("model_name", "raysys-student") == model_name and args.get("registry_uri") \
                and resolve_registry_uri(args["registry_uri"]) == registry_uri:
            return a
    if app is not None:
        why = ("deployed from Python (serve.run), so it cannot be updated in place" if app in config["_imperative"]
               else f"not on this cluster (applications: {[a.get('name') for a in config['applications']]})")
        raise RetrainError(f"--app {app!r}: {why}")
    return None


def monitor_reader(app: dict):
    """A callable returning the report of the monitor actor the application ships its traffic to (None when
    the application runs without the monitor)."""
    import ray

    args = app.get("args") or {}
    if args.get("monitor") is False:
        return None
    name, namespace = args.get("monitor_name") or "raysys_monitor", args.get("monitor_namespace") or "raysys"

    def read() -> dict:
        return ray.get(ray.get_actor(name, namespace=namespace).report.remote(), timeout=30)

    return read


def canary_then_decide(admin, app: dict, version: int, why: str, gate, *, reader=None,
                       sleep=time.sleep) -> tuple[bool, str, dict[str, Any]]:
    """Canary `version` in `app` behind the metric gate (`serve.canary.run_canary`, `gate` a CanaryConfig):
    promoted when the gate passes, rolled back (naming the failed check) when it fails. Returns (promoted,
    why, canary figures). Without the monitor the gate cannot judge, so the candidate is not promoted."""
    from serve import rollout
    from serve.canary import run_canary

    name = app["name"]
    read = reader or monitor_reader(app)
    if read is None:
        return False, (f"the application {name!r} runs without the monitor, so the canary gate cannot judge "
                       f"v{version}; it stays the candidate ({why})"), {"app": name, "skipped": "no monitor"}
    try:
        result = run_canary(admin, name, version, gate, read, sleep=sleep)
    except rollout.RolloutError as e:
        raise RetrainError(f"the canary of v{version} in {name!r} could not run ({e}); it stays the candidate") \
            from None
    canary = {"app": name, "percent": gate.percent, "shadow": gate.shadow, **result.to_dict()}
    last = (result.checks[-1].get("figures") or {}) if result.checks else {}
    canary.update(rows=last.get("candidate_rows", 0), errors=last.get("failures", 0))
    if result.promoted:
        log.info("retrain: promoted v%d in %r and the registry's production alias: %s", version, name, result.why)
        return True, f"{why}; canary: {result.why}", canary
    log.warning("retrain: canary of v%d rolled back, it stays the candidate: %s", version, result.why)
    return False, f"canary rolled back: {result.why} (holdout: {why})", canary
