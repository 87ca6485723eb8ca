"""Benchmark: the pipeline bubble. Measured idle fraction per stage vs the theory (p-1)/(m+p-1).

    .venv/bin/python benchmarks/pipeline_bubble.py [--stages 2] [--quick]

`p` ranks (gloo, one torch thread each) train an FT-Transformer split by `raysys.parallel.pipeline` into
`p` parameter-balanced stages, with the global batch fixed and `m` microbatches, m in 1, 2, 4, 8, for
GPipe (and 1F1B where m >= p). Each stage's *busy* time is the time spent inside its `PipelineStage`'s
`forward_one_chunk` / `backward_one_chunk` and the last stage's loss (compute: the p2p waits are
outside them); a step's wall time
runs from a barrier to the end of the slowest stage's `schedule.step` (optimizer step excluded). Idle
fraction of a stage = 1 - busy / wall: with equal stages and free communication it is (p-1)/(m+p-1) for
both schedules. Figures are medians over repeated steps after warm-up; the steps go round-robin over the
configurations so that a change in machine load hits all of them alike.

On a 2-core machine p=2 gives each stage a core; p=4 oversubscribes and then measures the scheduler,
not the pipeline. The machine's load average is recorded: other processes stretch compute unevenly, and
two stages computing at once on a shared machine run slower than one alone, which inflates busy time and
so LOWERS the measured idle fraction (below theory at m=2 is the sign). As a pessimistic cross-check,
`idle_vs_solo_compute` = 1 - (the stage's busy time at m=1, where no two stages ever compute at once) /
wall: it counts every slowdown of compute relative to one whole-batch microbatch (contention, smaller
matmuls) as idle. `busy_inflation_vs_m1` gives that slowdown per stage.

Receives are posted up front (`raysys.parallel.pipeline._PrefetchMixin`, gloo only): with torch's own
schedules each transfer sat on the critical path (m=8 at d_model 128: idle 0.27 vs theory 0.11).
The last line printed is one JSON object; `m8_ratio_to_theory` = measured mean idle fraction / theory
at m=8 (GPipe).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

MICROBATCHES = (1, 2, 4, 8)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _instrument(runner, busy: list[float]) -> None:
    """Time every compute call of the stages the runner builds (wraps `PipelineStage` per instance)."""
    make_stage = runner._stage

    def timed_stage(module, microbatch):
        stage = make_stage(module, microbatch)
        for name in ("forward_one_chunk", "backward_one_chunk"):
            fn = getattr(stage, name)

            def wrapped(*a, _fn=fn, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    busy[0] += time.perf_counter() - t0

            setattr(stage, name, wrapped)
        return stage

    runner._stage = timed_stage
    make_schedule = runner._schedule

    def timed_schedule(mode, batch):
        sched = make_schedule(mode, batch)
        if not getattr(sched, "_bench_timed", False):
            fn = sched._compute_loss  # the last stage's loss is compute too

            def wrapped(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    busy[0] += time.perf_counter() - t0

            sched._compute_loss, sched._bench_timed = wrapped, True
        return sched

    runner._schedule = timed_schedule


def _rank_main(rank: int, world: int, port: int, args: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    from raysys.models import build_model
    from raysys.parallel.pipeline import build_pipeline

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    spec = args["spec"]
    batch = args["batch"]
    g = torch.Generator().manual_seed(0)
    x_num = torch.randn(batch, spec["num_numeric"], generator=g)
    x_cat = torch.zeros(batch, 0, dtype=torch.int64)
    y = torch.randint(0, spec["num_classes"], (batch,), generator=g)
    # every (schedule, m) gets its own runner up front; the timed steps then go round-robin over them so
    # that a change in machine load hits every configuration alike
    runs = {}
    for schedule in args["schedules"]:
        for m in MICROBATCHES:
            if schedule == "1f1b" and m < world:
                continue
            torch.manual_seed(0)
            runner = build_pipeline(build_model(spec), mesh["pp"], num_microbatches=m, schedule=schedule)
            busy = [0.0]
            _instrument(runner, busy)
            runs[f"{schedule}/{m}"] = (runner, busy, torch.optim.SGD(runner.parameters(), lr=1e-4))
    results: dict[str, list] = {key: [] for key in runs}
    for step in range(args["warmup"] + args["repeats"]):
        for key, (runner, busy, opt) in runs.items():
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            busy[0] = 0.0
            t0 = time.perf_counter()
            runner.step(x_num, x_cat, y)
            wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            own_busy = busy[0]
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # the step ends when its slowest stage does
            opt.step()
            if step >= args["warmup"]:
                results[key].append((own_busy, float(wall)))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, default=2, help="pipeline stages = processes (p)")
    ap.add_argument("--batch", type=int, default=512, help="global batch (fixed across m)")
    # big enough that a microbatch's compute (~50 ms a forward+backward at m=8) dwarfs what theory leaves out:
    # the fill and drain transfers and ~0.1 ms of Python per microbatch op. Quiet box, m=8 GPipe: d_model 128 x 2
    # blocks, batch 256: 1.37x theory (torch's own schedules: 2.5x); d_model 256 x 4, batch 256: 1.18x; batch
    # 512: 1.09x
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--blocks-per-stage", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per (schedule, m); medians reported")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller model and fewer repeats (smoke run)")
    a = ap.parse_args()
    if a.quick:
        a.batch, a.d_model, a.repeats, a.warmup = 64, 32, 3, 1
    p = a.stages
    spec = {"family": "ft_transformer", "num_numeric": 16, "cardinalities": [], "num_classes": 4,
            "d_model": a.d_model, "num_blocks": a.blocks_per_stage * p, "num_heads": 4, "ffn_mult": 4.0,
            "dropout": 0.0}
    args = {"spec": spec, "batch": a.batch, "repeats": a.repeats, "warmup": a.warmup,
            "schedules": ["gpipe", "1f1b"]}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(p, _free_port(), args, out), nprocs=p, join=True)
        per_rank = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(p)]
    elapsed = time.perf_counter() - t0

    results: dict[str, dict[str, dict]] = {}
    for key in per_rank[0]:
        schedule, m = key.split("/")
        m = int(m)
        theory = (p - 1) / (m + p - 1)
        idle_per_stage = []
        for r in range(p):
            idle_per_stage.append(statistics.median(1 - b / w for b, w in per_rank[r][key]))
        mean_idle = statistics.fmean(idle_per_stage)
        # contention check: at m=1 no two stages ever compute at once, so its busy time is each stage's solo
        # compute; concurrent compute on a shared machine runs slower, which inflates busy and so *lowers*
        # the measured idle fraction. `idle_vs_solo` counts that slowdown as idle instead.
        solo = [statistics.median(b for b, _ in per_rank[r]["gpipe/1"]) for r in range(p)]
        wall_med = statistics.median(w for _, w in per_rank[0][key])
        idle_vs_solo = statistics.fmean(1 - solo[r] / wall_med for r in range(p))
        results.setdefault(schedule, {})[str(m)] = {
            "theory": round(theory, 4),
            "idle_per_stage": [round(x, 4) for x in idle_per_stage],
            "idle_mean": round(mean_idle, 4),
            "ratio_to_theory": round(mean_idle / theory, 3),
            "idle_vs_solo_compute": round(idle_vs_solo, 4),
            "ratio_to_theory_vs_solo_compute": round(idle_vs_solo / theory, 3),
            "busy_inflation_vs_m1": [round(statistics.median(b for b, _ in per_rank[r][key]) / solo[r], 3)
                                     for r in range(p)],
            "step_s_median": round(statistics.median(w for _, w in per_rank[0][key]), 4),
            "busy_s_median_per_stage": [round(statistics.median(b for b, _ in per_rank[r][key]), 4)
                                        for r in range(p)],
        }
        print(f"{schedule:5s} m={m}: idle per stage {results[schedule][str(m)]['idle_per_stage']} "
              f"mean {mean_idle:.3f} vs theory {theory:.3f} (vs solo compute {idle_vs_solo:.3f}; busy x"
              f"{results[schedule][str(m)]['busy_inflation_vs_m1']} of m=1)", flush=True)

    out = {
        "benchmark": "pipeline_bubble",
        "m8_ratio_to_theory": results["gpipe"]["8"]["ratio_to_theory"],
        "m8_ratio_to_theory_1f1b": results.get("1f1b", {}).get("8", {}).get("ratio_to_theory"),
        "m8_ratio_to_theory_vs_solo_compute": results["gpipe"]["8"]["ratio_to_theory_vs_solo_compute"],
        "results": results,
        "setup": {
            "stages": p, "processes": p, "threads_per_rank": 1, "backend": "gloo", "global_batch": a.batch,
            "model": spec, "microbatches": list(MICROBATCHES), "repeats": a.repeats, "warmup_steps": a.warmup,
            "statistic": "median over timed steps of 1 - busy/wall per stage; mean over stages",
            "cpu_count": os.cpu_count(), "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2), "elapsed_s": round(elapsed, 1),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
