"""Benchmark: the ASHA + Optuna distillation sweep against full-budget random search, same number of trials.

    .venv/bin/python benchmarks/sweep.py [--quick] [--num-samples 48] [--train-rows 150000] [--repeats 5]
        [--rounds-log rounds.jsonl]

The defaults are a size users sweep at (48 trials on 150k synthetic training rows, with validation and test
splits of 15% of all rows each, 32,143 rows, as `raysys data import` splits a table; 5 rounds: about 2.5 hours on
a 2-core box, nearly all of it the random searches: 48 trials x 15 epochs, ~20-25 min a round; the tuned sweep
~4-5 min); `--num-samples 12 --train-rows 0 --num-epochs 30 --repeats 10` is the earlier, demo-sized setting.
The held-out splits grow with the training split because the accuracy figure is a maximum over trials: on the
preset's 4,000 validation rows (one accuracy's standard error ~0.45 points) the best of 48 fully trained random
trials is mostly noise (measured: the random sweep's best trial, 0.9235 on validation, scored 0.9077 on test; the
tuned sweep's, 0.9150 on validation, 0.9070), which favours whichever sweep trains more trials to the end.

One teacher (`--teacher`, a candidate of benchmarks/distill.py trained with its recipe there; default the
~0.1M-parameter ReLU MLP) and one set of soft targets (computed once before both sweeps, so neither pays for them),
then on the same Ray cluster, in alternating order over `--repeats` rounds, round r with seed
`distill.seed + r` for both (its own search draws, training seeds and transfer rows):

- tuned:  `search=optuna` (TPE, seeded) + `scheduler=asha` (grace 1 epoch, reduction factor 3; by default the
  promotion variant, raysys.distill.asha: trials wait at each rung and only the top third go on;
  `--asha-variant stopping` runs Tune's own ASHAScheduler instead);
- random: `search=random` + `scheduler=fifo`: every trial runs the full `num_epochs`.

Both sample the same space (temperature log 1..20, alpha 0.1..0.9, lr log, student width and depth) with
the same `num_samples` and the same number of trials at once (`--max-concurrent`; by default the product's:
one per core on this one-node local Ray; `max_concurrent_trials` in the JSON). Reported: `time_ratio` =
median tuned wall time / median random wall time, and `best_acc_delta` = (best validation accuracy of any
tuned trial - that of any random trial) in points, median over rounds; `chosen_test_acc_delta` = (test accuracy
of the student the tuned sweep chose - that of random's), in points, median over rounds: the model each delivers.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
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

import torch  # noqa: E402
from _common import start_quiet_ray
from distill import TEACHERS, make_cfg, test_accuracy, train_teacher  # noqa: E402

from raysys.data import Preprocessor, ensure_dataset, read_split  # noqa: E402
from raysys.distill import load_student_data, run_sweep  # noqa: E402
from raysys.models import build_model  # noqa: E402

log = logging.getLogger("bench")


def one_sweep(cfg, schema, pre, teacher, test, mode: str, tag: str) -> dict:
    c = cfg.model_copy(deep=True)
    if mode == "tuned":
        c.distill = c.distill.model_copy(update=dict(search="optuna", scheduler="asha"))
    else:
        c.distill = c.distill.model_copy(update=dict(search="random", scheduler="fifo"))
    # each sweep starts on an idle cluster: the last one's trial actors (and the soft targets' Ray Data actors
    # before the first) are still being stopped for a few seconds after it returns
    wait_for_idle_cluster()
    t0 = time.perf_counter()
    res = run_sweep(c, schema, pre, teacher, run_name=f"{mode}-{tag}")
    wall = time.perf_counter() - t0
    torch.set_num_threads(1)
    student = build_model(res.student_spec)
    student.load_state_dict(res.best_state_dict)
    accs = [t["best_val_accuracy"] for t in res.trials if t["best_val_accuracy"] is not None]
    out = {"wall_s": round(wall, 2), "best_val_accuracy": max(accs), "max_concurrent_trials": res.max_concurrent_trials,
           "epochs_run": sum(t["epochs_run"] for t in res.trials), "trials": len(res.trials),
           "stopped_early": sum(bool(t["stopped_early"]) for t in res.trials),
           "chosen_test_accuracy": round(test_accuracy(student.eval(), test), 4),
           "chosen_params": sum(p.numel() for p in student.parameters())}
    log.info("[%s %s] %s", mode, tag, out)
    return out


def wait_for_idle_cluster(timeout_s: float = 60.0) -> None:
    """Until every logical CPU of the cluster is free again (or `timeout_s`)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.2)
    log.warning("cluster still busy after %.0f s: %s free of %s CPUs", timeout_s,
                ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0))


