"""Retrain a served model on its recent labelled traffic, then promote the result only if it is better.

`retrain(args)` runs, in order:

1. the labelled recent traffic (`labelled_traffic`): the monitor's recent-traffic Parquet joined with the
   feedback labels, waited for until there are `min_labelled_rows`;
2. a dataset of those rows under `<run_dir>/retrain/<run>/data` (train / validation / test; the test
   split is the holdout), with `base_rows` rows of the served model's own training split in train, and
   `retrain.json` recording where the rows came from;
3. the candidate: the teacher retrained on it with Ray Train (or, with `skip_teacher`, the latest
   registered one), the student distilled with Ray Tune and registered with alias `candidate` (never
   `production`), through the same stages as the first training;
4. the judgement (`promotion`): only a candidate more than `min_improvement` more accurate than the served
   version on the holdout, whose model card shows no trust check failing beyond its `governance.thresholds`
   bound (robustness, membership inference, protected-group gaps, DP epsilon), goes on;
5. the canary in the Serve application that serves this model from this registry, then promotion (the
   endpoint's stable version and the `production` alias) or the canary stopped; with no application the
   `production` alias alone moves.

The decision and its figures go to `decision.json` beside the dataset. A retrain that cannot run as asked
raises `RetrainError`, whose message says why and what to change.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysys.config import PipelineConfig
from raysys.workflow.labelled_traffic import RetrainError, base_rows, wait_for_labelled_traffic, write_dataset
from raysys.workflow.promotion import (
    AGREEMENT_TOLERANCE,
    canary_then_decide,
    expected_agreement,
    find_app,
    governance_gate,
    holdout_accuracy,
    judge,
)
from raysys.workflow.stages import StageTimer

log = logging.getLogger("raysys")

__all__ = ["RetrainError", "retrain"]


@dataclass
class _Dataset:
    out_dir: Path  # the run's directory: the dataset and decision.json
    root: Path
    info: dict[str, Any]  # where the rows came from and how many
    counts: dict[str, int]  # rows per split
    provenance: dict[str, Any]


@dataclass
class _Candidate:
    version: int  # the version with alias `candidate` (the int8 variant when one was registered)
    student_version: int
    teacher_version: int
    metrics: dict
    best: dict
    fingerprint: str


def retrain(cfg: PipelineConfig, args) -> dict[str, Any]:
    """Run the retrain that `cfg` (the job's config) and the retrain job's arguments
    (`raysys.jobs.retrain.parse_args`) ask for; returns the decision."""
    from raysys.registry import Registry
    from raysys.workflow.cluster import init_ray

    cfg = _retrain_config(cfg, args)
    reg = Registry(cfg.registry_uri)
    served = _load_served(reg, cfg, args)
    timer = StageTimer()
    init_ray()
    data = _build_dataset(cfg, args, served, timer)
    cfg.data.source, cfg.data.root = "parquet", str(data.root)
    cand = _train_candidate(cfg, args, reg, served.schema, data, timer)

    from raysys.data import read_split

    holdout = read_split(data.root, "test")
    cand_acc = holdout_accuracy(reg, cfg.model_name, cand.version, holdout)
    prod_acc = holdout_accuracy(reg, cfg.model_name, served.version, holdout)
    wins, why = judge(cand_acc, prod_acc, args.min_improvement)
    wins, why, failed = governance_gate(reg, cfg.model_name, cand.version, wins, why)
    log.info("retrain: %s", why)
    agreement = expected_agreement(reg, cfg.model_name, cand.version, served.version, holdout)
    gate = canary_gate(cfg, args, agreement)
    promoted, why, canary = _canary_then_promote(cfg, args, reg, cand.version, wins, why, timer, gate)
    decision = {"model": cfg.model_name, "candidate_version": cand.version, "student_version": cand.student_version,
                "alias": "candidate", "promoted": promoted, "why": why, "reason": args.reason,
                "holdout": {"rows": holdout.num_rows, "candidate_accuracy": cand_acc, "production_accuracy": prod_acc,
                            "production_version": served.version, "agreement": agreement},
                "failed_trust_checks": failed, "canary": canary, "data": {"root": str(data.root), "fingerprint": cand.fingerprint,
                                           "split_rows": data.counts, **data.info},
                "teacher_version": cand.teacher_version, "best_distill_config": cand.best,
                "test_accuracy": cand.metrics.get("accuracy"), "stage_seconds": timer.times}
    (data.out_dir / "decision.json").write_text(json.dumps(decision, indent=2, default=str))
    log.info("retrain: %s v%d %s (%s); decision in %s", cfg.model_name, cand.version,
             "promoted to production" if promoted else "stays candidate", why, data.out_dir / "decision.json")
    return decision


def _retrain_config(cfg: PipelineConfig, args) -> PipelineConfig:
    from raysys.workflow.stages import absolute

    cfg = cfg.model_copy(deep=True)
    if args.registry_uri:
        cfg.registry_uri = args.registry_uri
    if args.model_name:
        cfg.model_name = args.model_name
    cfg = absolute(cfg)
    if not args.traffic_uri:
        raise RetrainError("--traffic-uri: a retrain trains on recent labelled traffic; set monitor.traffic_uri "
                           "so the monitor writes it (and passes it here)")
    return cfg


def _load_served(reg, cfg: PipelineConfig, args):
    """The version the endpoint serves (`served_version`, else alias production): the baseline."""
    baseline_ref = args.served_version or "production"
    try:
        served = reg.load(cfg.model_name, baseline_ref)
    except Exception as e:
        raise RetrainError(f"no {cfg.model_name} {baseline_ref} in the registry at {cfg.registry_uri} to "
                           f"retrain: {e}") from e
    log.info("retrain: %s, reason %r; baseline %s v%d", cfg.model_name, args.reason, baseline_ref, served.version)
    return served


def _job_submission_id() -> str | None:
    """The Ray Jobs API submission id of this run (None when run by hand): the job supervisor hands the
    driver its job config, metadata included, in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}
    except ValueError:
        return None
    return meta.get("job_submission_id")


