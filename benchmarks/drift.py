"""Drift monitoring benchmark: calibration (ERT), detection delays, window-test speed, actor ingest.

    .venv/bin/python benchmarks/drift.py            # ~5 min on 2 cores
    .venv/bin/python benchmarks/drift.py --quick    # smaller, for a smoke run
    .venv/bin/python benchmarks/drift.py --no-ray --no-evidently   # no local Ray, no Evidently venv

Streams come from the synthetic generator (`SyntheticTask` + `DriftSpec`) with 50 features (45 numeric,
5 categorical of 5 levels; x41:x42 and x43:x44 correlated pairs, x39 and x40 outside the rule) and 4 classes; an MLP (256-128, trained here on 400k generated rows, ~20 s,
~0.91 accurate) supplies the predicted probabilities. The reference profile is built from 20k undrifted rows; the
online detector is calibrated by bootstrap from 10k held-out rows to ERT = 10,000 rows.

Measured, in the same run:
- no-drift run lengths (>= 200 alarms, the detector restarting after each) -> ert_ratio = mean / ERT, and
  which chart raised them (`details.ert.alarms_by_chart`: the split of the false-alarm budget);
- median detection delay (rows after the change; 200 undrifted rows precede it) per scenario: mean shifts
  of 1 / 0.5 / 0.25 sigma, a class-prior flip, c1's frequencies reversed (`categorical_shift`), x7 growing
  from 0 to 1 sigma over 1,000 rows (`ramp`), the correlation of x43:x44 flipping from 0.6 to -0.6 with
  both marginals unchanged (`joint_shift`), and x40, outside the label rule, moving by 1 sigma
  (`neutral_shift`: drift that costs no accuracy, `details.accuracy.neutral_shift`);
- beside each of prior_flip, categorical_shift, ramp and joint_shift an oracle that KNOWS the change, alone
  at the same ERT (its own threshold simulated on undrifted streams; `_drift_oracles.py`), and
  `delay_over_oracle` = the detector's median delay / the oracle's; for the prior flip also the
  detector's own prior chart alone (`details.oracles.prior_flip.direction_unknown`);
- eval_ms: one window evaluation (1k window x 50 features against a 10k-row reference profile: PSI, JS,
  KS on the binned CDF, chi-squared, BH) beside scipy.stats.ks_2samp over the same 45 numeric columns
  against the 10k reference rows, and whether both give the same drifted/undrifted verdicts (BH, alpha);
- ingest_rows_per_s: rows per second one MonitorActor takes through `record.remote` (a local Ray;
  `--no-ray` skips it and starts no Ray: null);
- request_overhead_p50_ms: what a request pays for monitoring (MonitorLink.add into the replica buffer);
- reference_bytes: the profile's JSON size;
- accuracy: realised vs the confidence-based estimate on undrifted and label-shifted traffic.
- speedup_vs_evidently: Evidently's default `Report([DataDriftPreset()])` on the same reference and 1k
  windows (numeric columns as floats, categoricals as strings), run by `_evidently_peer.py` in its own
  virtualenv (`.venv-evidently`, created on first use: Evidently pins pandas/plotly/... versions that must
  not enter the project's environment); its per-column verdicts are reported beside ours. `--no-evidently`
  skips it (speedup_vs_evidently is then null, with the reason).
Prints one JSON object as its LAST line.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raysys.config import DataConfig, ModelConfig  # noqa: E402
from raysys.data import DriftSpec, Preprocessor, SyntheticTask  # noqa: E402
from raysys.models import build_model, model_spec  # noqa: E402
from raysys.monitor.drift import WindowTester  # noqa: E402
from raysys.monitor.online import detector_for, score_rows  # noqa: E402
from raysys.monitor.profile import ReferenceProfile  # noqa: E402
from raysys.monitor.stats import adjust_pvalues  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _drift_oracles as oracles  # noqa: E402

ERT = 10_000
PRE_CHANGE = 200
N_NUM, N_CAT, N_CATEGORIES, N_CLASSES = 45, 5, 5, 4
MODEL_TRAIN_ROWS, MODEL_HIDDEN = 400_000, (256, 128)
# x41:x42 and x43:x44 are drawn with correlation PAIR_RHO (what `joint_shift` flips); x39 and x40 do not enter
# the label rule (what `neutral_shift` moves)
N_PAIRS, PAIR_RHO, N_NUISANCE = 2, 0.6, 2


class World:
    def __init__(self, seed: int = 0):
        self.cfg = DataConfig(num_numeric=N_NUM, num_categorical=N_CAT, num_categories=N_CATEGORIES,
                              num_classes=N_CLASSES, seed=seed, correlated_pairs=N_PAIRS,
                              pair_correlation=PAIR_RHO, nuisance_features=N_NUISANCE)
        self.task = SyntheticTask(self.cfg)
        self.schema = self.task.schema()
        self.ident = Preprocessor(self.schema, [0.0] * N_NUM, [1.0] * N_NUM)
        train = self.task.sample(MODEL_TRAIN_ROWS, [seed, 7])
        self.pre = Preprocessor.fit(self.schema, train)
        t0 = time.perf_counter()
        self.model = self._train(train)
        self.train_s = time.perf_counter() - t0

    def _train(self, table, epochs: int = 10, batch: int = 512, lr: float = 3e-3):
        """The monitored model: an MLP trained to ~0.91 accuracy on 400k generated rows (the rule's own
        accuracy is ~0.98: 3% of labels are resampled). How much a class-prior flip moves the predicted
        probabilities depends on how well the model separates the classes: the model of earlier versions of
        this benchmark (64-32, 20k rows, 4 epochs, ~0.77 accurate) moved them by 0.26 nats per row, this one
        by ~0.36 (`details.prior_flip_oracle.kl_per_row`), and every delay the prediction chart helps with
        scales with it."""
        torch.manual_seed(0)
        model = build_model(model_spec(self.schema, ModelConfig(hidden_dims=list(MODEL_HIDDEN), embed_dim=4)))
        xn, xc, y = (torch.as_tensor(a) for a in self.pre.transform_table(table))
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        steps = epochs * -(-len(y) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        for _ in range(epochs):
            perm = torch.randperm(len(y))
            for i in range(0, len(y), batch):
                b = perm[i:i + batch]
                loss = torch.nn.functional.cross_entropy(model(xn[b], xc[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        return model.eval()

    def arrays(self, n: int, seed, drift: DriftSpec | None = None):
        """raw numeric, category indices, labels, predicted probabilities."""
        table = self.task.sample(n, seed, drift)
        x_num, x_cat, y = self.ident.transform_table(table)
        with torch.inference_mode():
            logits = self.model(torch.as_tensor(self.pre.standardize(x_num), dtype=torch.float32),
                                torch.as_tensor(x_cat))
            proba = torch.softmax(logits.double(), 1).numpy()
        return x_num, x_cat, y, proba


JOINT_PAIR = ("x43", "x44")


def scenario_specs(world: World) -> dict[str, DriftSpec]:
    rev = world.task.cat_probs[1][::-1]
    cats = world.task.categories[1]
    others = {c: 0.1 for c in world.task.classes[1:]}
    return {
        "sigma1_1of50": DriftSpec(covariate={"x7": 1.0}),
        "sigma05_1of50": DriftSpec(covariate={"x7": 0.5}),
        "sigma025_5of50": DriftSpec(covariate={f"x{i}": 0.25 for i in range(5, 10)}),
        "prior_flip": DriftSpec(label_priors={world.task.classes[0]: 0.7, **others}),
        # c1's frequencies reversed (KL 0.055 nats a row)
        "categorical_shift": DriftSpec(categorical={"c1": {c: float(p) for c, p in zip(cats, rev)}}),
        # x7 drifts linearly from 0 to 1 sigma over 1000 rows, then stays
        "ramp": DriftSpec(covariate={"x7": 1.0}, ramp_rows=1000),
        # the correlation of x43 and x44 flips from 0.6 to -0.6; both marginals unchanged
        "joint_shift": DriftSpec(correlation={":".join(JOINT_PAIR): -PAIR_RHO}),
        # x40 (outside the label rule) moves by 1 sigma: drift, but not a loss of accuracy
        "neutral_shift": DriftSpec(covariate={f"x{N_NUM - 2 * N_PAIRS - 1}": 1.0}),
    }


def run_detector(profile, S: np.ndarray, batch: int = 500) -> list[int]:
    """Feeds score rows to a fresh detector; returns the alarm rows (stream offsets)."""
    det = detector_for(profile)
    rows = []
    for lo in range(0, len(S), batch):
        rows += [lo + a["row"] for a in det.update(S[lo:lo + batch])]
    return rows


def measure_ert(world: World, profile, min_alarms: int, max_rows: int) -> dict:
    det = detector_for(profile)
    rows = alarms = 0
    lengths = []
    by_chart: dict[str, int] = {}
    chunk = 100_000
    i = 0
    t0 = time.perf_counter()
    while alarms < min_alarms and rows < max_rows:
        x_num, x_cat, _, proba = world.arrays(chunk, [0, 1000 + i])
        S = score_rows(profile, x_num, x_cat, proba)
        for lo in range(0, chunk, 1000):
            for a in det.update(S[lo:lo + 1000]):
                lengths.append(a["run_length"])
                by_chart[a["chart"]] = by_chart.get(a["chart"], 0) + 1
        alarms = len(lengths)
        rows += chunk
        i += 1
    # the stream's end censors the last run: mean run length = rows watched / alarms (exponential MLE)
    mean_rl = rows / max(alarms, 1)
    return {"rows": rows, "alarms": alarms, "mean_run_length": mean_rl, "ert_ratio": mean_rl / ERT,
            "median_run_length": float(np.median(lengths)) if lengths else None,
            "alarms_by_chart": by_chart,  # how the false-alarm budget is split (the detector's `weights`)
            "seconds": round(time.perf_counter() - t0, 1)}


def measure_delays(world: World, profile, reps: int) -> dict:
    out = {}
    for name, spec in scenario_specs(world).items():
        n_after = 2000 if name in ("sigma025_5of50", "ramp", "sigma05_1of50", "categorical_shift") else 800
        delays = []
        for r in range(reps):
            a = world.arrays(PRE_CHANGE, [7, r])
            b = world.arrays(n_after, [8, r, len(name)], spec)
            x_num, x_cat, _, proba = (np.concatenate([a[i], b[i]]) for i in range(4))
            alarm_rows = run_detector(profile, score_rows(profile, x_num, x_cat, proba))
            after = [x - PRE_CHANGE for x in alarm_rows if x >= PRE_CHANGE]
            delays.append(after[0] + 1 if after else n_after + 1)  # censored at the stream's end
        out[name] = {"median": float(np.median(delays)), "p90": float(np.percentile(delays, 90)),
                     "missed": int(sum(d > n_after for d in delays)), "reps": reps}
    return out


def _observed_expected(ref: np.ndarray, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Window category counts and their expectation under the reference frequencies (categories the
    reference never saw are left out: chi-squared cannot test a zero expectation)."""
    k = int(max(ref.max(), win.max())) + 1
    ref_counts, obs = np.bincount(ref, minlength=k), np.bincount(win, minlength=k)
    keep = ref_counts > 0
    return obs[keep], ref_counts[keep] / ref_counts.sum() * obs[keep].sum()


