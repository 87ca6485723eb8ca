"""samples/s of raysys teacher training (ddp, zero1, zero3 on Ray Train) against plain `torchrun` on the same
model, data, batch and threads, in the same run: against torchrun DDP, and against torchrun running the same
strategy (the same ZeRO-1 partitioned AdamW, the same FSDP2 wrapping: `raysys.parallel` without Ray), so that
what Ray costs is told apart from what a strategy costs.

    .venv/bin/python benchmarks/train_scaling.py [--workers 2] [--epochs 5] [--repeats 4] [--preset demo]
        [--train-rows 150000] [--strategies ddp,zero1,zero3] [--niceness-ab]

Each repeat runs, in turn, torchrun DDP (benchmarks/_torchrun_ddp.py), `raysys.train.train_teacher` with
each strategy, and torchrun with each strategy other than ddp (`--strategy`), every one with `--workers` processes x 1 intra-op thread (OMP_NUM_THREADS=1) on a local Ray
started with 2 x workers logical CPUs. Throughput is the training loop's own samples/s per epoch (global
rows / slowest rank's loop time, data iteration and preprocessing included); the first epoch of every run
is warm-up and dropped. The job is the demo teacher on the demo schema with 150k training rows (~2.5 s ddp
epochs): with the demo's own 20k rows (`--train-rows 0`) an epoch lasts ~0.35 s, so every measured epoch
falls in the first ~2 s of training, while Ray is still starting the run's helpers (Ray Data's split
coordinators and read workers finishing, Train's preemption watcher starting: 20-70% of a core then, ~13%
after; per-process CPU from /proc in 1 s buckets): that measures start-up, not throughput. Runs are paired:
each repeat runs torchrun and every raysys strategy back to back, torchrun first in even repeats and last in
odd ones, the whole sequence reversed (ABBA: ddp is next to torchrun in every repeat), so drift in this
shared machine's speed over the minutes of a run falls on both sides of a pair. Per repeat, ratio = median
samples/s of the raysys strategy's epochs / median of torchrun's epochs in that repeat (1.0 = as fast as
plain torch); `ratio_vs_torchrun` is the median of the per-repeat ratios (`ratio_per_repeat` lists them),
`pooled_ratio_vs_torchrun` the ratio of the medians over all repeats' epochs; `ratio_vs_same_strategy_torchrun`
the median per-repeat ratio to torchrun running the same strategy (ddp's is its ratio to torchrun DDP). `--niceness-ab` adds
`ddp_ray_niceness15`: raysys ddp with train.worker_niceness=None (Ray's worker niceness 15 kept), the before
of the renice fix. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
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
    ap.add_argument("--epochs", type=int, default=5, help="per run; the first is warm-up and dropped")
    ap.add_argument("--repeats", type=int, default=4, help="paired repeats (even: torchrun first; odd: reversed)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help=f"comma-separated raysys strategies to run (default {','.join(STRATEGIES)})")
    ap.add_argument("--niceness-ab", action="store_true", help=f"also run the {NICE15} variant")
    ap.add_argument("--train-rows", type=int, default=150_000,
                    help="training rows of the synthetic data (default 150000: ~2.5 s ddp epochs; 0 = the preset's "
                         "own, the demo's 20k rows, ~0.35 s epochs that fall inside Ray's start-up transient)")
    args = ap.parse_args(argv)
    strategies = tuple(x.strip() for x in args.strategies.split(",") if x.strip())
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        ap.error(f"--strategies: unknown {unknown or 'empty'}; choose from {','.join(STRATEGIES)}")
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch
    from _common import scratch_dir
    from _torchrun_ddp import run_peer

    from raysys.config import preset
    from raysys.data import Preprocessor, ensure_dataset
    from raysys.models import build_model, model_spec, num_parameters
    from raysys.train import train_teacher

    tmp = scratch_dir("raysys-bench-")  # removed at exit
    cfg = preset(args.preset).with_root(tmp)
    if args.train_rows:  # 0: the preset's own
        cfg.data = cfg.data.model_copy(update=dict(num_train_rows=args.train_rows))
    cfg.train = cfg.train.model_copy(update=dict(num_workers=args.workers, num_epochs=args.epochs,
                                                 threads_per_worker=1, cpus_per_worker=1.0, max_failures=0))
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    spec = model_spec(schema, cfg.teacher)
    os.environ.pop("RAY_ADDRESS", None)
    # a private local Ray (never one someone else started on this machine)
    ray.init(address="local", num_cpus=2 * args.workers, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    runs = strategies + ((NICE15,) if args.niceness_ab and "ddp" in strategies else ())
    rates: dict[str, list[float]] = {"torchrun_ddp": [], **{s: [] for s in runs}}
    per_repeat: dict[str, list[float]] = {s: [] for s in runs}  # per repeat: median of its epochs
    peer_per_repeat: list[float] = []
    t_start = time.time()
    load_start = os.getloadavg()[0]

    same = [s for s in strategies if s != "ddp"]  # torchrun peers running raysys's own strategy code
    for s in same:
        rates[f"torchrun_{s}"] = []
    same_per_repeat: dict[str, list[float]] = {s: [] for s in same}

    def torchrun(r: int, strategy: str = "ddp") -> None:
        out = tmp / f"torchrun-{strategy}-{r}.json"
        got = run_peer(args.workers, cfg.data.root, spec, out, "--epochs", str(args.epochs),
                       "--batch-size", str(cfg.train.batch_size), "--lr", str(cfg.train.lr),
                       "--weight-decay", str(cfg.train.weight_decay), "--threads", "1",
                       "--strategy", strategy)["samples_per_s"][1:]
        rates[f"torchrun_{strategy}"] += got
        (peer_per_repeat if strategy == "ddp" else same_per_repeat[strategy]).append(statistics.median(got))
        print(f"repeat {r}: torchrun {strategy:5s} {statistics.median(got):8.0f} samples/s", flush=True)

    for r in range(args.repeats):
        if r % 2 == 0:
            torchrun(r)
            for s in same:
                torchrun(r, s)
        for s in (runs if r % 2 == 0 else runs[::-1]):
            c = cfg.model_copy(deep=True)
            c.train.strategy = "ddp" if s == NICE15 else s
            if s == NICE15:
                c.train.worker_niceness = None
            res = train_teacher(c, schema, pre, run_name=f"bench-{s}-{r}")
            got = [m["samples_per_s"] for m in res.metrics[1:]]
            rates[s] += got
            per_repeat[s].append(statistics.median(got))
            print(f"repeat {r}: raysys {s:5s}  {statistics.median(got):8.0f} samples/s "
                  f"(val_accuracy {res.metrics[-1]['val_accuracy']:.3f})", flush=True)
        if r % 2 == 1:
            for s in same[::-1]:
                torchrun(r, s)
            torchrun(r)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    summary = {
        "benchmark": "train_scaling",
        "ratio_vs_torchrun": {s: round(statistics.median(a / b for a, b in zip(per_repeat[s], peer_per_repeat)), 3)
                              for s in runs},
        "ratio_per_repeat": {s: [round(a / b, 3) for a, b in zip(per_repeat[s], peer_per_repeat)] for s in runs},
        "ratio_vs_same_strategy_torchrun": {
            s: round(statistics.median(a / b for a, b in zip(per_repeat[s], same_per_repeat.get(s, peer_per_repeat))), 3)
            for s in strategies},
        "same_strategy_ratio_per_repeat": {
            s: [round(a / b, 3) for a, b in zip(per_repeat[s], same_per_repeat.get(s, peer_per_repeat))]
            for s in strategies},
        "pooled_ratio_vs_torchrun": {s: round(med[s] / med["torchrun_ddp"], 3) for s in runs},
        "samples_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "samples_per_s_all": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "setup": {"workers": args.workers, "threads_per_worker": 1, "cpus_per_worker": 1.0,
                  "worker_niceness": cfg.train.worker_niceness, "load_avg_1m_at_start": load_start,
                  "ray_num_cpus": 2 * args.workers, "preset": args.preset, "train_rows": cfg.data.num_train_rows,
                  "global_batch": cfg.train.batch_size, "epochs_per_run": args.epochs, "warmup_epochs_dropped": 1,
                  "repeats": args.repeats,
                  "order": "ABBA (even repeats: torchrun ddp, torchrun per strategy, then raysys's strategies; odd: "
                           "the reverse)",
                  "model_spec": spec, "num_parameters": num_parameters(build_model(spec)),
                  "backend": "gloo", "machine_cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
                  "ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version(),
                  "elapsed_s": round(time.time() - t_start, 1)},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
