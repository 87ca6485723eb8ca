"""Teacher training as a Ray job, with the same strategy flags as `raysys train`.

    ray job submit --working-dir . -- python jobs/train_teacher.py --preset demo --strategy zero3 --workers 4
    ray job submit --working-dir . -- python jobs/train_teacher.py --teacher-family ft_transformer --teacher-size small \
        --strategy pipeline --workers 4

Runs data -> teacher (Ray Train, the chosen parallel strategy) -> test metrics -> registry (consolidated
safetensors weights) on the cluster the job was submitted to, and prints one JSON line with the teacher's
registry version, test metrics, final epoch metrics (per-rank memory included) and checkpoint.
`--root` must be storage every node can reach (a shared filesystem on multi-node clusters); it defaults
to $RAYSYS_ROOT or ~/raysys.
"""

from __future__ import annotations

import argparse
import json
import sys

from raysys.jobs.common import job_config, job_parser
from raysys.parallel import STRATEGIES
from raysys.workflow.overrides import TEACHER_FAMILIES, TEACHER_SIZES, train_overrides


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__)
    p.add_argument("--strategy", choices=STRATEGIES, default=None, help="train.strategy")
    p.add_argument("--workers", type=int, default=None, help="train.num_workers (Ray Train workers)")
    p.add_argument("--dp", type=int, default=None, help="train.parallel.dp")
    p.add_argument("--tp", type=int, default=None, help="train.parallel.tp")
    p.add_argument("--pp", type=int, default=None, help="train.parallel.pp")
    p.add_argument("--max-worker-memory-gb", type=float, default=None, help="train.max_worker_memory_gb")
    p.add_argument("--teacher-family", choices=TEACHER_FAMILIES, default=None, help="teacher.family")
    p.add_argument("--teacher-size", choices=TEACHER_SIZES, default=None,
                   help="teacher.size (ft_transformer; implies --teacher-family ft_transformer)")
    p.add_argument("--gpu", action="store_true", help="train.use_gpu: one GPU per worker (the cluster must have them)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = train_overrides(args.strategy, args.workers, args.dp, args.tp, args.pp, args.max_worker_memory_gb,
                                args.teacher_family, args.teacher_size, gpu=args.gpu)
    try:
        cfg = job_config(args, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from raysys.workflow.cluster import init_ray
    from raysys.workflow.stages import absolute, stage_data, stage_quality, stage_teacher

    cfg = absolute(cfg)
    init_ray()
    prep = stage_data(cfg)
    try:
        stage_quality(cfg, prep)  # a data quality refusal names the check and rows
        _, version, metrics = stage_teacher(cfg, prep)
    except ValueError as e:  # e.g. the memory budget refusal, naming a strategy and worker count that fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"teacher_version": version, "strategy": cfg.train.strategy,
                      "num_workers": cfg.train.num_workers, "test": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