def measure_eval(world: World, reps: int, alpha: float = 0.01, evidently: bool = True) -> dict:
    from scipy.stats import chisquare, ks_2samp

    x_ref, c_ref, y_ref, p_ref = world.arrays(10_000, [0, 3])
    prof = ReferenceProfile.from_arrays(world.schema, x_ref, c_ref, pred=p_ref.argmax(1))
    tester = WindowTester(prof)
    cases = {"none": None, "sigma1_1of50": DriftSpec(covariate={"x7": 1.0}),
             "sigma05_1of50": DriftSpec(covariate={"x7": 0.5}),
             "sigma025_5of50": DriftSpec(covariate={f"x{i}": 0.25 for i in range(5, 10)})}
    ours_ms, scipy_ms, verdicts = [], [], {}
    for name, spec in cases.items():
        agree = same = 0
        for r in range(reps):
            xw, cw, _, pw = world.arrays(1000, [9, r, len(name)], spec)
            t0 = time.perf_counter()
            res = tester.test(xw, cw, pred=pw.argmax(1), alpha=alpha, method="bh")
            ours_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            p_sc = np.array([ks_2samp(x_ref[:, j], xw[:, j]).pvalue for j in range(N_NUM)])
            # the same family as ours: BH over the numeric KS AND the categorical chi-squared p-values
            p_cat = np.array([chisquare(*_observed_expected(c_ref[:, j], cw[:, j])).pvalue for j in range(N_CAT)])
            scipy_ms.append((time.perf_counter() - t0) * 1000)
            v_sc = adjust_pvalues(np.concatenate([p_sc, p_cat]), "bh")[:N_NUM] < alpha
            v_ours = np.array([res["features"][f"x{j}"]["drifted"] for j in range(N_NUM)])
            agree += int((v_sc == v_ours).sum())
            same += int((v_sc == v_ours).all())
        verdicts[name] = {"feature_agreement": agree / (reps * N_NUM), "identical_windows": same / reps}
    e, s = float(np.median(ours_ms)), float(np.median(scipy_ms))
    out = {"eval_ms": e, "scipy_ks_ms": s, "speedup_vs_scipy": s / e, "verdicts_vs_scipy": verdicts,
           "reference_rows": 10_000, "window_rows": 1000, "features": N_NUM + N_CAT}
    if evidently:
        out["evidently"] = measure_evidently(world, tester, x_ref, c_ref, cases, alpha)
    return out


