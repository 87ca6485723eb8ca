"""The distillation sweep as a Ray job.

    ray job submit --working-dir . -- python jobs/distill_sweep.py --preset demo --root /shared/raysys

Computes the registered teacher's soft targets once with Ray Data, runs the Ray Tune sweep (ASHA + Optuna
over temperature, alpha, lr, student width and depth, unless the config says grid), picks the smallest
student within `distill.accuracy_gap` of the teacher, evaluates it, and registers it (alias `production`)
and its dynamic-int8 variant (alias `candidate`), each with a model card. `--train-teacher` trains and
registers a teacher first when the registry has none. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from raysys.jobs.common import job_config, job_parser
from raysys.workflow.overrides import distill_overrides


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__)
    p.add_argument("--teacher", default="latest", help="teacher version or alias in the registry")
    p.add_argument("--train-teacher", action="store_true", help="train and register a teacher if none exists")
    p.add_argument("--search", choices=["grid", "optuna", "random"], default=None, help="override distill.search")
    p.add_argument("--num-samples", type=int, default=None, help="override distill.num_samples")
    p.add_argument("--resume-sweep", default=None, metavar="NAME",
                   help="go on with this interrupted sweep (its directory under run_dir) instead of a new one")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from raysys.workflow.cluster import dashboard_url, init_ray
    from raysys.workflow.stages import (
        absolute,
        load_teacher,
        stage_data,
        stage_distill,
        stage_quality,
        stage_teacher,
    )

    try:
        cfg = absolute(job_config(args, distill_overrides(args.search, args.num_samples)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ctx = init_ray()
    print(f"Ray dashboard: {dashboard_url(ctx)}")
    prep = stage_data(cfg)
    try:
        stage_quality(cfg, prep)  # reused when the teacher's run wrote it; on the student's card
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        teacher, t_version, t_metrics = load_teacher(cfg, args.teacher)
    except ValueError as e:
        if not args.train_teacher:
            print(f"error: {e}\nno teacher to distill: run `raysys train` first or pass --train-teacher",
                  file=sys.stderr)
            return 2
        teacher, t_version, t_metrics = stage_teacher(cfg, prep)
    try:
        version, metrics, best = stage_distill(cfg, prep, teacher, t_version, t_metrics,
                                               resume_sweep=args.resume_sweep)
    except ValueError as e:  # a setting the user got wrong (e.g. no sweep of that name to resume)
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_result(cfg, version, metrics, best, t_version)
    return 0


def _print_result(cfg, version: int, metrics: dict, best: dict, t_version: int) -> None:
    """The student's model card, then the one-line JSON summary as the last line."""
    import ray

    from raysys.registry import Registry

    _, _, card_md = Registry(cfg.registry_uri).model_card(cfg.model_name, version)
    ray.shutdown()  # flushes the workers' deduplicated log lines, so the JSON below stays the last line
    print(card_md or "")
    print(json.dumps({"model": cfg.model_name, "student_version": version, "teacher_version": t_version,
                      "best": best, "test_accuracy": metrics["accuracy"], "num_parameters": metrics["num_parameters"],
                      "teacher_agreement": metrics.get("teacher_agreement"),
                      "int8_variant": metrics.get("int8_variant")}, default=str))


if __name__ == "__main__":
    sys.exit(main())
