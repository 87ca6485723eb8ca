"""Per-rank training-state memory of ddp / zero1 / zero2 / zero3 at world size 1, 2 and 4, against the
ideal 1/N of the ZeRO paper. zero1 is raysys's even flat partition (train.zero1_partition="even", the
default); zero1_whole_params is torch's ZeroRedundancyOptimizer (whole parameters per rank), for comparison.

    .venv/bin/python benchmarks/zero_memory.py [--preset large] [--worlds 1 2 4]

For each world size N, N gloo ranks (torch.multiprocessing, no Ray) build the preset's teacher from the
same seed, apply each strategy with `raysys.parallel`, take one AdamW step on a random batch and measure
what each rank holds (`raysys.parallel.memory.rank_memory`: local shards only). Ideal = the
single-process bytes / N. Ratio to ideal = max over ranks / ideal (1.00 = perfectly even sharding).
Memory is deterministic: one measurement per cell, no repeats. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# zero1 = raysys's even flat partition (the default); zero1_whole_params = torch's ZeroRedundancyOptimizer
STRATEGIES = ("ddp", "zero1", "zero1_whole_params", "zero2", "zero3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(preset_name: str) -> dict:
    from raysys.config import preset
    from raysys.data.schema import DatasetSchema

    cfg = preset(preset_name)
    d = cfg.data
    # the schema the synthetic generator would write for this preset (no data needed to size the model)
    feats = ([{"name": f"num_{i}", "kind": "numeric"} for i in range(d.num_numeric)]
             + [{"name": f"cat_{j}", "kind": "categorical", "categories": [f"c{k}" for k in range(d.num_categories)]}
                for j in range(d.num_categorical)])
    schema = DatasetSchema.model_validate({"features": feats, "label": "label",
                                           "classes": [f"k{i}" for i in range(d.num_classes)]})
    from raysys.models import model_spec

    return model_spec(schema, cfg.teacher)


def _rank_main(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from raysys.models import build_model
    from raysys.parallel import ParallelDims, StrategyConfig, build_optimizer, parallelize
    from raysys.parallel.memory import gather_rank_memory, rank_memory
    from raysys.train.steps import train_step

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    results = {}
    mesh = ParallelDims.for_strategy("ddp", world).build_mesh("cpu") if world > 1 else None
    g = torch.Generator().manual_seed(rank)
    batch = 64
    x_num = torch.randn(batch, spec["num_numeric"], generator=g)
    x_cat = torch.stack([torch.randint(0, c, (batch,), generator=g) for c in spec["cardinalities"]], 1)
    y = torch.randint(0, spec["num_classes"], (batch,), generator=g)
    for strategy in STRATEGIES:
        torch.manual_seed(0)
        name = strategy.removesuffix("_whole_params")
        partition = "whole_params" if strategy.endswith("_whole_params") else "even"
        cfg = StrategyConfig(name, lr=1e-3, weight_decay=1e-4, options=(("zero1_partition", partition),))
        model = parallelize(build_model(spec), ParallelDims.for_strategy(name, world), cfg, mesh=mesh)
        opt = build_optimizer(model, cfg, mesh=mesh)
        train_step(model, opt, x_num, x_cat, y)
        from raysys.parallel import unwrap

        results[strategy] = gather_rank_memory(rank_memory(unwrap(model), opt))
        del model, opt
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, spec: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        if world == 1:
            _rank_main(0, 1, 0, spec, out)
        else:
            mp.spawn(_rank_main, args=(world, _free_port(), spec, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="large", help="whose teacher to measure (default: large)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args(argv)
    import torch

    from raysys.models import build_model, num_parameters

    spec = _spec(args.preset)
    n_params = num_parameters(build_model(spec))
    t0 = time.time()
    by_world = {w: measure(w, spec) for w in sorted(set(args.worlds) | {1})}
    base = by_world[1]
    table: dict = {}
    for s in STRATEGIES:
        for w in sorted(by_world):
            ranks = by_world[w][s]
            opt = [r["optimizer_bytes"] for r in ranks]
            pg = [r["params_bytes"] + r["grads_bytes"] for r in ranks]
            ideal_opt = base[s][0]["optimizer_bytes"] / w
            ideal_pg = (base[s][0]["params_bytes"] + base[s][0]["grads_bytes"]) / w
            table[f"{s}_n{w}"] = {
                "optimizer_bytes_per_rank": opt, "params_grads_bytes_per_rank": pg,
                "optimizer_ideal_bytes": round(ideal_opt), "params_grads_ideal_bytes": round(ideal_pg),
                "optimizer_ratio_to_ideal": round(max(opt) / ideal_opt, 3),
                "params_grads_ratio_to_ideal": round(max(pg) / ideal_pg, 3),
            }
            print(f"{s:18s} N={w}: optimizer max/rank {max(opt) / 2**20:8.2f} MiB (ideal {ideal_opt / 2**20:8.2f}, "
                  f"x{max(opt) / ideal_opt:.2f}); params+grads max/rank {max(pg) / 2**20:8.2f} MiB "
                  f"(ideal {ideal_pg / 2**20:8.2f}, x{max(pg) / ideal_pg:.2f})", flush=True)
    nmax = max(by_world)
    summary = {
        "benchmark": "zero_memory",
        f"zero1_n{nmax}_ratio_to_ideal": table[f"zero1_n{nmax}"]["optimizer_ratio_to_ideal"],
        f"zero1_whole_params_n{nmax}_ratio_to_ideal": table[f"zero1_whole_params_n{nmax}"]["optimizer_ratio_to_ideal"],
        f"zero2_n{nmax}_ratio_to_ideal": table[f"zero2_n{nmax}"]["optimizer_ratio_to_ideal"],
        f"zero3_n{nmax}_ratio_to_ideal": table[f"zero3_n{nmax}"]["optimizer_ratio_to_ideal"],
        f"zero2_n{nmax}_params_grads_ratio_to_ideal": table[f"zero2_n{nmax}"]["params_grads_ratio_to_ideal"],
        f"zero3_n{nmax}_params_grads_ratio_to_ideal": table[f"zero3_n{nmax}"]["params_grads_ratio_to_ideal"],
        "ddp_ratio_note": "ddp is not sharded: its ratio to 1/N is N by construction",
        "table": table,
        "setup": {"preset": args.preset, "model_spec": spec, "num_parameters": n_params,
                  "largest_parameter": max(p.numel() for p in build_model(spec).parameters()),
                  "worlds": sorted(by_world), "backend": "gloo", "threads_per_rank": 1, "dtype": "float32",
                  "optimizer": "AdamW", "measured_after": "one optimizer step",
                  "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                  "elapsed_s": round(time.time() - t0, 1)},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