def measure_evidently(world: World, tester, x_ref, c_ref, cases: dict, alpha: float) -> dict:
    """Evidently's default data-drift report on the same 10k reference and one 1k window per case (its own
    venv, see `_evidently_peer.py`): seconds per evaluation and its per-column verdicts beside ours."""
    from _evidently_peer import run_evidently

    def frame(x, c):
        cols = {f"x{j}": x[:, j] for j in range(N_NUM)}
        cols.update({f"c{j}": np.array([f"k{v}" for v in c[:, j]], dtype=object) for j in range(N_CAT)})
        return cols

    windows = {name: world.arrays(1000, [9, 0, len(name)], spec) for name, spec in cases.items()}
    got = run_evidently(frame(x_ref, c_ref), [frame(xw, cw) for xw, cw, _, _ in windows.values()], repeats=1,
                        venv_dir=Path(__file__).resolve().parents[1] / ".venv-evidently")
    if got is None:
        return {"error": "Evidently could not be installed or run (see stderr)"}
    per_case = {}
    for (name, (xw, cw, _, pw)), ev in zip(windows.items(), got["currents"]):
        res = tester.test(xw, cw, pred=pw.argmax(1), alpha=alpha, method="bh")
        ours = {f: bool(v["drifted"]) for f, v in res["features"].items() if f in ev["drifted"]}
        per_case[name] = {"evidently_drifted": sorted(f for f, d in ev["drifted"].items() if d),
                          "raysys_drifted": sorted(f for f, d in ours.items() if d),
                          "evidently_dataset_drift": ev["dataset_drift"],
                          "column_agreement": float(np.mean([ev["drifted"][f] == d for f, d in ours.items()]))}
    return {"version": got.get("evidently_version"), "seconds_median": got["seconds_median"],
            "seconds_min": got.get("seconds_min"), "loadavg": got.get("loadavg"), "cases": per_case}


