"""samples/s of raysys teacher training (ddp, zero1, zero3 on Ray Train) against plain `torchrun` DDP on the
same model, data, batch and threads, in the same run.

    .venv/bin/python benchmarks/train_scaling.py [--workers 2] [--epochs 4] [--repeats 2] [--preset demo]

Each repeat runs, in turn, torchrun DDP (benchmarks/_torchrun_ddp.py) and `raysys.train.train_teacher` with
each strategy, every one with `--workers` processes x 1 intra-op thread (OMP_NUM_THREADS=1) on a local Ray
started with 2 x workers logical CPUs. Throughput is the training loop's own samples/s per epoch (global
rows / slowest rank's loop time, data iteration and preprocessing included); the first epoch of every run
is warm-up and dropped; the figure is the median over the remaining epochs of all repeats. Ratio = raysys
strategy / torchrun DDP (1.0 = as fast as plain torch). `ddp_ray_niceness15` is raysys ddp with
train.worker_niceness=None (Ray's worker niceness 15 kept), the before of the renice fix. Last line: one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STRATEGIES = ("ddp", "zero1", "zero3")
# the same ddp run with train.worker_niceness=None: Ray's own worker niceness (15), what raysys did before
# it reniced its training workers to 0 (a plain torchrun process runs at 0)
NICE15 = "ddp_ray_niceness15"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-niceness-ab", action="store_true", help=f"skip the {NICE15} variant")
    ap.add_argument("--train-rows", type=int, default=None,
                    help="training rows of the synthetic data (default: the preset's; the demo's 20k rows make "
                         "~0.35 s epochs, where per-epoch costs weigh ~15x more than in a 300k-row epoch)")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch
    from _torchrun_ddp import run_peer

    from raysys.config import preset
    from raysys.data import Preprocessor, ensure_dataset
    from raysys.models import build_model, model_spec, num_parameters
    from raysys.train import train_teacher

    tmp = Path(tempfile.mkdtemp(prefix="raysys-bench-"))
    cfg = preset(args.preset).with_root(tmp)
    if args.train_rows:
        cfg.data = cfg.data.model_copy(update=dict(num_train_rows=args.train_rows))
    cfg.train = cfg.train.model_copy(update=dict(num_workers=args.workers, num_epochs=args.epochs,
                                                 threads_per_worker=1, cpus_per_worker=1.0, max_failures=0))
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    spec = model_spec(schema, cfg.teacher)
    os.environ.pop("RAY_ADDRESS", None)
    # a private local Ray (never one someone else started on this machine)
    ray.init(address="local", num_cpus=2 * args.workers, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    runs = STRATEGIES + (() if args.no_niceness_ab else (NICE15,))
    rates: dict[str, list[float]] = {"torchrun_ddp": [], **{s: [] for s in runs}}
    t_start = time.time()
    load_start = os.getloadavg()[0]
    for r in range(args.repeats):
        out = tmp / f"torchrun-{r}.json"
        got = run_peer(args.workers, cfg.data.root, spec, out, "--epochs", str(args.epochs),
                       "--batch-size", str(cfg.train.batch_size), "--lr", str(cfg.train.lr),
                       "--weight-decay", str(cfg.train.weight_decay), "--threads", "1")["samples_per_s"][1:]
        rates["torchrun_ddp"] += got
        print(f"repeat {r}: torchrun ddp {statistics.median(got):8.0f} samples/s", flush=True)
        for s in runs:
            c = cfg.model_copy(deep=True)
            c.train.strategy = "ddp" if s == NICE15 else s
            if s == NICE15:
                c.train.worker_niceness = None
            res = train_teacher(c, schema, pre, run_name=f"bench-{s}-{r}")
            got = [m["samples_per_s"] for m in res.metrics[1:]]
            rates[s] += got
            print(f"repeat {r}: raysys {s:5s}  {statistics.median(got):8.0f} samples/s "
                  f"(val_accuracy {res.metrics[-1]['val_accuracy']:.3f})", flush=True)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    summary = {
        "benchmark": "train_scaling",
        "ratio_vs_torchrun": {s: round(med[s] / med["torchrun_ddp"], 3) for s in runs},
        "samples_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "samples_per_s_all": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "setup": {"workers": args.workers, "threads_per_worker": 1, "cpus_per_worker": 1.0,
                  "worker_niceness": cfg.train.worker_niceness, "load_avg_1m_at_start": load_start,
                  "ray_num_cpus": 2 * args.workers, "preset": args.preset, "train_rows": cfg.data.num_train_rows,
                  "global_batch": cfg.train.batch_size, "epochs_per_run": args.epochs, "warmup_epochs_dropped": 1,
                  "repeats": args.repeats, "model_spec": spec, "num_parameters": num_parameters(build_model(spec)),
                  "backend": "gloo", "machine_cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
                  "ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version(),
                  "elapsed_s": round(time.time() - t_start, 1)},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
