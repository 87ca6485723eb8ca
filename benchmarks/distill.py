"""Benchmark: does distillation earn its place? On the synthetic demo data and on scikit-learn's bundled
digits data (real 8x8 handwritten digits, 1797 rows, 64 features, 10 classes).

    .venv/bin/python benchmarks/distill.py [--quick]

Per data set: train the teacher (plain torch, one process: this measures distillation, not Ray Train; the
same TabularMLP family and size that `raysys train` trains from the demo config), compute its soft targets
once with Ray Data, run the ASHA + Optuna sweep over temperature, alpha, lr and student width/depth, and
pick the smallest student within `accuracy_gap` of the teacher. Then, on the test split:

The transfer set (`distill.transfer_multiplier`, here 4): besides the labeled training rows, the teacher
scores 4x as many UNLABELED rows made from the training split by MUNGE (Bucila et al. 2006, "Model
compression": each new row mixes a training row with its nearest neighbour, attribute by attribute), with
Ray Data like the other soft targets. They feed only the soft KD term; validation and test rows are never
used. A no-KD student (alpha = 0) cannot use unlabeled rows, so it trains on the labeled rows alone, with
the same labeled batches, steps, lr, epochs and seeds.

- teacher accuracy, chosen student accuracy, retention (student / teacher), param_ratio;
- latency with one torch thread, eager `inference_mode` calls exactly as the Serve replica makes them, the
  same path for teacher and student: per row (one row per call, p50) and per row inside a batch of 64;
  `latency_speedup` = teacher / student per-row p50 at batch 1, `latency_speedup_batched` the same at
  batch 64 (median of 3 measurements); `call_floor_ms` is one bare nn.Linear called the same way, the
  per-call overhead no eager torch model can go below;
- `kd_minus_nokd`: the chosen student's architecture and lr retrained outside the sweep with its (T, alpha)
  and without distillation (alpha = 0, plain cross-entropy), same epochs, each keeping its best validation
  epoch, over 5 seeds; median test accuracy difference in points, with every seed's accuracies, the paired
  per-seed differences and their min/max (`kd_minus_nokd_per_seed`) so the noise is visible;
- the dynamic-int8 variant's accuracy and latency;
- what precomputed soft targets saved: one epoch with the teacher run on every batch (online KD) vs one
  epoch reading stored logits, times the epochs the sweep ran, minus the Ray Data precompute.

The last line printed is one JSON object.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import start_quiet_ray

from raysys.config import DataConfig, ModelConfig, PipelineConfig, preset  # noqa: E402
from raysys.data import Preprocessor, ensure_dataset, read_split  # noqa: E402
from raysys.distill import (  # noqa: E402
    StudentData,
    fit_student,
    load_student_data,
    precompute_teacher_logits,
    quantize_dynamic_int8,
    run_sweep,
)
from raysys.evaluate import measure_latency  # noqa: E402
from raysys.models import build_model, model_spec, num_parameters, predict_logits  # noqa: E402

log = logging.getLogger("bench")
TRANSFER_MULTIPLIER = 4.0  # unlabeled MUNGE transfer rows per labeled training row (soft targets only)


def digits_dataset(root: Path):
    """scikit-learn's digits (shipped inside the package, no download) in the raysys dataset layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    from raysys.data.byod import import_parquet

    out = root / "digits"
    if not (out / "schema.json").exists():
        d = load_digits()
        cols = {f"px{i}": d.data[:, i].astype(np.float64) for i in range(d.data.shape[1])}
        cols["digit"] = d.target.astype(np.int64)
        src = root / "digits_src.parquet"
        pq.write_table(pa.table(cols), src)
        import_parquet(src, out, label="digit", val_fraction=0.15, test_fraction=0.15, seed=0)
    return out


def make_cfg(root: Path, name: str, quick: bool) -> PipelineConfig:
    cfg = preset("demo").with_root(root / name)
    if name == "digits":
        cfg.data = DataConfig(root=str(digits_dataset(root)), source="parquet")
        cfg.distill = cfg.distill.model_copy(update=dict(
            num_epochs=20 if quick else 40, batch_size=64, student_widths=[8, 16, 32], student_depths=[1, 2],
            lr_range=(1e-3, 3e-2)))
        # 1259 training rows: the teacher needs dropout to generalise (an overfit teacher teaches its errors)
        cfg.teacher = ModelConfig(hidden_dims=[256, 256, 128], embed_dim=8, dropout=0.2)
    else:
        if quick:
            cfg.data = cfg.data.model_copy(update=dict(num_train_rows=6000, num_val_rows=1500, num_test_rows=2000))
        cfg.distill = cfg.distill.model_copy(update=dict(
            num_epochs=8 if quick else 15, student_widths=[8, 16, 32], student_depths=[1, 2]))
    cfg.distill = cfg.distill.model_copy(update=dict(
        search="optuna", scheduler="asha", num_samples=6 if quick else 12, grace_period=2, reduction_factor=3,
        accuracy_gap=0.01, max_concurrent_trials=None, transfer_multiplier=TRANSFER_MULTIPLIER))
    return cfg


