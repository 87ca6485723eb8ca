"""Retrain after a drift alert (submitted by the monitor through the Ray Jobs API, or by hand).

    ray job submit --working-dir . -- python jobs/retrain.py --root ~/raysys --preset demo

Runs the same stages as the pipeline: data -> teacher (Ray Train) -> distillation (Ray Tune) and registers
the new student as `candidate` (never `production`): promotion after a canary that beats production on
recent labelled traffic is a follow-up (see docs). `--traffic-uri` names the monitor's recent-traffic
Parquet; it is logged and recorded in the candidate's lineage (training on labelled recent traffic is the
follow-up that needs delayed labels joined into it). `--skip-teacher` reuses the latest registered teacher.
Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysys.pipeline import job_config, job_parser  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__, root_default=os.environ.get("RAYSYS_ROOT"), root_help="data/runs/registry root")
    p.add_argument("--registry-uri", default=None, help="registry (default: from the config / root)")
    p.add_argument("--model-name", default=None, help="registry name of the student")
    p.add_argument("--alias", default="candidate", help="alias the new student gets (default candidate)")
    p.add_argument("--traffic-uri", default=None, help="the monitor's recent-traffic Parquet directory")
    p.add_argument("--reason", default="", help="why (the alert)")
    p.add_argument("--skip-teacher", action="store_true", help="distill from the latest registered teacher")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from raysys.pipeline import absolute, init_ray, load_teacher, stage_data, stage_distill, stage_teacher

    cfg = job_config(args)
    if args.registry_uri:
        cfg.registry_uri = args.registry_uri
    if args.model_name:
        cfg.model_name = args.model_name
    cfg = absolute(cfg)
    init_ray()
    traffic_rows = None
    if args.traffic_uri:
        try:
            import pyarrow.dataset as ds

            traffic_rows = ds.dataset(args.traffic_uri, format="parquet").count_rows()
        except Exception as e:  # no traffic written yet: retrain on the dataset alone
            logging.getLogger("raysys").warning("retrain: cannot read traffic at %s: %s", args.traffic_uri, e)
    logging.getLogger("raysys").info("retrain: reason %r, recent traffic rows %s", args.reason, traffic_rows)
    prep = stage_data(cfg)
    if args.skip_teacher:
        teacher, t_version, t_metrics = load_teacher(cfg)
    else:
        teacher, t_version, t_metrics = stage_teacher(cfg, prep)
    version, metrics, best = stage_distill(cfg, prep, teacher, t_version, t_metrics, alias=args.alias)
    print(json.dumps({"model": cfg.model_name, "version": version, "alias": args.alias, "reason": args.reason,
                      "test_accuracy": metrics.get("accuracy"), "traffic_rows": traffic_rows,
                      "best_distill_config": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
