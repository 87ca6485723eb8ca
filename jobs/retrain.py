"""Retrain after a drift alert (submitted by the monitor through the Ray Jobs API, or by hand).

    ray job submit -- python jobs/retrain.py --root ~/raysys --preset demo --traffic-uri ~/raysys/traffic

1. Recent labelled traffic: the monitor's recent-traffic Parquet (`--traffic-uri`, `monitor.traffic_uri`)
   joined by (request_id, row) with the feedback labels the monitor writes beside it (`--labels-uri`,
   default `<traffic-uri>/labels`). Labels come late, so the job waits up to `--label-wait-s` for
   `--min-labelled-rows` of them.
2. A dataset of those rows under `<run_dir>/retrain/<run>/data`: each row goes, by a hash of its request id
   and row, to train, validation or test; the test split is the holdout the candidate is judged on and is
   never trained on. `--base-rows` rows of the served model's own training split (when its data root is
   still there) can join the train split. `retrain.json` there records where the rows came from.
3. Retrain the teacher on it with Ray Train (`--skip-teacher`: distill from the latest registered teacher
   instead), distill the student with Ray Tune and register it with alias `candidate` (never `production`):
   `raysys.pipeline.stage_teacher/stage_distill`, so the model card's data root and fingerprint name that
   dataset.
4. Judge the candidate against the served version (`--served-version`, passed by the monitor; else alias
   `production`) on the holdout. Only a candidate more than `--min-improvement` more accurate goes on.
5. Canary it: when a Serve application serves this model from this registry (`--app`, or found through
   Serve's REST API), `--canary-percent` of requests go to the candidate for `--canary-s` seconds, and
   the rows it scored and the requests it failed are read from the application's monitor.
6. Promote it (`raysys.serving.promote`: the endpoint's stable version and the `production` alias) only if
   it won on the holdout and its canary scored `--canary-min-rows` rows without a failed request; otherwise
   the canary is stopped, the candidate keeps alias `candidate`, and why is logged. With no application
   the `production` alias alone moves.

The decision and its figures go to `decision.json` beside the dataset and, as one JSON object, to the last
line of stdout. A retrain that cannot run (no traffic, too few labels, features dropped from the traffic)
exits with code 2 and one log line saying why and what to change.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysys.pipeline import job_config, job_parser  # noqa: E402

log = logging.getLogger("raysys")

SPLIT_ORDER = ("test", "validation", "train")
MIN_SPLIT_ROWS = {"train": 50, "validation": 20, "test": 20}


class RetrainError(ValueError):
    """A retrain that cannot run as asked; the message says why and what to change."""


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__, root_default=os.environ.get("RAYSYS_ROOT"), root_help="data/runs/registry root")
    p.add_argument("--registry-uri", default=None, help="registry (default: from the config / root)")
    p.add_argument("--model-name", default=None, help="registry name of the student")
    p.add_argument("--traffic-uri", default=None, help="the monitor's recent-traffic Parquet directory")
    p.add_argument("--labels-uri", default=None, help="joined feedback labels (default <traffic-uri>/labels)")
    p.add_argument("--reason", default="", help="why (the alert)")
    p.add_argument("--served-version", default=None, help="the version the endpoint serves (the baseline; "
                   "default: alias production)")
    p.add_argument("--skip-teacher", action="store_true", help="distill from the latest registered teacher")
    p.add_argument("--min-labelled-rows", type=int, default=500, help="labelled recent rows needed (default 500)")
    p.add_argument("--label-wait-s", type=float, default=600.0,
                   help="wait this long for --min-labelled-rows labels to arrive (default 600)")
    p.add_argument("--holdout-fraction", type=float, default=0.3,
                   help="labelled rows kept out of training to judge candidate vs production (default 0.3)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="labelled rows for validation (default 0.2)")
    p.add_argument("--base-rows", type=int, default=0,
                   help="rows of the served model's own training split added to the train split (default 0)")
    p.add_argument("--min-improvement", type=float, default=0.0,
                   help="holdout accuracy the candidate must beat production by to be promoted (default 0)")
    p.add_argument("--app", default=None, help="Serve application to canary in (default: the one serving "
                   "this model from this registry, if any)")
    p.add_argument("--canary-percent", type=float, default=10.0, help="share of requests the canary gets")
    p.add_argument("--canary-s", type=float, default=60.0, help="how long the canary runs before promotion")
    p.add_argument("--canary-min-rows", type=int, default=1,
                   help="rows the canary must have scored to be promoted (default 1: a candidate that never "
                        "served, e.g. one the replicas failed to load, is not promoted)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of --base-rows sampling")
    args = p.parse_args(argv)
    if not 0 < args.holdout_fraction < 1 or not 0 < args.val_fraction < 1 \
            or args.holdout_fraction + args.val_fraction >= 1:
        p.error("--holdout-fraction and --val-fraction: each in (0, 1), together below 1")
    if not 0 < args.canary_percent <= 100:
        p.error("--canary-percent: must be in (0, 100]")
    return args


# ----- recent labelled traffic ------------------------------------------------------------------------------


def _parquet_files(uri: str):
    """(filesystem, the *.parquet files directly under `uri`, oldest first)."""
    import pyarrow.fs as pafs

    if "://" in uri:
        fs, root = pafs.FileSystem.from_uri(uri)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _read_dir(uri: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, files = _parquet_files(uri)
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    return (pa.concat_tables(tables, promote_options="default") if tables else None), len(files)


def read_labelled_traffic(traffic_uri: str, labels_uri: str, schema) -> tuple[Any, dict[str, Any]]:
    """Recent traffic rows that have a label: the schema's features, the label (class index, column
    `schema.label`), request_id and row. Returns (table, counts)."""
    import numpy as np
    import pyarrow as pa

    traffic, n_traffic_files = _read_dir(traffic_uri)
    labels, n_label_files = _read_dir(labels_uri)
    info = {"traffic_uri": traffic_uri, "labels_uri": labels_uri, "traffic_files": n_traffic_files,
            "label_files": n_label_files, "traffic_rows": traffic.num_rows if traffic is not None else 0,
            "label_rows": labels.num_rows if labels is not None else 0}
    if traffic is None or labels is None:
        return None, {**info, "labelled_rows": 0}
    for col in ("request_id", "row"):
        if col not in traffic.column_names:
            raise RetrainError(f"the recent traffic at {traffic_uri} has no {col!r} column, so labels cannot be "
                               f"joined to it; keep request_id out of monitor.traffic_drop_columns")
    names = [f.name for f in schema.features]
    missing = [n for n in names if n not in traffic.column_names]
    if missing:
        raise RetrainError(f"the recent traffic lacks features {missing} (monitor.traffic_drop_columns?); "
                           "a model cannot be retrained without them")
    traffic = traffic.select([*names, "request_id", "row"])
    labels = labels.select(["request_id", "row", "label"]).rename_columns(["request_id", "row", "_label"])
    joined = traffic.join(labels, keys=["request_id", "row"], join_type="inner")
    y = schema.label_indices(np.asarray(joined.column("_label").to_pylist(), dtype=object))
    joined = joined.drop_columns(["_label"]).append_column(schema.label, pa.array(y, type=pa.int64()))
    for f in schema.categorical:  # hashed (monitor.traffic_hash_columns) or unknown categories
        seen = set(joined.column(f.name).to_pylist())
        unknown = sorted(map(str, seen - set(f.categories or [])))
        if unknown:
            raise RetrainError(f"feature {f.name!r} has values outside its categories in the recent traffic "
                               f"({unknown[:3]}...); is it in monitor.traffic_hash_columns?")
    return joined, {**info, "labelled_rows": joined.num_rows}


def wait_for_labelled_traffic(traffic_uri: str, labels_uri: str, schema, min_rows: int, wait_s: float,
                              poll_s: float = 2.0):
    """`read_labelled_traffic`, polled until it has `min_rows` rows or `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    last = -1
    while True:
        table, info = read_labelled_traffic(traffic_uri, labels_uri, schema)
        have = info["labelled_rows"]
        if have >= min_rows:
            return table, info
        if time.monotonic() >= deadline:
            raise RetrainError(
                f"only {have} labelled rows of recent traffic after waiting {wait_s:.0f}s (need --min-labelled-rows "
                f"{min_rows}; {info['traffic_rows']} traffic rows in {info['traffic_files']} files at {traffic_uri}, "
                f"{info['label_rows']} labels at {labels_uri}): send labels to /v1/feedback, or lower "
                "--min-labelled-rows / raise --label-wait-s")
        if have != last:
            log.info("retrain: %d of %d labelled rows so far (%d traffic rows); waiting up to %.0fs more", have,
                     min_rows, info["traffic_rows"], deadline - time.monotonic())
            last = have
        time.sleep(poll_s)


def assign_splits(request_ids: list[str], rows: list[int], holdout: float, val: float, seed: int) -> list[str]:
    """A split per labelled row from a hash of (seed, request id, row): stable across reruns and readers."""
    out = []
    for rid, r in zip(request_ids, rows, strict=True):
        u = zlib.crc32(f"{seed}:{rid}:{r}".encode()) / 2**32
        out.append("test" if u < holdout else "validation" if u < holdout + val else "train")
    return out


def write_dataset(root: Path, schema, recent, *, holdout: float, val: float, seed: int, base=None,
                  provenance: dict[str, Any]) -> dict[str, int]:
    """The raysys dataset layout (schema.json, train/validation/test Parquet) from the labelled recent rows
    (+ `base` rows into train), and `retrain.json` with `provenance`. Returns rows per split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [f.name for f in schema.features] + [schema.label]
    split = np.asarray(assign_splits(recent.column("request_id").to_pylist(), recent.column("row").to_pylist(),
                                     holdout, val, seed))
    data = recent.select(cols)
    counts = {}
    for name in SPLIT_ORDER:
        part = data.filter(pa.array(split == name))
        if name == "train" and base is not None and base.num_rows:
            part = pa.concat_tables([part, base.select(cols).cast(part.schema)])
        counts[name] = part.num_rows
        if part.num_rows < MIN_SPLIT_ROWS[name]:
            raise RetrainError(
                f"{recent.num_rows} labelled rows give {counts.get('test', 0)} holdout / "
                f"{counts.get('validation', 0)} validation / {counts.get('train', '?')} train rows; the {name} "
                f"split needs at least {MIN_SPLIT_ROWS[name]}: raise --min-labelled-rows or change "
                "--holdout-fraction / --val-fraction")
        (root / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(part, root / name / "part-00000.parquet")
    schema.save(root)
    (root / "retrain.json").write_text(json.dumps({**provenance, "split_rows": counts}, indent=2, default=str))
    return counts


def base_rows(loaded, n: int, seed: int):
    """`n` rows of the training split the served version was trained on, when its data root is still there."""
    import numpy as np

    from raysys.data import read_split

    root = ((loaded.config or {}).get("data") or {}).get("root")
    if n <= 0:
        return None
    if not root or not (Path(root) / "train").is_dir():
        log.warning("retrain: --base-rows %d ignored: v%d records no training data root that still exists (%s)", n,
                    loaded.version, root)
        return None
    table = read_split(root, "train")
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, min(n, table.num_rows), replace=False))
    return table.take(idx)


# ----- judge, canary, promote ------------------------------------------------------------------------------


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
    from serve.app import resolve_registry_uri

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
    fails half-way is undone (`raysys.serving.rollback`) before the error goes up."""
    from raysys import serving

    name = app["name"]
    before = _monitor_counts(app, version) or (0, 0)
    t0 = time.monotonic()
    try:
        serving.canary(admin, name, version, percent)
    except serving.RolloutError as e:
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
            serving.promote(admin, name)
            log.info("retrain: promoted v%d in %r and the registry's production alias: %s", version, name, why)
        else:
            serving.rollback(admin, name)  # with a canary running: stops it, all traffic back to the stable one
            log.warning("retrain: canary of v%d stopped, it stays the candidate: %s", version, why)
        return wins, why, canary
    except BaseException:
        try:
            serving.rollback(admin, name)
        except Exception as e:
            log.error("retrain: could not undo the rollout in %r: %s", name, e)
        raise


# ----- the job -----------------------------------------------------------------------------------------


def _job_submission_id() -> str | None:
    """The Ray Jobs API submission id of this run (None when run by hand): the job supervisor hands the
    driver its job config, metadata included, in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}
    except ValueError:
        return None
    return meta.get("job_submission_id")


def retrain(args: argparse.Namespace) -> dict[str, Any]:
    from raysys.data import fingerprint
    from raysys.monitor.retrain import labels_uri
    from raysys.pipeline import (
        TEACHER_SUFFIX,
        Prepared,
        StageTimer,
        absolute,
        init_ray,
        stage_data,
        stage_distill,
        stage_teacher,
    )
    from raysys.registry import Registry

    try:
        cfg = job_config(args)
    except ValueError as e:  # names the field
        raise RetrainError(f"config: {e}") from None
    if args.registry_uri:
        cfg.registry_uri = args.registry_uri
    if args.model_name:
        cfg.model_name = args.model_name
    cfg = absolute(cfg)
    if not args.traffic_uri:
        raise RetrainError("--traffic-uri: a retrain trains on recent labelled traffic; set monitor.traffic_uri "
                           "so the monitor writes it (and passes it here)")
    reg = Registry(cfg.registry_uri)
    name = cfg.model_name
    baseline_ref = args.served_version or "production"
    try:
        served = reg.load(name, baseline_ref)
    except Exception as e:
        raise RetrainError(f"no {name} {baseline_ref} in the registry at {cfg.registry_uri} to retrain: {e}") from e
    schema = served.schema
    log.info("retrain: %s, reason %r; baseline %s v%d", name, args.reason, baseline_ref, served.version)
    timer = StageTimer()
    init_ray()

    labels = args.labels_uri or labels_uri(args.traffic_uri)
    recent, info = timer.run("labels", wait_for_labelled_traffic, args.traffic_uri, labels, schema,
                             args.min_labelled_rows, args.label_wait_s)
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out_dir = Path(cfg.run_dir) / "retrain" / run
    data_root = out_dir / "data"
    base = base_rows(served, args.base_rows, args.seed)
    provenance = {"reason": args.reason, "model": name, "served_version": served.version, **info,
                  "base_rows": base.num_rows if base is not None else 0,
                  "job_id": _job_submission_id(),
                  "created_at": time.time()}
    counts = write_dataset(data_root, schema, recent, holdout=args.holdout_fraction, val=args.val_fraction,
                           seed=args.seed, base=base, provenance=provenance)
    log.info("retrain: dataset %s from %d labelled recent rows (+%d base): %s", data_root, info["labelled_rows"],
             provenance["base_rows"], counts)
    cfg.data.source, cfg.data.root = "parquet", str(data_root)

    if args.skip_teacher:
        try:
            teacher = reg.load(name + TEACHER_SUFFIX, "latest")
        except Exception as e:
            raise RetrainError(f"--skip-teacher: no registered teacher {name}{TEACHER_SUFFIX} to distill from ({e}); "
                               "drop --skip-teacher to retrain one") from e
        # the teacher reads features through the preprocessor it was trained with
        prep = Prepared(schema, teacher.preprocessor, fingerprint(data_root))
        t_model, t_version, t_metrics = teacher.model, teacher.version, teacher.metrics.get("test", {})
    else:
        prep = timer.run("data", stage_data, cfg)
        t_model, t_version, t_metrics = timer.run("teacher", stage_teacher, cfg, prep)
    version, metrics, best = timer.run("distill", stage_distill, cfg, prep, t_model, t_version, t_metrics,
                                       alias="candidate", lineage={"retrain": provenance})
    candidate = reg.get_alias(name, "candidate")  # the int8 variant when distill.quantize registered one

    from raysys.data import read_split

    holdout = read_split(data_root, "test")
    cand_acc = holdout_accuracy(reg, name, candidate, holdout)
    prod_acc = holdout_accuracy(reg, name, served.version, holdout)
    wins, why = judge(cand_acc, prod_acc, args.min_improvement)
    log.info("retrain: %s", why)

    promoted, canary = False, None
    from raysys.serving import ServeAdmin, cluster_dashboard_url

    dashboard = cluster_dashboard_url()
    app = None
    if dashboard:
        try:
            app = find_app(ServeAdmin(dashboard), reg.uri, name, args.app)
        except RetrainError:
            raise
        except Exception as e:  # Serve's REST API unreachable: as if no application served the model
            if args.app:
                raise RetrainError(f"--app {args.app!r}: cannot read Serve's applications at {dashboard}: {e}") from e
            log.warning("retrain: cannot read Serve's applications at %s (%s); no canary", dashboard, e)
    if app is None:
        canary = {"skipped": "no Serve application serves this model from this registry"
                  if dashboard else "this Ray cluster runs no dashboard (Serve's REST API)"}
        if wins:
            reg.set_alias(name, "production", candidate)
            promoted = True
            why += "; no endpoint to canary in, so only the registry's production alias moved"
    elif wins:
        promoted, why, canary = timer.run("canary", canary_then_decide, ServeAdmin(dashboard), app, candidate, wins,
                                          why, args.canary_percent, args.canary_s, args.canary_min_rows)
    else:
        canary = {"skipped": "the candidate lost on the holdout"}
    decision = {"model": name, "candidate_version": candidate, "student_version": version, "alias": "candidate",
                "promoted": promoted, "why": why, "reason": args.reason,
                "holdout": {"rows": holdout.num_rows, "candidate_accuracy": cand_acc, "production_accuracy": prod_acc,
                            "production_version": served.version},
                "canary": canary, "data": {"root": str(data_root), "fingerprint": prep.fingerprint,
                                           "split_rows": counts, **info},
                "teacher_version": t_version, "best_distill_config": best,
                "test_accuracy": metrics.get("accuracy"), "stage_seconds": timer.times}
    (out_dir / "decision.json").write_text(json.dumps(decision, indent=2, default=str))
    log.info("retrain: %s v%d %s (%s); decision in %s", name, candidate,
             "promoted to production" if promoted else "stays candidate", why, out_dir / "decision.json")
    return decision


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        decision = retrain(args)
    except RetrainError as e:
        log.error("retrain failed: %s", e)
        print(json.dumps({"error": str(e), "reason": args.reason}))
        return 2
    print(json.dumps(decision, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
