"""Judge a retrained candidate against the served version on the holdout, canary it in the Serve
application that serves the model, then promote it or stop the canary."""

from __future__ import annotations

import logging
import time
from typing import Any

from raysys.workflow.labelled_traffic import RetrainError

log = logging.getLogger("raysys")


def holdout_accuracy(reg, name: str, version: int, holdout) -> float:
    """Accuracy of registered `version` on the raw holdout rows (through its own preprocessor)."""
    from raysys.models import predict_logits

    loaded = reg.load(name, version)
    x_num, x_cat, y = loaded.preprocessor.transform_table(holdout)
    return float((predict_logits(loaded.model, x_num, x_cat).argmax(1).numpy() == y).mean())


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


def _monitor_counts(app: dict, version: int) -> tuple[int, int] | None:
    """(rows predicted, requests failed) for `version` so far, from the application's monitor actor."""
    import ray

    args = app.get("args") or {}
    if args.get("monitor") is False:
        return None
    try:
        handle = ray.get_actor(args.get("monitor_name") or "raysys_monitor",
                               namespace=args.get("monitor_namespace") or "raysys")
        rep = ray.get(handle.report.remote(), timeout=30)
    except Exception as e:
        log.warning("retrain: cannot read the monitor during the canary: %s", e)
        return None
    return int(rep["predictions_by_version"].get(str(version), 0)), int(rep["errors_by_version"].get(str(version), 0))


def canary_then_decide(admin, app: dict, version: int, wins: bool, why: str, percent: float, seconds: float,
                       min_rows: int) -> tuple[bool, str, dict[str, Any]]:
    """Canary `version` in `app` for `seconds`, then promote it (when it `wins`, scored at least `min_rows`
    rows and failed no request) or stop the canary. Returns (promoted, why, canary figures). A rollout that
    fails half-way is undone (`serve.rollout.rollback`) before the error goes up."""
    from serve import rollout

    name = app["name"]
    before = _monitor_counts(app, version) or (0, 0)
    t0 = time.monotonic()
    try:
        # the generation this job wrote: promote/rollback below refuse if somebody changed the rollout since
        gen = rollout.canary(admin, name, version, percent)["rollout_generation"]
    except rollout.RolloutError as e:
        raise RetrainError(f"the canary of v{version} in {name!r} could not start ({e}); it stays the "
                           "candidate") from None
    try:
        log.info("retrain: canary v%d at %g%% of %r for %.0fs", version, percent, name, seconds)
        time.sleep(seconds)
        after = _monitor_counts(app, version)
        canary: dict[str, Any] = {"app": name, "percent": percent, "seconds": round(time.monotonic() - t0, 1)}
        if after is not None:
            canary.update(rows=after[0] - before[0], errors=after[1] - before[1])
        if canary.get("errors"):
            wins, why = False, f"the canary failed {canary['errors']} requests; {why}"
        elif after is not None and canary["rows"] < min_rows:
            wins, why = False, (f"the canary scored {canary['rows']} rows in {canary['seconds']}s (--canary-min-rows "
                                f"{min_rows}: no traffic, or the replicas could not load v{version}; see /healthz); "
                                f"{why}")
        if wins:
            rollout.promote(admin, name, expect_generation=gen)
            log.info("retrain: promoted v%d in %r and the registry's production alias: %s", version, name, why)
        else:
            # with a canary running: stops it, all traffic back to the stable one
            rollout.rollback(admin, name, expect_generation=gen)
            log.warning("retrain: canary of v%d stopped, it stays the candidate: %s", version, why)
        return wins, why, canary
    except BaseException:
        try:
            rollout.rollback(admin, name, expect_generation=gen)
        except Exception as e:
            log.error("retrain: could not undo the rollout in %r: %s", name, e)
        raise