def train_teacher(cfg: PipelineConfig, schema, pre, *, epochs: int, lr: float = 2e-3, batch: int = 128):
    """A plain single-process teacher, best validation epoch kept (the benchmark's subject is distillation)."""
    x_num, x_cat, y = (torch.from_numpy(a) for a in pre.transform_table(read_split(cfg.data.root, "train")))
    vx, vc, vy = pre.transform_table(read_split(cfg.data.root, "validation"))
    torch.manual_seed(0)
    model = build_model(model_spec(schema, cfg.teacher))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    best, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x_num[idx], x_cat[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = float((predict_logits(model, vx, vc).argmax(1).numpy() == vy).mean())
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval()


def teacher_epochs(name: str, quick: bool) -> int:
    return (60 if name == "digits" else 20) // (2 if quick else 1)


def test_accuracy(model, arrays) -> float:
    x, c, y = arrays
    return float((predict_logits(model, x, c).argmax(1).numpy() == y).mean())


def best_epoch_fit(config: dict, data: StudentData, **kw):
    """fit_student keeping the best validation epoch's weights (what the sweep's checkpoints do)."""
    best = {"acc": -1.0, "state": None}

    def report(m, sd):
        if m["val_accuracy"] > best["acc"]:
            best.update(acc=m["val_accuracy"], state=sd)

    fit_student(config, data, report, **kw)
    model = build_model(config["student_spec"])
    model.load_state_dict(best["state"])
    return model.eval()


class CallFloor(torch.nn.Module):
    """One Linear on the numeric features: the least an eager model call costs (dispatch, no real compute)."""

    def __init__(self, num_numeric: int, num_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(num_numeric, num_classes)

    def forward(self, x_num, x_cat):
        return self.linear(x_num)


def latency_medians(model, x, c, repeats: int = 3) -> dict:
    runs = [measure_latency(model, x, c, batch_size=64, repeats=300, warmup=20, seed=i) for i in range(repeats)]
    return {"per_row_p50_ms": statistics.median(r["per_row_ms"]["p50"] for r in runs),
            "per_row_p99_ms": statistics.median(r["per_row_ms"]["p99"] for r in runs),
            "per_row_in_batch64_ms": statistics.median(r["per_row_in_batch_ms"] for r in runs)}


def epoch_seconds(config: dict, data: StudentData, teacher=None, repeats: int = 3) -> float:
    cfg1 = {**config, "num_epochs": 1}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit_student(cfg1, data, teacher=teacher)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_dataset(name: str, root: Path, quick: bool, seeds: int) -> dict:
    cfg = make_cfg(root, name, quick)
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    teacher = train_teacher(cfg, schema, pre, epochs=teacher_epochs(name, quick))
    teacher_s = time.perf_counter() - t0
    test = pre.transform_table(read_split(cfg.data.root, "test"))
    t_acc = test_accuracy(teacher, test)
    log.info("[%s] teacher test accuracy %.4f (%d params) in %.0fs", name, t_acc, num_parameters(teacher), teacher_s)

    t0 = time.perf_counter()
    sweep = run_sweep(cfg, schema, pre, teacher, run_name=f"bench-{name}")
    sweep_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    student = build_model(sweep.student_spec)
    student.load_state_dict(sweep.best_state_dict)
    student.eval()
    s_acc = test_accuracy(student, test)

    # KD vs no KD: the chosen architecture and recipe, retrained outside the sweep, several seeds
    data, _, targets = load_student_data(cfg, pre, teacher)
    base = {"student_spec": sweep.student_spec, "num_epochs": cfg.distill.num_epochs,
            "batch_size": cfg.distill.batch_size, "lr": sweep.best_config["lr"]}
    # the KD runs also see the unlabeled transfer rows (soft term only); alpha = 0 ignores them by construction
    kd, nokd = [], []
    for seed in range(seeds):
        kd.append(test_accuracy(best_epoch_fit({**base, "seed": seed, "temperature": sweep.best_config["temperature"],
                                                "alpha": sweep.best_config["alpha"]}, data), test))
        nokd.append(test_accuracy(best_epoch_fit({**base, "seed": seed, "temperature": 1.0, "alpha": 0.0}, data),
                                  test))

    t_lat = latency_medians(teacher, test[0], test[1])
    floor = latency_medians(CallFloor(test[0].shape[1], schema.num_classes), test[0], test[1])
    s_lat = latency_medians(student, test[0], test[1])
    q = quantize_dynamic_int8(student)
    q_acc = test_accuracy(q, test)
    q_lat = latency_medians(q, test[0], test[1])

    # soft targets: what running the teacher inside every trial epoch would have cost
    kd_cfg = {**base, "seed": 0, "temperature": sweep.best_config["temperature"], "alpha": sweep.best_config["alpha"]}
    t0 = time.perf_counter()
    precompute_teacher_logits(teacher, data.x_num, data.x_cat)
    precompute_teacher_logits(teacher, data.val_x_num, data.val_x_cat)
    in_process_s = time.perf_counter() - t0
    e_pre = epoch_seconds(kd_cfg, data)
    e_online = epoch_seconds(kd_cfg, data, teacher=teacher)
    sweep_epochs = sum(t["epochs_run"] for t in sweep.trials)
    ray_data_s = float(sweep.soft_targets["compute_seconds"])
    online_extra = sweep_epochs * (e_online - e_pre)  # teacher time the trials would have spent

    t_params, s_params = num_parameters(teacher), num_parameters(student)
    out = {
        "rows": {"train": int(len(data.y)), "validation": int(len(data.val_y)), "test": int(len(test[2]))},
        "num_classes": schema.num_classes,
        "teacher_accuracy": round(t_acc, 4), "teacher_params": t_params,
        "best_student_accuracy": round(s_acc, 4), "student_params": s_params,
        "student_hidden_dims": sweep.student_spec["hidden_dims"], "best_config": sweep.best_config,
        "retention": round(s_acc / t_acc, 4), "param_ratio": round(s_params / t_params, 4),
        "latency_speedup": round(t_lat["per_row_p50_ms"] / s_lat["per_row_p50_ms"], 2),
        "latency_speedup_batched": round(t_lat["per_row_in_batch64_ms"] / s_lat["per_row_in_batch64_ms"], 2),
        "teacher_latency_ms": {k: round(v, 5) for k, v in t_lat.items()},
        "call_floor_ms": {k: round(v, 5) for k, v in floor.items()},
        "student_latency_ms": {k: round(v, 5) for k, v in s_lat.items()},
        "kd_accuracy_median": round(statistics.median(kd), 4), "nokd_accuracy_median": round(statistics.median(nokd), 4),
        "kd_minus_nokd": round(100 * (statistics.median(kd) - statistics.median(nokd)), 2),
        "kd_accuracies": [round(a, 4) for a in kd], "nokd_accuracies": [round(a, 4) for a in nokd],
        "kd_minus_nokd_per_seed": [round(100 * (a - b), 2) for a, b in zip(kd, nokd)],
        "kd_minus_nokd_min_max": [round(100 * min(a - b for a, b in zip(kd, nokd)), 2),
                                  round(100 * max(a - b for a, b in zip(kd, nokd)), 2)],
        "transfer": sweep.soft_targets.get("transfer"),
        "int8": {"accuracy": round(q_acc, 4), "latency_ms": {k: round(v, 5) for k, v in q_lat.items()},
                 "speedup_vs_float_student": round(s_lat["per_row_p50_ms"] / q_lat["per_row_p50_ms"], 2)},
        "soft_targets": {"ray_data_compute_s": round(ray_data_s, 2), "in_process_compute_s": round(in_process_s, 3),
                         "epoch_s_precomputed": round(e_pre, 4), "epoch_s_online_teacher": round(e_online, 4),
                         "sweep_epochs": sweep_epochs,
                         "online_teacher_extra_s": round(online_extra, 2),
                         "saved_s_vs_online_ray_data": round(online_extra - ray_data_s, 2),
                         "saved_s_vs_online_in_process": round(online_extra - in_process_s, 2),
                         "trial_epoch_speedup": round(e_online / e_pre, 2)},
        "sweep": {"trials": len(sweep.trials), "wall_s": round(sweep_s, 1), "teacher_val_accuracy":
                  round(sweep.teacher_val_accuracy, 4), "chosen_val_accuracy": round(sweep.best_val_accuracy, 4),
                  "selection_rule": sweep.selection_rule, "pareto_size": len(sweep.pareto),
                  "summary_md": sweep.summary_files.get("markdown")},
        "targets_met": {"retention>=0.97": s_acc / t_acc >= 0.97, "param_ratio<=0.10": s_params / t_params <= 0.10,
                        "latency_speedup>=5": t_lat["per_row_p50_ms"] / s_lat["per_row_p50_ms"] >= 5,
                        "kd_beats_nokd": statistics.median(kd) > statistics.median(nokd)},
    }
    log.info("[%s] %s", name, json.dumps(out))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller data and sweeps (a smoke run)")
    p.add_argument("--datasets", default="synthetic,digits")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the KD vs no-KD comparison")
    p.add_argument("--root", default=None, help="work directory (default: a temp dir)")
    args = p.parse_args(argv)
    import ray

    start_quiet_ray(("ray", "ray.tune", "ray.data", "ray.train"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysys-bench-distill-") as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        results = {name: run_dataset(name, root, args.quick, args.seeds) for name in args.datasets.split(",")}
    ray.shutdown()
    setup = {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
             "cpus": os.cpu_count(), "threads_for_latency": 1, "quick": args.quick, "seeds": args.seeds,
             "latency": "median of 3 runs x 300 calls, 1 torch thread, eager inference_mode (the Serve replica's "
                        "path, same for both models); latency_speedup = teacher/student per-row p50 at batch 1, "
                        "latency_speedup_batched at batch 64",
             "transfer_set": f"labeled training rows + {TRANSFER_MULTIPLIER:g}x as many unlabeled MUNGE rows made "
                             "from the training split, scored by the teacher with Ray Data (soft term only); the "
                             "no-KD student trains on the labeled rows with the same batches, steps, lr and seeds",
             "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps({**results, "setup": setup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
