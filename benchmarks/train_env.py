"""Where raysys ddp's gap to torchrun comes from: the SAME plain DDP loop (benchmarks/_torchrun_ddp.py's
`peer_loop`: same data, model, AdamW, batch, one thread per rank) run three ways, in turn, in one session:

- `torchrun`: under torchrun, in each process's main thread (what train_scaling.py compares against);
- `torchrun_thread`: the same, in a non-main thread (Ray Train runs the training function in a thread);
- `ray_train`: as a Ray Train `TorchTrainer` function on a local Ray (workers reniced to 0 as raysys does),
  with no Ray Data and no per-epoch report: the Ray Train worker environment alone;
- `raysys`: `raysys.train.train_teacher` (ddp) on the same data and model: Ray Data shards, the lr schedule
  and weight-decay hook, per-epoch validation, memory accounting, report and checkpoint (samples/s only).

    .venv/bin/python benchmarks/train_env.py [--repeats 2] [--epochs 3] [--train-rows 300000]

Per run, rank 0 records samples/s per epoch, every step's time after the first (warm-up) epoch (p10, p50,
p90, mean) and the machine's context switches per second over those epochs (/proc/stat). Medians over
repeats; ratios to `torchrun`. A gap in p10 (the fastest steps) is a uniform slowdown, not rare stalls.
Last line: one JSON object.
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

MODES = ("torchrun", "torchrun_thread", "ray_train", "raysys")


def _ray_train_fn(config: dict) -> None:
    import ray.train

    sys.path.insert(0, config["bench_dir"])  # the worker's own path lacks benchmarks/
    from _torchrun_ddp import peer_loop

    from raysys.train.process import renice_process

    renice_process(0)  # as raysys's training workers do (a torchrun process runs at 0)
    rec = peer_loop(config["root"], config["spec"], epochs=config["epochs"], step_times=True)
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(rec))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    ap.add_argument("--train-rows", type=int, default=300_000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first is warm-up)")
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch
    from _common import scratch_dir
    from _torchrun_ddp import run_peer
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysys.config import preset
    from raysys.data import Preprocessor, ensure_dataset
    from raysys.models import model_spec
    from raysys.train import train_teacher

    tmp = scratch_dir("raysys-bench-env-")  # removed at exit
    cfg = preset("demo").with_root(tmp)
    cfg.data = cfg.data.model_copy(update=dict(num_train_rows=args.train_rows))
    cfg.train = cfg.train.model_copy(update=dict(num_workers=args.workers, num_epochs=args.epochs, threads_per_worker=1,
                                                 cpus_per_worker=1.0, max_failures=0, strategy="ddp"))
    schema = ensure_dataset(cfg.data)
    spec = model_spec(schema, cfg.teacher)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2 * args.workers, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    t_start = time.time()
    for r in range(args.repeats):
        for mode in MODES:
            out = tmp / f"{mode}-{r}.json"
            if mode == "raysys":
                res = train_teacher(cfg, schema, Preprocessor.fit_split(schema, cfg.data.root), run_name=f"env-{r}")
                rec = {"samples_per_s": [m["samples_per_s"] for m in res.metrics]}
                runs[mode].append(rec)
                print(f"repeat {r}: {mode:15s} {statistics.median(rec['samples_per_s'][1:]):8.0f} samples/s", flush=True)
                continue
            if mode == "ray_train":
                TorchTrainer(_ray_train_fn,
                             train_loop_config={"root": cfg.data.root, "spec": spec, "epochs": args.epochs,
                                                "out": str(out), "bench_dir": str(Path(__file__).resolve().parent)},
                             scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                             torch_config=TorchConfig(backend="gloo"),
                             run_config=RunConfig(storage_path=str(tmp / "ray"), name=f"env-{r}")).fit()
            else:
                run_peer(args.workers, cfg.data.root, spec, out, "--epochs", str(args.epochs), "--step-times",
                         *(["--in-thread"] if mode == "torchrun_thread" else []))
            rec = json.loads(out.read_text())
            runs[mode].append(rec)
            print(f"repeat {r}: {mode:15s} {statistics.median(rec['samples_per_s'][1:]):8.0f} samples/s, step p10 "
                  f"{rec['step_us']['p10']:.0f} us p50 {rec['step_us']['p50']:.0f} us, "
                  f"{rec.get('context_switches_per_s', float('nan')):.0f} context switches/s", flush=True)
    ray.shutdown()

    def med(mode: str, key) -> float:
        return statistics.median(key(rec) for rec in runs[mode])

    summary = {m: {"samples_per_s": round(statistics.median(x for rec in runs[m] for x in rec["samples_per_s"][1:]), 1),
                   **({"step_p10_us": round(med(m, lambda rec: rec["step_us"]["p10"]), 1),
                       "step_p50_us": round(med(m, lambda rec: rec["step_us"]["p50"]), 1),
                       "step_mean_us": round(med(m, lambda rec: rec["step_us"]["mean"]), 1),
                       "context_switches_per_s": round(med(m, lambda rec: rec.get("context_switches_per_s") or 0.0))}
                      if "step_us" in runs[m][0] else {})}
               for m in MODES}
    base = summary["torchrun"]
    print(json.dumps({
        "benchmark": "train_env",
        "ratio_vs_torchrun": {m: round(summary[m]["samples_per_s"] / base["samples_per_s"], 3) for m in MODES[1:]},
        "step_p10_ratio_vs_torchrun": {m: round(summary[m]["step_p10_us"] / base["step_p10_us"], 3) for m in MODES[1:]
                                       if "step_p10_us" in summary[m]},
        "modes": summary,
        "setup": {"workers": args.workers, "threads_per_worker": 1, "train_rows": args.train_rows,
                  "epochs_per_run": args.epochs, "warmup_epochs_dropped": 1, "repeats": args.repeats,
                  "model_spec": spec, "backend": "gloo", "machine_cpus": os.cpu_count(),
                  "ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version(),
                  "elapsed_s": round(time.time() - t_start, 1)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