def measure_ingest(world: World, profile, batches: int) -> dict:
    import ray

    from raysys.monitor.actor import get_or_create_monitor

    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local Ray, never a cluster this shell points at
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = get_or_create_monitor(f"bench_monitor_{os.getpid()}", "raysys_bench", profile=profile.to_dict(),
                                       schema=world.schema.model_dump(), monitor_cfg={"ert": ERT},
                                       model_version=1)
        ray.get(handle.ping.remote())
        x_num, x_cat, _, proba = world.arrays(1000, [0, 77])
        batch = {"x_num": x_num.astype(np.float32), "x_cat": x_cat, "pred": proba.argmax(1),
                 "proba": proba.astype(np.float32), "latency_ms": list(np.full(1000, 3.0)), "model_version": 1,
                 "request_ids": [f"r{i}" for i in range(1000)]}
        ray.get(handle.record.remote(batch))  # warm-up
        t0 = time.perf_counter()
        refs = [handle.record.remote(batch) for _ in range(batches)]
        ray.get(refs)
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        rep = ray.get(handle.report.remote())
        report_ms = (time.perf_counter() - t1) * 1000
        ray.kill(handle, no_restart=True)
        return {"ingest_rows_per_s": batches * 1000 / dt, "batch_rows": 1000, "batches": batches,
                "report_ms": report_ms, "rows_seen": rep["rows_seen"]}
    finally:
        ray.shutdown()