def holdout_rows(train_rows: int, fraction: float) -> int:
    """Rows of a validation (or test) split holding `fraction` of all rows beside `train_rows` training rows and
    a test (or validation) split of the same size."""
    if not 0 < fraction < 0.5:
        raise ValueError(f"--holdout-fraction: must be in (0, 0.5), got {fraction}")
    return round(train_rows * fraction / (1 - 2 * fraction))


def logged_rounds(path: Path | None, setup_key: dict) -> dict[int, dict]:
    """The rounds a `--rounds-log` file holds for this setup, by round number (the last line of a round wins)."""
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("setup") == setup_key:
            out[int(rec["round"])] = {m: rec[m] for m in ("tuned", "random")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller data and sweeps (a smoke run)")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "digits"])
    p.add_argument("--num-samples", type=int, default=48, help="trials per sweep (a size users run)")
    p.add_argument("--train-rows", type=int, default=150_000,
                   help="synthetic training rows (the demo preset has 20k; 0: the preset's)")
    p.add_argument("--holdout-fraction", type=float, default=0.15,
                   help="with --train-rows: the validation and the test split each hold this fraction of all rows "
                        "(default 0.15, as `raysys data import` splits a table: 32,143 each beside 150k training "
                        "rows); 0 keeps the preset's 4,000")
    p.add_argument("--num-epochs", type=int, default=None, help="full budget per trial (default from the preset)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of (tuned, random), order alternating")
    p.add_argument("--rounds-log", type=Path, default=None,
                   help="a JSON-lines file each finished round is appended to; rounds already in it (same setup) are "
                        "not run again and count in the summary, so a long run stopped half-way goes on where it "
                        "stopped")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA grace period (default from the config: 1)")
    p.add_argument("--reduction-factor", type=int, default=None, help="ASHA reduction factor (default from the config: 3)")
    p.add_argument("--asha-variant", default=None, choices=["promotion", "stopping"],
                   help="ASHA variant of the tuned sweep (default from the config: promotion)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once, both sweeps (default from the config: the cluster's CPUs, "
                        "at most one per core on a one-node local Ray)")
    p.add_argument("--teacher", default="mlp_relu", choices=list(TEACHERS["synthetic"]),
                   help="the teacher whose soft targets both sweeps distill (a candidate of benchmarks/distill.py, "
                        "trained with its recipe there; default the ~0.1M-parameter ReLU MLP)")
    args = p.parse_args(argv)
    import ray

    start_quiet_ray(("ray", "ray.tune", "ray.data"))
    logical_cpus = int(ray.cluster_resources().get("CPU", 0))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysys-bench-sweep-") as tmp:
        cfg = make_cfg(Path(tmp), args.dataset, args.quick)
        if args.dataset == "synthetic" and args.train_rows and not args.quick:
            cfg.data = cfg.data.model_copy(update=dict(num_train_rows=args.train_rows))
            if args.holdout_fraction:
                holdout = holdout_rows(args.train_rows, args.holdout_fraction)
                cfg.data = cfg.data.model_copy(update=dict(num_val_rows=holdout, num_test_rows=holdout))
        upd = {"num_samples": args.num_samples}
        if args.num_epochs:
            upd["num_epochs"] = args.num_epochs
        if args.grace_period:
            upd["grace_period"] = args.grace_period
        if args.reduction_factor:
            upd["reduction_factor"] = args.reduction_factor
        if args.max_concurrent:
            upd["max_concurrent_trials"] = args.max_concurrent
        if args.asha_variant:
            upd["asha_variant"] = args.asha_variant
        cfg.distill = cfg.distill.model_copy(update=upd)
        schema = ensure_dataset(cfg.data)
        pre = Preprocessor.fit_split(schema, cfg.data.root)
        torch.set_num_threads(1)
        model_cfg, recipe = TEACHERS[args.dataset][args.teacher]
        if args.quick:
            recipe = dataclasses.replace(recipe, epochs=max(1, recipe.epochs // 2))
        train, val, test = (pre.transform_table(read_split(cfg.data.root, s)) for s in ("train", "validation", "test"))
        teacher, teacher_info = train_teacher(schema, model_cfg, recipe, train, val)
        log.info("teacher %s: %s", args.teacher, teacher_info)
        # round r uses distill.seed + r: its own Optuna and random-search draws, training seeds and MUNGE
        # transfer rows, so the median over rounds is over different draws, not copies of one. The soft
        # targets and each round's transfer rows are computed here, before any sweep is timed.
        setup_key = {"dataset": args.dataset, "teacher": args.teacher, "num_samples": args.num_samples,
                     "train_rows": cfg.data.num_train_rows if args.dataset == "synthetic" else None,
                     "val_rows": cfg.data.num_val_rows if args.dataset == "synthetic" else None,
                     "num_epochs": cfg.distill.num_epochs, "grace_period": cfg.distill.grace_period,
                     "reduction_factor": cfg.distill.reduction_factor, "asha_variant": cfg.distill.asha_variant,
                     "max_concurrent": args.max_concurrent, "quick": args.quick}
        done = logged_rounds(args.rounds_log, setup_key)
        todo = [r for r in range(args.repeats) if r not in done]
        if done:
            log.info("rounds %s already in %s; running %s", sorted(done), args.rounds_log, todo)
        round_cfgs = {r: cfg.model_copy(update={"distill": cfg.distill.model_copy(
            update={"seed": cfg.distill.seed + r})}) for r in todo}
        for c in round_cfgs.values():
            load_student_data(c, pre, teacher)
        for r, c in round_cfgs.items():
            order = ["tuned", "random"] if r % 2 == 0 else ["random", "tuned"]
            done[r] = {m: one_sweep(c, schema, pre, teacher, test, m, str(r)) for m in order}
            if args.rounds_log is not None:
                with args.rounds_log.open("a") as f:
                    f.write(json.dumps({"round": r, "setup": setup_key, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                        **done[r]}) + "\n")
        rounds = [done[r] for r in sorted(done) if r < args.repeats]
    ray.shutdown()
    ratios = [rd["tuned"]["wall_s"] / rd["random"]["wall_s"] for rd in rounds]
    deltas = [100 * (rd["tuned"]["best_val_accuracy"] - rd["random"]["best_val_accuracy"]) for rd in rounds]
    test_deltas = [100 * (rd["tuned"]["chosen_test_accuracy"] - rd["random"]["chosen_test_accuracy"]) for rd in rounds]
    out = {
        "time_ratio": round(statistics.median(ratios), 3),
        "best_acc_delta": round(statistics.median(deltas), 2),
        "chosen_test_acc_delta": round(statistics.median(test_deltas), 2),
        "epoch_ratio": round(statistics.median(rd["tuned"]["epochs_run"] / rd["random"]["epochs_run"]
                                               for rd in rounds), 3),
        "rounds": rounds,
        "targets_met": {"time_ratio<=0.35": statistics.median(ratios) <= 0.35,
                        "best_acc_delta>=-0.5": statistics.median(deltas) >= -0.5},
        "setup": {**setup_key,
                  "space": {"temperature": cfg.distill.temperature_range, "alpha": cfg.distill.alpha_range,
                            "lr": cfg.distill.lr_range, "widths": cfg.distill.student_widths,
                            "depths": cfg.distill.student_depths},
                  "max_concurrent_trials": rounds[0]["tuned"]["max_concurrent_trials"],
                  "logical_cpus": logical_cpus,
                  "cpus": os.cpu_count(), "repeats": args.repeats,
                  "best_acc": "validation accuracy of the best trial (points)",
                  "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
                  "wall_s": round(time.perf_counter() - t_start, 1)},
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
