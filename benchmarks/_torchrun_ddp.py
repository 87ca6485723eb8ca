"""Plain-torch peer of raysys teacher training, for benchmarks/train_scaling.py and train_env.py (run under
`torchrun`).

The same job as `raysys.train.loop` without Ray: the same Parquet training split held in memory, a
contiguous equal share of rows per rank, a shuffled per-rank order each epoch, the same
`Preprocessor.transform_batch` per batch, the same model, AdamW and `train_step`, over gloo with one
intra-op thread, wrapped by `--strategy`: ddp (DDP), or zero1 / zero2 / zero3 through the very
`raysys.parallel.parallelize` + `build_optimizer` the Ray Train loop calls (ZeRO-1's partitioned AdamW, FSDP2's
wrapping), so that a strategy's ratio to its peer is what Ray costs, not what the strategy costs. samples/s of an
epoch = global rows / the slowest rank's training-loop time (the loop's own definition). Rank 0 writes
{"samples_per_s": [per epoch], ...} as JSON to --out.

`peer_loop` is the loop itself, for any caller that has set up the process group: train_env.py also runs
it inside a Ray Train `TorchTrainer`, and `--in-thread` runs it in a non-main thread as Ray Train does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# the DDP models peer_loop built, kept alive to the process's end: freeing DDP's Reducer can deadlock (see main)
_KEEP: list = []


def _context_switches() -> int | None:
    """The machine's context switches since boot (/proc/stat `ctxt`; None where there is none)."""
    try:
        with open("/proc/stat") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("ctxt "))
    except (OSError, StopIteration, ValueError):
        return None


def _wrapped(spec: dict, strategy: str, lr: float, weight_decay: float, world: int):
    """(model, optimizer) for `strategy`, built as raysys.train.loop builds them."""
    import torch

    from raysys.models import build_model
    from raysys.parallel import ParallelDims, StrategyConfig, apply_ddp, build_optimizer, parallelize

    torch.manual_seed(0)
    if strategy == "ddp":
        model = apply_ddp(build_model(spec))
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # the options raysys.train.worker_config.strategy_config passes with the default TrainConfig
    cfg = StrategyConfig(strategy, lr=lr, weight_decay=weight_decay, options=(("zero1_partition", "even"),))
    dims = ParallelDims.for_strategy(strategy, world)
    mesh = dims.build_mesh("cpu")
    model = parallelize(build_model(spec), dims, cfg, mesh=mesh)
    return model, build_optimizer(model, cfg, mesh=mesh)


def peer_loop(root: str, spec: dict, *, epochs: int = 4, batch_size: int = 256, lr: float = 2e-3,
              weight_decay: float = 1e-4, threads: int = 1, step_times: bool = False,
              strategy: str = "ddp") -> dict | None:
    """Train under the current (gloo) process group. Returns rank 0's record (None on other ranks):
    `samples_per_s` per epoch; with `step_times`, percentiles of every step's time (us) after epoch 0 and
    the machine's context switches per second over those epochs."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from raysys.data import Preprocessor, read_split
    from raysys.data.schema import DatasetSchema
    from raysys.train.steps import to_tensors, train_step

    torch.set_num_threads(threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    schema = DatasetSchema.model_validate_json((Path(root) / "schema.json").read_text())
    pre = Preprocessor.fit_split(schema, root)
    table = read_split(root, "train")
    n = (table.num_rows // world) * world  # equal shares, as Ray Data's streaming_split(equal=True)
    share = n // world
    cols = {c: table.column(c).to_numpy(zero_copy_only=False)[rank * share:(rank + 1) * share]
            for c in table.column_names}
    local_batch = batch_size // world
    model, opt = _wrapped(spec, strategy, lr, weight_decay, world)
    _KEEP.append(model)
    rates, steps_us = [], []
    cs0 = t_cs0 = None
    for epoch in range(epochs):
        order = np.random.default_rng(epoch * 100 + rank).permutation(share)
        dist.barrier()
        if epoch == 1:
            cs0, t_cs0 = _context_switches(), time.perf_counter()
        t0 = time.perf_counter()
        rows = 0
        for i in range(0, share, local_batch):
            s0 = time.perf_counter_ns()
            idx = order[i:i + local_batch]
            batch = {c: v[idx] for c, v in cols.items()}
            x_num, x_cat, y = to_tensors(*pre.transform_batch(batch))
            train_step(model, opt, x_num, x_cat, y)
            rows += len(y)
            if step_times and epoch > 0:
                steps_us.append((time.perf_counter_ns() - s0) / 1e3)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        total = torch.tensor([rows], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        dist.all_reduce(total)
        rates.append(float(total) / float(dt))
    cs1, t_cs1 = _context_switches(), time.perf_counter()
    if rank != 0:
        return None
    out: dict = {"samples_per_s": rates, "world": world, "strategy": strategy,
                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if step_times and steps_us:
        s = np.asarray(steps_us)
        out["step_us"] = {"p10": float(np.percentile(s, 10)), "p50": float(np.percentile(s, 50)),
                          "p90": float(np.percentile(s, 90)), "mean": float(s.mean()), "steps": len(s)}
        if cs0 is not None and cs1 is not None:
            out["context_switches_per_s"] = (cs1 - cs0) / max(t_cs1 - t_cs0, 1e-9)
    return out


def run_peer(workers: int, root: str, spec: dict, out: Path, *flags: str) -> dict:
    """Run this script under torchrun (`workers` processes, OMP_NUM_THREADS=1) and return rank 0's record.
    `flags`: more of this script's options (--epochs, --batch-size, --step-times, ...)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}", __file__,
           "--root", root, "--spec", json.dumps(spec), "--out", str(out), *flags]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(Path(out).read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--spec", required=True, help="model spec JSON")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--strategy", default="ddp", choices=("ddp", "zero1", "zero2", "zero3"))
    ap.add_argument("--step-times", action="store_true", help="also record per-step times and context switches")
    ap.add_argument("--in-thread", action="store_true", help="run the loop in a non-main thread (as Ray Train does)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import threading

    import torch.distributed as dist

    dist.init_process_group("gloo")
    kw = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
              threads=args.threads, step_times=args.step_times, strategy=args.strategy)
    result: list = []
    if args.in_thread:
        th = threading.Thread(target=lambda: result.append(peer_loop(args.root, json.loads(args.spec), **kw)))
        th.start()
        th.join()
    else:
        result.append(peer_loop(args.root, json.loads(args.spec), **kw))
    if result and result[0] is not None:
        Path(args.out).write_text(json.dumps(result[0]))
    dist.destroy_process_group()
    # exit here, before the model (in _KEEP) is freed: freeing DDP's Reducer at interpreter teardown can deadlock (the main
    # thread joins gloo's worker thread while holding the GIL that thread needs to release a tensor; seen
    # once, py-spy: ~ProcessGroupGloo <- ~Reducer), which leaves torchrun waiting forever
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