def measure_request_overhead(world: World, n: int = 20_000) -> dict:
    from serve.monitor_link import MonitorBuffer

    buf = MonitorBuffer(max_rows=10 * n)
    x_num, x_cat, _, proba = world.arrays(1, [0, 99])
    pred = proba.argmax(1)
    times = np.empty(n)
    import uuid

    for i in range(n):
        t0 = time.perf_counter()
        rid = uuid.uuid4().hex
        buf.add(x_num, x_cat, pred, 3.0, 1, proba=proba, request_id=rid)
        times[i] = time.perf_counter() - t0
        if buf.rows >= 2048:
            buf.take()  # what the flusher does off the request path
    t0 = time.perf_counter()
    for _ in range(2048):
        buf.add(x_num, x_cat, pred, 3.0, 1, proba=proba, request_id="x")
    tt = time.perf_counter()
    buf.take()
    take_ms = (time.perf_counter() - tt) * 1000
    return {"request_overhead_p50_ms": float(np.median(times) * 1000),
            "request_overhead_p99_ms": float(np.percentile(times, 99) * 1000),
            "flush_2048_rows_ms_off_path": take_ms, "fill_ms": (tt - t0) * 1000}


def measure_oracles(world: World, profile, delays: dict, quick: bool) -> dict:
    """Each new scenario's oracle at the same ERT (see `_drift_oracles`), and the detector's median delay
    over the oracle's."""
    sc = scenario_specs(world)
    reps = 100 if quick else 400
    out = {"prior_flip": oracles.prior_flip_oracle(world, profile, sc["prior_flip"], ERT, reps),
           "categorical_shift": oracles.categorical_oracle(world, "c1", sc["categorical_shift"], ERT, reps),
           "ramp": oracles.ramp_oracle_for(world, profile, "x7", sc["ramp"], ERT, reps=20 if quick else 40),
           "joint_shift": oracles.joint_oracle(world, profile, JOINT_PAIR, PAIR_RHO, sc["joint_shift"], ERT, reps)}
    for name, o in out.items():
        o["delay_over_oracle"] = round(delays[name]["median"] / o["median_delay"], 3)
    return out


