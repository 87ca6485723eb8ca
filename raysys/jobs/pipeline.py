"""The whole loop as a Ray job.

    ray job submit --working-dir . -- python jobs/pipeline.py --preset demo

Runs data -> teacher (Ray Train) -> distillation (Ray Tune) -> registry -> Ray Serve endpoint -> normal and
drifted traffic -> monitor report, on the cluster the job was submitted to, and writes the HTML report
(`<root>/report.html`, see `raysys report`). The endpoint keeps serving after the job ends. `--root` must be storage every node can reach (a shared filesystem on multi-node clusters);
it defaults to $RAYSYS_ROOT or ~/raysys, outside the job's temporary working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from raysys.jobs.common import job_config, job_parser


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__)
    p.add_argument("--port", type=int, default=None, help="Serve HTTP port (default from config: 8000)")
    p.add_argument("--no-serve", action="store_true", help="stop after registering the student")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = job_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.port is not None:
        cfg.serve.port = args.port
    from raysys.workflow.cluster import dashboard_url, init_ray
    from raysys.workflow.stages import run_pipeline
    from raysys.workflow.traffic import exercise_endpoint, format_report

    ctx = init_ray(serving=not args.no_serve)
    print(f"Ray dashboard: {dashboard_url(ctx)}")
    from raysys.report import record_monitor_report, run_root, write_run_report

    result = run_pipeline(cfg)
    if args.no_serve:
        print(f"report: {write_run_report(cfg.registry_uri)}")
    print(json.dumps(result.summary(), indent=2))
    if args.no_serve:
        return 0
    from serve.apikey import API_TOKEN_FILE_ENV, key_usage
    from serve.app import deploy

    url = deploy(cfg)
    print(f"HTTP endpoint: {url}")
    if os.environ.get(API_TOKEN_FILE_ENV):
        print(key_usage(os.environ[API_TOKEN_FILE_ENV], url))
    out = exercise_endpoint(cfg, url)
    print("monitor after normal traffic:\n" + format_report(out["normal_report"]))
    print(f"monitor after traffic shifted {out['shift_sigma']} sigma on {out['drift_feature']}:\n"
          + format_report(out["drift_report"]))
    print(f"bad request -> HTTP {out['bad_request']['status']}: {json.dumps(out['bad_request']['body'])}")
    if (root := run_root(cfg.registry_uri)) is not None:
        record_monitor_report(root, out["normal_report"], "normal traffic")
        record_monitor_report(root, out["drift_report"], f"shifted {out['shift_sigma']} sigma")
    report = write_run_report(cfg.registry_uri)
    print(json.dumps({"endpoint": url, "dashboard": dashboard_url(ctx), "report": str(report) if report else None,
                      **result.summary(),
                      "alerts": out["drift_report"].get("alerts")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
