"""The largest teacher that trains under one fixed per-worker memory budget with ddp, zero1, zero3 and
pipeline on 4 workers.

    .venv/bin/python benchmarks/fits.py [--budget-mb 32] [--workers 4] [--num-blocks 8] [--steps 3]

Size knob: the FT-Transformer teacher's token width `d_model` (multiples of `num_heads`), with
`num_blocks`, `num_heads` and `ffn_mult` fixed; parameters grow ~ (4 + 2 * ffn_mult) * d_model**2 per block.

1. Search (no training): for each strategy, binary search for the largest d_model that
   `raysys.train.trainer.check_train_config` accepts with `train.max_worker_memory_gb` = the budget and
   `train.num_workers` = 4: the very check that refuses a configuration before training, i.e. the
   estimate of `raysys.parallel.memory.estimate_rank_bytes` (fp32 params + grads + AdamW moments per rank;
   zero3 adds one gathered FSDP unit, pipeline uses the real heaviest stage of the block-wise split).
2. Verify (training): the found size and the next one up (d_model + num_heads) each train `--steps`
   AdamW steps under the real strategy (`raysys.parallel.parallelize` + `build_optimizer`) on 4 gloo
   ranks (torch.multiprocessing, one thread each); after the last step every rank measures the bytes it
   really holds in parameter, gradient and optimizer-state tensors (`raysys.parallel.memory.rank_memory`:
   local shards only), and for zero3 also the peak of FSDP2's transiently all-gathered parameters (sampled
   before every module's forward and backward). Measured = max over ranks of their sum. Not measured:
   activations, DDP buckets / ZeRO-1's gather buffer, allocator slack, the Python process itself.

Size ratio = parameters of the largest zero3 (pipeline) teacher / parameters of the largest ddp teacher.
Memory is deterministic: no repeats. Last line: one JSON object.
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

STRATEGIES = ("ddp", "zero1", "zero3", "pipeline")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _schema(preset_name: str):
    from raysys.config import preset
    from raysys.data.schema import DatasetSchema

    d = preset(preset_name).data
    # the schema the synthetic generator writes for this preset (sizing a model needs no data)
    feats = ([{"name": f"num_{i}", "kind": "numeric"} for i in range(d.num_numeric)]
             + [{"name": f"cat_{j}", "kind": "categorical", "categories": [f"c{k}" for k in range(d.num_categories)]}
                for j in range(d.num_categorical)])
    return DatasetSchema.model_validate({"features": feats, "label": "label",
                                         "classes": [f"k{i}" for i in range(d.num_classes)]})


def config_for(preset_name: str, strategy: str, workers: int, budget_gb: float, d_model: int, num_blocks: int,
               num_heads: int, ffn_mult: float):
    from raysys.config import load_config

    return load_config(preset_name=preset_name, overrides={
        "teacher": {"family": "ft_transformer", "size": "small", "d_model": d_model, "num_blocks": num_blocks,
                    "num_heads": num_heads, "ffn_mult": ffn_mult, "dropout": 0.0},
        "train": {"strategy": strategy, "num_workers": workers, "max_worker_memory_gb": budget_gb}})


def fits(schema, preset_name: str, strategy: str, workers: int, budget_gb: float, d_model: int, num_blocks: int,
         num_heads: int, ffn_mult: float):
    """The driver-side estimate when the budget check accepts this size, else None (refused)."""
    from raysys.train.trainer import check_train_config

    cfg = config_for(preset_name, strategy, workers, budget_gb, d_model, num_blocks, num_heads, ffn_mult)
    try:
        return check_train_config(cfg, schema)
    except ValueError as e:
        if "max_worker_memory_gb" not in str(e):
            raise
        return None


def largest_fit(schema, preset_name: str, strategy: str, workers: int, budget_gb: float, num_blocks: int,
                num_heads: int, ffn_mult: float, d_max: int = 1 << 14) -> int:
    """Largest d_model (a multiple of num_heads) the budget check accepts; 0 when none does (monotone in d)."""
    lo, hi = 0, d_max // num_heads  # in units of num_heads; lo fits (or is 0), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(schema, preset_name, strategy, workers, budget_gb, mid * num_heads, num_blocks, num_heads, ffn_mult):
            lo = mid
        else:
            hi = mid - 1
    return lo * num_heads


def _watch_gathered(model) -> dict:
    """Peak bytes of FSDP2's all-gathered (unsharded) parameters, sampled before every module's forward
    and backward: FSDP2 swaps a unit's DTensor shards for plain full tensors while it computes, so the
    plain tensors among `model.parameters()` at any moment are what is gathered then."""
    from torch.distributed.tensor import DTensor

    state = {"peak": 0}

    def sample(*_args):
        n = sum(p.numel() * p.element_size() for p in model.parameters() if not isinstance(p, DTensor))
        state["peak"] = max(state["peak"], n)

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args: sample()))
        handles.append(m.register_full_backward_pre_hook(lambda mod, grad: sample()))
    state["remove"] = lambda: [h.remove() for h in handles]
    return state


def _rank_main(rank: int, world: int, port: int, jobs: list, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from raysys.models import build_model
    from raysys.parallel import (
        ParallelDims,
        StrategyConfig,
        build_optimizer,
        parallelize,
        pipeline_runner,
        unwrap,
    )
    from raysys.parallel.memory import gather_rank_memory, rank_memory
    from raysys.train.steps import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    results = []
    for job in jobs:
        strategy, spec = job["strategy"], job["spec"]
        dims = ParallelDims.for_strategy(strategy, world)
        mesh = dims.build_mesh("cpu")
        cfg = StrategyConfig(strategy, lr=1e-3, weight_decay=1e-4,
                             options=(("num_microbatches", world), ("pipeline_schedule", "1f1b")))
        torch.manual_seed(0)
        model = parallelize(build_model(spec), dims, cfg, mesh=mesh)
        opt = build_optimizer(model, cfg, mesh=mesh)
        runner = pipeline_runner(model)
        gathered = _watch_gathered(unwrap(model)) if strategy == "zero3" else None
        # data parallel: each rank its own rows; pipeline: every stage sees the same batch (as the loop's
        # gather_batch arranges), split into `world` microbatches
        g = torch.Generator().manual_seed(rank if runner is None else 0)
        batch = 16
        losses = []
        for _ in range(steps):
            x_num = torch.randn(batch, spec["num_numeric"], generator=g)
            x_cat = torch.stack([torch.randint(0, c, (batch,), generator=g) for c in spec["cardinalities"]], 1)
            y = torch.randint(0, spec["num_classes"], (batch,), generator=g)
            if runner is not None:
                losses.append(runner.train_step(opt, x_num, x_cat, y))
            else:
                losses.append(train_step(model, opt, x_num, x_cat, y))
        state = runner.stage_module if runner is not None else model
        mem = gather_rank_memory(rank_memory(unwrap(state), opt))
        peak = torch.tensor([gathered["peak"] if gathered else 0], dtype=torch.int64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if gathered:
            gathered["remove"]()
        results.append({**job, "per_rank": mem, "steps": steps, "gathered_peak_bytes": int(peak),
                        "losses": [float(v) for v in losses if v is not None]})
        del model, opt, runner, state
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def train_and_measure(jobs: list, world: int, steps: int) -> list:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        mp.spawn(_rank_main, args=(world, _free_port(), jobs, steps, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="whose data schema sizes the tokenizer and head")
    ap.add_argument("--budget-mb", type=float, default=32.0, help="per-worker budget (train.max_worker_memory_gb)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=8)
    ap.add_argument("--num-heads", type=int, default=8)
    ap.add_argument("--ffn-mult", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=3, help="AdamW steps each verified size trains")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from raysys.models import build_model, model_spec, num_parameters

    t0 = time.time()
    budget_gb = args.budget_mb / 1024
    budget_bytes = args.budget_mb * 2**20
    schema = _schema(args.preset)
    arch = dict(num_blocks=args.num_blocks, num_heads=args.num_heads, ffn_mult=args.ffn_mult)

    def spec_of(strategy: str, d: int) -> dict:
        cfg = config_for(args.preset, strategy, args.workers, budget_gb, d, **arch)
        return model_spec(schema, cfg.teacher)

    def n_params(spec: dict) -> int:
        with torch.device("meta"):
            return num_parameters(build_model(spec))

    found, jobs = {}, []
    for s in args.strategies:
        d = largest_fit(schema, args.preset, s, args.workers, budget_gb, **arch)
        if d == 0:
            raise SystemExit(f"{s}: not even d_model={args.num_heads} fits {args.budget_mb} MiB; raise --budget-mb")
        est = fits(schema, args.preset, s, args.workers, budget_gb, d, **arch)
        up = d + args.num_heads
        refused = fits(schema, args.preset, s, args.workers, budget_gb, up, **arch) is None
        found[s] = {"d_model": d, "num_parameters": n_params(spec_of(s, d)), "estimate_bytes": est.total_bytes,
                    "next_d_model": up, "next_num_parameters": n_params(spec_of(s, up)),
                    "next_refused_by_budget_check": refused}
        print(f"{s:8s}: largest d_model {d:5d} ({found[s]['num_parameters']:>11,} params), estimate "
              f"{est.total_bytes / 2**20:7.2f} MiB/rank; d_model {up} refused: {refused}", flush=True)
        jobs += [{"strategy": s, "d_model": d, "which": "found", "spec": spec_of(s, d)},
                 {"strategy": s, "d_model": up, "which": "next", "spec": spec_of(s, up)}]

    measured = train_and_measure(jobs, args.workers, args.steps)
    for r in measured:
        s, which = r["strategy"], r["which"]
        mx = max(p["total_bytes"] for p in r["per_rank"])
        entry = found[s]
        key = "measured" if which == "found" else "next_measured"
        entry[f"{key}_max_rank_bytes"] = mx
        # zero3: the persistent shards plus the largest all-gathered set seen during forward/backward
        entry[f"{key}_peak_with_gathered_bytes"] = mx + r["gathered_peak_bytes"]
        entry[f"{key}_peak_within_budget"] = mx + r["gathered_peak_bytes"] <= budget_bytes
        entry[f"{key}_per_rank_bytes"] = [p["total_bytes"] for p in r["per_rank"]]
        entry[f"{key}_within_budget"] = mx <= budget_bytes
        entry[f"{key}_trained_steps"] = r["steps"]
        entry[f"{key}_losses"] = [round(v, 4) for v in r["losses"]]
        pk = mx + r["gathered_peak_bytes"]
        print(f"{s:8s} d_model {r['d_model']:5d} ({which}): trained {r['steps']} steps on {args.workers} gloo ranks, "
              f"measured max per-rank params+grads+AdamW {mx / 2**20:7.2f} MiB, with FSDP2's gathered params "
              f"{pk / 2**20:7.2f} MiB (budget {args.budget_mb:g} MiB, {'within' if pk <= budget_bytes else 'OVER'})",
              flush=True)

    base = found["ddp"]["num_parameters"] if "ddp" in found else None
    ratio = {s: round(found[s]["num_parameters"] / base, 3) for s in found} if base else {}
    summary = {
        "benchmark": "fits",
        "zero3_vs_ddp_size_ratio": ratio.get("zero3"),
        "pipeline_vs_ddp_size_ratio": ratio.get("pipeline"),
        "zero1_vs_ddp_size_ratio": ratio.get("zero1"),
        "largest_num_parameters": {s: found[s]["num_parameters"] for s in found},
        "largest_d_model": {s: found[s]["d_model"] for s in found},
        "found_trains_within_budget_measured": {s: found[s].get("measured_peak_within_budget") for s in found},
        "next_size_refused": {s: found[s]["next_refused_by_budget_check"] for s in found},
        "next_size_over_budget_measured": {s: not found[s].get("next_measured_peak_within_budget", True)
                                           for s in found},
        "per_strategy": found,
        "measured": "per-rank bytes of parameter, gradient and AdamW-state tensors (local shards) after the last "
                    "step, plus for zero3 the peak bytes of FSDP2's all-gathered parameters sampled at every module's "
                    "forward/backward; not activations, DDP/ZeRO-1 communication buffers or allocator slack",
        "setup": {"budget_mb": args.budget_mb, "workers": args.workers, "family": "ft_transformer",
                  "size_knob": "d_model", **arch, "preset_schema": args.preset, "steps": args.steps,
                  "batch_rows_per_rank": 16, "backend": "gloo", "threads_per_rank": 1, "dtype": "float32",
                  "optimizer": "AdamW", "torch": torch.__version__, "python": platform.python_version(),
                  "cpus": os.cpu_count(), "elapsed_s": round(time.time() - t0, 1)},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
