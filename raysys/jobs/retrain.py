"""Retrain after a drift alert, as a Ray job (submitted by the monitor through the Ray Jobs API, or by hand).

    ray job submit -- python jobs/retrain.py --root ~/raysys --preset demo --traffic-uri ~/raysys/traffic

Joins the monitor's recent traffic (`--traffic-uri`, `monitor.traffic_uri`) with the feedback labels the
monitor writes beside it (`--labels-uri`, default `<traffic-uri>/labels`), waiting up to `--label-wait-s`
for `--min-labelled-rows` of them; writes a dataset of those rows under `<run_dir>/retrain/<run>/data`
(the test split is the holdout, never trained on; `--base-rows` rows of the served model's own training
split can join the train split); retrains the teacher on it with Ray Train (`--skip-teacher`: distill from
the latest registered teacher instead), distills the student with Ray Tune and registers it with alias
`candidate`. Only a candidate more than `--min-improvement` more accurate than the served version
(`--served-version`, else alias `production`) on the holdout goes on: to a canary of `--canary-percent` of
requests in the Serve application serving this model (`--app`, or found through Serve's REST API), behind the
config's metric gate (`canary:` in the config: rows, non-5xx ratio, p99 against stable, agreement, live
accuracy, over several checks; `--canary-*` flags override it), which promotes it or rolls it back naming the
failed check; with no application the `production` alias alone moves.

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

from raysys.jobs.common import job_config, job_parser

log = logging.getLogger("raysys")


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
    p.add_argument("--canary-percent", type=float, default=None,
                   help="share of requests the canary gets (default: canary.percent, 10)")
    p.add_argument("--canary-s", type=float, default=None, help="how long the gate watches before it can promote: "
                   "canary.intervals checks spread over it (default: canary.interval_s x canary.intervals, 30)")
    p.add_argument("--canary-min-rows", type=int, default=None,
                   help="rows the candidate must have scored before a check counts (default: canary.min_rows, 200)")
    p.add_argument("--canary-shadow", action="store_true",
                   help="shadow mode: the candidate scores a copy of its share, users get stable's answers")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of --base-rows sampling")
    args = p.parse_args(argv)
    if not 0 < args.holdout_fraction < 1 or not 0 < args.val_fraction < 1 \
            or args.holdout_fraction + args.val_fraction >= 1:
        p.error("--holdout-fraction and --val-fraction: each in (0, 1), together below 1")
    if args.canary_percent is not None and not 0 < args.canary_percent <= 100:
        p.error("--canary-percent: must be in (0, 100]")
    return args


def main(argv=None) -> int:
    from raysys.workflow.retrain import RetrainError, retrain

    args = parse_args(argv)
    try:
        try:
            cfg = job_config(args)
        except ValueError as e:  # names the field
            raise RetrainError(f"config: {e}") from None
        decision = retrain(cfg, args)
    except RetrainError as e:
        log.error("retrain failed: %s", e)
        print(json.dumps({"error": str(e), "reason": args.reason}))
        return 2
    print(json.dumps(decision, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