def _build_dataset(cfg: PipelineConfig, args, served, timer: StageTimer) -> _Dataset:
    from raysys.monitor.store import labels_uri

    labels = args.labels_uri or labels_uri(args.traffic_uri)
    recent, info = timer.run("labels", wait_for_labelled_traffic, args.traffic_uri, labels, served.schema,
                             args.min_labelled_rows, args.label_wait_s)
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out_dir = Path(cfg.run_dir) / "retrain" / run
    data_root = out_dir / "data"
    base = base_rows(served, args.base_rows, args.seed)
    provenance = {"reason": args.reason, "model": cfg.model_name, "served_version": served.version, **info,
                  "base_rows": base.num_rows if base is not None else 0,
                  "job_id": _job_submission_id(),
                  "created_at": time.time()}
    counts = write_dataset(data_root, served.schema, recent, holdout=args.holdout_fraction, val=args.val_fraction,
                           seed=args.seed, base=base, provenance=provenance)
    log.info("retrain: dataset %s from %d labelled recent rows (+%d base): %s", data_root, info["labelled_rows"],
             provenance["base_rows"], counts)
    return _Dataset(out_dir, data_root, info, counts, provenance)


def _train_candidate(cfg: PipelineConfig, args, reg, schema, data: _Dataset, timer: StageTimer) -> _Candidate:
    """Teacher (retrained, or the registered one with `skip_teacher`), then the distilled student with
    alias `candidate`."""
    from raysys.data import fingerprint
    from raysys.workflow.stages import TEACHER_SUFFIX, Prepared, stage_data, stage_distill, stage_teacher

    name = cfg.model_name
    if args.skip_teacher:
        try:
            teacher = reg.load(name + TEACHER_SUFFIX, "latest")
        except Exception as e:
            raise RetrainError(f"--skip-teacher: no registered teacher {name}{TEACHER_SUFFIX} to distill from ({e}); "
                               "drop --skip-teacher to retrain one") from e
        # the teacher reads features through the preprocessor it was trained with
        prep = Prepared(schema, teacher.preprocessor, fingerprint(data.root))
        t_model, t_version, t_metrics = teacher.model, teacher.version, teacher.metrics.get("test", {})
    else:
        prep = timer.run("data", stage_data, cfg)
        t_model, t_version, t_metrics = timer.run("teacher", stage_teacher, cfg, prep)
    version, metrics, best = timer.run("distill", stage_distill, cfg, prep, t_model, t_version, t_metrics,
                                       alias="candidate", lineage={"retrain": data.provenance})
    candidate = reg.get_alias(name, "candidate")  # the int8 variant when distill.quantize registered one
    return _Candidate(candidate, version, t_version, metrics, best, prep.fingerprint)


