"""GPU check: the same teacher training and scoring code on CUDA (NCCL) with bf16 mixed precision, against the
CPU fp32 reference of the same run.

    .venv/bin/python benchmarks/gpu_check.py [--epochs 3] [--preset tiny]

On a machine without CUDA it runs nothing and prints {"benchmark": "gpu_check", "cuda": false, ...} (exit 0).
With CUDA, on a local Ray with the machine's GPUs, each strategy that fits the GPUs present trains the teacher
of `--preset` for `--epochs` epochs with `train.use_gpu` (one GPU per Ray Train worker, `train.mixed_precision`
auto = bf16): with one GPU ddp, zero1 and zero3 at world size 1 (the strategies' single-rank path: the model,
its batches and optimizer state on the GPU); with N >= 2, ddp, zero1, zero2 and zero3 on N workers, and tensor
and pipeline on 2. Then the same run on CPU workers in fp32 (the reference). Reported per strategy: samples/s of
the last epoch, the peak GPU memory per rank (`torch.cuda.max_memory_allocated`, from the epoch metrics), the
final train/validation losses and their relative difference from the CPU reference (bf16 keeps ~3 significant
digits, so within `--tolerance`, 5% by default); then the registered-model path on CUDA: the trained weights
loaded into the single-device model on the GPU score a validation batch, against the same model on CPU (top-1
agreement and max |logit difference|).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def plan(gpus: int) -> list[tuple[str, int]]:
    """(strategy, workers) pairs that fit `gpus` GPUs (one per worker)."""
    if gpus <= 0:
        return []
    if gpus == 1:
        return [("ddp", 1), ("zero1", 1), ("zero3", 1)]
    return [("ddp", gpus), ("zero1", gpus), ("zero2", gpus), ("zero3", gpus), ("tensor", 2), ("pipeline", 2)]


def _run(cfg, schema, pre, strategy: str, workers: int, gpu: bool, name: str) -> dict:
    from raysys.train import train_teacher

    c = cfg.model_copy(deep=True)
    c.train = c.train.model_copy(update=dict(strategy=strategy, num_workers=workers, use_gpu=gpu,
                                             cpus_per_worker=1.0))
    t0 = time.perf_counter()
    res = train_teacher(c, schema, pre, run_name=name)
    last = res.metrics[-1]
    return {"strategy": strategy, "workers": workers, "device": "cuda" if gpu else "cpu",
            "wall_s": round(time.perf_counter() - t0, 1), "samples_per_s": round(last["samples_per_s"], 1),
            "train_loss": last["train_loss"], "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"],
            "gpu_max_allocated_mb_per_rank": [round(b / 2**20, 1) for b in
                                              last.get("gpu_per_rank_max_allocated_bytes", [])],
            "state_mb_max_per_rank": round(last["mem_max_total_bytes"] / 2**20, 2), "_result": res}


def _serving_check(res, pre, root: str) -> dict:
    """The trained single-device model on CUDA vs on CPU, over one validation batch."""
    from raysys.data import read_split

    x_num, x_cat, _ = pre.transform_table(read_split(root, "validation"))
    x_num, x_cat = torch.as_tensor(x_num[:4096]), torch.as_tensor(x_cat[:4096])
    cpu = res.load_model()
    gpu = res.load_model().to("cuda")
    with torch.no_grad():
        a = cpu(x_num, x_cat)
        t0 = time.perf_counter()
        b = gpu(x_num.cuda(), x_cat.cuda())
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000
    b = b.cpu()
    return {"rows": len(a), "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
            "max_abs_logit_diff": float((a - b).abs().max()), "cuda_batch_ms": round(ms, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="the teacher and data of this preset (default tiny)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.05, help="relative loss difference allowed vs CPU fp32")
    args = p.parse_args(argv)
    info = {"benchmark": "gpu_check", "cuda": torch.cuda.is_available(), "torch": torch.__version__,
            "python": platform.python_version()}
    if not info["cuda"]:
        print(json.dumps({**info, "note": "no CUDA device: nothing ran"}))
        return 0
    import ray
    from _common import scratch_dir, start_quiet_ray

    from raysys.config import preset
    from raysys.data import Preprocessor, ensure_dataset

    gpus = torch.cuda.device_count()
    info.update(gpus=gpus, device_name=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda,
                nccl=".".join(map(str, torch.cuda.nccl.version())), bf16_supported=torch.cuda.is_bf16_supported())
    start_quiet_ray()
    root = scratch_dir("raysys-gpu-check-")
    cfg = preset(args.preset).with_root(root)
    cfg.train = cfg.train.model_copy(update=dict(num_epochs=args.epochs))
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    runs, failures = [], []
    try:
        reference = _run(cfg, schema, pre, "ddp", 1, False, "cpu-reference")
        for strategy, workers in plan(gpus):
            try:
                runs.append(_run(cfg, schema, pre, strategy, workers, True, f"gpu-{strategy}-{workers}"))
            except Exception as e:  # one strategy's failure is a finding, not the end of the check
                failures.append({"strategy": strategy, "workers": workers, "error": f"{type(e).__name__}: {e}"[:2000]})
        for r in runs:
            for k in ("train_loss", "val_loss"):
                r[f"{k}_rel_diff_vs_cpu"] = round(abs(r[k] - reference[k]) / abs(reference[k]), 4)
            r["within_tolerance"] = all(r[f"{k}_rel_diff_vs_cpu"] <= args.tolerance for k in ("train_loss", "val_loss"))
        serving = _serving_check(runs[0]["_result"], pre, cfg.data.root) if runs else None
    finally:
        ray.shutdown()
    for r in [reference, *runs]:
        r.pop("_result", None)
    out = {**info, "preset": args.preset, "epochs": args.epochs, "tolerance": args.tolerance,
           "cpu_reference": reference, "runs": runs, "failures": failures, "serving": serving,
           "all_within_tolerance": bool(runs) and not failures and all(r["within_tolerance"] for r in runs),
           "cpus": os.cpu_count()}
    print(json.dumps(out))
    return 0 if out["all_within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