def measure_accuracy(world: World, profile) -> dict:
    out = {}
    pr = profile.prediction
    sc = scenario_specs(world)
    for name, spec in {"undrifted": None, "prior_flip": sc["prior_flip"], "sigma1_1of50": sc["sigma1_1of50"],
                       "neutral_shift": sc["neutral_shift"], "joint_shift": sc["joint_shift"]}.items():
        _, _, y, proba = world.arrays(5000, [0, 555, len(name)], spec)
        out[name] = {"realised": float((proba.argmax(1) == y).mean()),
                     "estimated": float(pr.estimate_accuracy(proba))}
    out["temperature"] = pr.temperature
    out["reference_accuracy"] = pr.accuracy
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs (smoke test; figures are noisier)")
    ap.add_argument("--calibration-rows", type=int, default=None)
    ap.add_argument("--no-evidently", action="store_true", help="skip the Evidently peer (needs a venv + network once)")
    ap.add_argument("--no-ray", action="store_true", help="skip the actor ingest measurement (starts no Ray)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quick = args.quick
    t_all = time.perf_counter()
    world = World()
    x_ref, c_ref, y_ref, p_ref = world.arrays(20_000, [0, 1])
    x_hold, c_hold, y_hold, p_hold = world.arrays(10_000, [0, 2])
    t0 = time.perf_counter()
    profile = ReferenceProfile.from_arrays(world.schema, x_ref, c_ref, pred=p_ref.argmax(1))
    profile.add_predictions(p_hold, y_hold)
    cal_rows = args.calibration_rows or (600_000 if quick else 3_000_000)
    profile.calibrate(x_hold, c_hold, p_hold, ert=ERT, num_rows=cal_rows)
    build_s = time.perf_counter() - t0
    reference_bytes = len(json.dumps(profile.to_dict()).encode())
    print(f"profile: {reference_bytes} bytes, threshold {profile.detector['threshold']:.2f} "
          f"(calibration {profile.detector['calibration']})", flush=True)
    eval_res = measure_eval(world, reps=5 if quick else 20, evidently=not args.no_evidently)
    print("eval:", json.dumps(eval_res), flush=True)
    overhead = measure_request_overhead(world)
    print("request overhead:", json.dumps(overhead), flush=True)
    acc = measure_accuracy(world, profile)
    print("accuracy:", json.dumps(acc), flush=True)
    delays = measure_delays(world, profile, reps=12 if quick else 40)
    print("delays:", json.dumps(delays), flush=True)
    oracle = measure_oracles(world, profile, delays, quick)
    print("oracles:", json.dumps(oracle), flush=True)
    ert = measure_ert(world, profile, min_alarms=30 if quick else 200, max_rows=400_000 if quick else 2_600_000)
    print("ert:", json.dumps(ert), flush=True)
    if args.no_ray:
        ingest = {"ingest_rows_per_s": None, "skipped": "--no-ray"}
        ray_version = None
    else:
        import ray

        ingest = measure_ingest(world, profile, batches=30 if quick else 100)
        ray_version = ray.__version__
    print("ingest:", json.dumps(ingest), flush=True)
    import scipy

    ev = eval_res.pop("evidently", None) or {}
    result = {
        "benchmark": "drift",
        "ert_configured": ERT,
        "ert_ratio": round(ert["ert_ratio"], 3),
        "delay_median": {k: v["median"] for k, v in delays.items()},
        "eval_ms": round(eval_res["eval_ms"], 3),
        "scipy_ks_ms": round(eval_res["scipy_ks_ms"], 2),
        "speedup_vs_scipy": round(eval_res["speedup_vs_scipy"], 1),
        "speedup_vs_evidently": (round(ev["seconds_median"] * 1000 / eval_res["eval_ms"], 1)
                                 if "seconds_median" in ev else None),
        "evidently": ev if ev else "not measured: --no-evidently",
        "delay_over_oracle": {k: v["delay_over_oracle"] for k, v in oracle.items()},
        "ingest_rows_per_s": ingest["ingest_rows_per_s"] and round(ingest["ingest_rows_per_s"]),
        "reference_bytes": reference_bytes,
        "request_overhead_p50_ms": round(overhead["request_overhead_p50_ms"], 4),
        "details": {"model": {"hidden_dims": list(MODEL_HIDDEN), "train_rows": MODEL_TRAIN_ROWS,
                              "train_s": round(world.train_s, 1)},
                    "ert": ert, "delays": delays, "eval": eval_res, "ingest": ingest, "overhead": overhead,
                    "accuracy": acc, "oracles": oracle, "detector": {k: profile.detector[k] for k in ("threshold", "extrapolated",
                                                                                  "calibration", "charts")},
                    "profile_build_and_calibration_s": round(build_s, 1)},
        "setup": {"features": {"numeric": N_NUM, "categorical": N_CAT}, "classes": N_CLASSES,
                  "reference_rows": 20_000, "holdout_rows": 10_000, "pre_change_rows": PRE_CHANGE,
                  "quick": quick, "cpus": os.cpu_count(), "python": platform.python_version(),
                  "numpy": np.__version__, "scipy": scipy.__version__, "ray": ray_version,
                  "torch": torch.__version__, "seconds": round(time.perf_counter() - t_all, 1)},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