def _canary_then_promote(cfg: PipelineConfig, args, reg, candidate: int, wins: bool, why: str,
                         timer: StageTimer, gate) -> tuple[bool, str, dict[str, Any]]:
    """(promoted, why, canary figures): a winner is canaried in the application serving the model, or,
    with none, only the registry's production alias moves to it."""
    from serve.rollout import ServeAdmin, cluster_dashboard_url

    dashboard = cluster_dashboard_url()
    app = _serving_app(dashboard, reg.uri, cfg.model_name, args.app)
    if app is None:
        canary = {"skipped": "no Serve application serves this model from this registry"
                  if dashboard else "this Ray cluster runs no dashboard (Serve's REST API)"}
        if not wins:
            return False, why, canary
        reg.set_alias(cfg.model_name, "production", candidate)
        return True, why + "; no endpoint to canary in, so only the registry's production alias moved", canary
    _reconcile(ServeAdmin(dashboard), app["name"])
    if not wins:
        return False, why, {"skipped": "the candidate lost on the holdout"}
    return timer.run("canary", canary_then_decide, ServeAdmin(dashboard), app, candidate, why, gate)


def _reconcile(admin, app_name: str) -> None:
    """Finish or undo what an earlier rollout of the application left half-done (a killed job's canary)."""
    from serve import rollout

    try:
        done = rollout.status(admin, app_name)["reconciled"]
    except Exception as e:
        log.warning("retrain: could not check %r for a half-done rollout: %s", app_name, e)
        return
    for line in done:
        log.warning("retrain: %r had a half-done rollout: %s", app_name, line)


def canary_gate(cfg: PipelineConfig, args, holdout_agreement: float | None = None) -> Any:
    """The config's canary gate with the job's --canary-* flags applied; its agreement bound no higher than
    the candidate's agreement with production on the holdout allows (see `expected_agreement`)."""
    changes: dict[str, Any] = {}
    if holdout_agreement is not None:
        changes["min_agreement"] = min(cfg.canary.min_agreement, max(0.0, holdout_agreement - AGREEMENT_TOLERANCE))
    if args.canary_percent is not None:
        changes["percent"] = args.canary_percent
    if args.canary_min_rows is not None:
        changes["min_rows"] = args.canary_min_rows
    if args.canary_shadow:
        changes["shadow"] = True
    if args.canary_s is not None:  # the canary's length: its checks spread over it
        changes["interval_s"] = args.canary_s / cfg.canary.intervals
    return cfg.canary.model_validate({**cfg.canary.model_dump(), **changes})


def _serving_app(dashboard: str | None, registry_uri: str, model_name: str, app: str | None) -> dict | None:
    """The Serve application to canary in (None: none serves the model, or Serve's REST API is unreachable
    and no `app` was named)."""
    from serve.rollout import ServeAdmin

    if not dashboard:
        return None
    try:
        return find_app(ServeAdmin(dashboard), registry_uri, model_name, app)
    except RetrainError:
        raise
    except Exception as e:  # Serve's REST API unreachable: as if no application served the model
        if app:
            raise RetrainError(f"--app {app!r}: cannot read Serve's applications at {dashboard}: {e}") from e
        log.warning("retrain: cannot read Serve's applications at %s (%s); no canary", dashboard, e)
        return None
