"""The whole loop, stage by stage: data -> teacher -> distillation -> evaluation -> registry -> serve -> traffic.

`jobs/pipeline.py` (for `ray job submit`) and `raysys demo` both call these functions, so a job on a
cluster and the local demo run the same code. Each stage logs one line when it starts and one when it
ends, with its time and headline figures.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raysys.config import PipelineConfig

log = logging.getLogger("raysys")

TEACHER_SUFFIX = "-teacher"


def init_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True):
    """Connect to `address` (or RAY_ADDRESS) when given ("auto" joins the cluster `ray start` made on this
    machine); otherwise start an embedded local Ray, even when another cluster runs here.

    The local cluster gets more logical CPUs than cores: Tune's trial drivers and Ray Train's workers
    reserve CPUs while mostly waiting on each other (DESIGN.md). Token auth stays on (Ray 2.60's default).
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return ray.init(address=address)
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    from raysys.serving import apply_ingress_env

    apply_ingress_env()  # Serve's fast HAProxy ingress: read by the processes the local Ray starts
    return ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1")


def dashboard_url(ctx: Any) -> str | None:
    url = getattr(ctx, "dashboard_url", None)
    if url:
        return url if url.startswith("http") else f"http://{url}"
    try:
        import ray

        url = ray.worker.get_dashboard_url()  # type: ignore[attr-defined]
        return f"http://{url}" if url and not url.startswith("http") else url
    except Exception:
        return None


@dataclass
class StageTimer:
    times: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn, *args, **kwargs):
        log.info("[%s] started", name)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t0, 2)
        log.info("[%s] done in %.1fs", name, self.times[name])
        return out


@dataclass
class PipelineResult:
    model_name: str
    student_version: int
    teacher_version: int
    teacher_metrics: dict
    student_metrics: dict
    majority_accuracy: float
    best_distill_config: dict
    stage_seconds: dict
    data_fingerprint: str

    def summary(self) -> dict:
        return {
            "model": f"{self.model_name}:v{self.student_version}",
            "teacher": f"{self.model_name}{TEACHER_SUFFIX}:v{self.teacher_version}",
            "teacher_test_accuracy": round(self.teacher_metrics["accuracy"], 4),
            "student_test_accuracy": round(self.student_metrics["accuracy"], 4),
            "majority_class_accuracy": round(self.majority_accuracy, 4),
            "teacher_params": self.teacher_metrics.get("num_parameters"),
            "student_params": self.student_metrics.get("num_parameters"),
            "best_distill_config": self.best_distill_config,
            "stage_seconds": self.stage_seconds,
        }


def absolute(cfg: PipelineConfig) -> PipelineConfig:
    """Ray Train/Tune need absolute storage paths; resolve relative ones against the cwd once."""
    cfg = cfg.model_copy(deep=True)
    cfg.run_dir = str(Path(cfg.run_dir).expanduser().resolve())
    if "://" not in cfg.registry_uri:
        cfg.registry_uri = str(Path(cfg.registry_uri).expanduser().resolve())
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    return cfg


@dataclass
class Prepared:
    schema: Any
    preprocessor: Any
    fingerprint: str


def stage_data(cfg: PipelineConfig) -> Prepared:
    """Generate (synthetic) or check (your own) the dataset; fit the preprocessor on the train split."""
    from raysys.data import Preprocessor, ensure_dataset, fingerprint

    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    data_fp = fingerprint(cfg.data.root)
    log.info("[data] %s: %d features (%d numeric, %d categorical), %d classes, fingerprint %s",
             cfg.data.root, len(schema.features), len(schema.numeric), len(schema.categorical),
             schema.num_classes, data_fp[:12])
    return Prepared(schema, pre, data_fp)


def _test_arrays(cfg: PipelineConfig, prep: Prepared):
    from raysys.data import read_split

    return prep.preprocessor.transform_table(read_split(cfg.data.root, "test"))


def _evaluation_kwargs(cfg: PipelineConfig, schema) -> dict:
    """`full_evaluation`'s settings for a registered version's test-split card (teacher and students alike)."""
    from raysys.distill import split_raw_columns

    ev = cfg.distill.evaluation
    return dict(class_names=list(schema.classes), raw_columns=split_raw_columns(cfg, schema, "test"),
                categorical=[f.name for f in schema.categorical], slices=ev.slices,
                num_calibration_bins=ev.num_calibration_bins, latency_batch_size=ev.latency_batch_size,
                latency_repeats=ev.latency_repeats)


def stage_teacher(cfg: PipelineConfig, prep: Prepared) -> tuple[Any, int, dict]:
    """Train the teacher with Ray Train, evaluate it on the test split (the student's evaluation: metrics,
    calibration, slices, latency on one thread), register it with a model card of kind `teacher`.
    Returns (model, registry version, test metrics)."""
    from raysys.evaluate import full_evaluation, torch_threads
    from raysys.modelcard import build_model_card
    from raysys.models import build_model
    from raysys.registry import Registry
    from raysys.train import train_teacher

    schema = prep.schema
    teacher = train_teacher(cfg, schema, prep.preprocessor)
    model = build_model(teacher.model_spec)
    model.load_state_dict(teacher.state_dict())
    model.eval()
    x_num, x_cat, y = _test_arrays(cfg, prep)
    with torch_threads(1):  # latency as one serving thread sees it, like the student's card
        metrics = full_evaluation(model, x_num, x_cat, y, schema.num_classes, **_evaluation_kwargs(cfg, schema))
    metrics["majority_class_accuracy"] = float(np.bincount(y, minlength=schema.num_classes).max() / len(y))
    lineage = {"data_fingerprint": prep.fingerprint, "checkpoint": teacher.checkpoint_dir}
    card = build_model_card(
        name=cfg.model_name + TEACHER_SUFFIX, kind="teacher", schema=schema, data_fingerprint=prep.fingerprint,
        metrics=metrics, lineage=lineage, data_root=cfg.data.root,
        training_config={"teacher": json.loads(cfg.teacher.model_dump_json()),
                         "train": json.loads(cfg.train.model_dump_json()),
                         # per-epoch figures stay in the version's metrics.json
                         "epochs_run": len(teacher.metrics),
                         "last_epoch": teacher.metrics[-1] if teacher.metrics else None},
        intended_use=(f"The teacher: classification into {list(schema.classes)}, trained with Ray Train to be "
                      "distilled into the served student (its soft targets train the student). Sized for "
                      "accuracy, not latency: serve the student (see its card)."),
        limitations=[f"Test accuracy {metrics['accuracy']:.3f} against {metrics['majority_class_accuracy']:.3f} "
                     "for always answering the most common class."])
    version = Registry(cfg.registry_uri).register(
        cfg.model_name + TEACHER_SUFFIX, state_dict=model.state_dict(), model_spec=teacher.model_spec,
        schema=schema, preprocessor=prep.preprocessor, metrics={"test": metrics, "epochs": teacher.metrics},
        config=json.loads(cfg.model_dump_json()), lineage=lineage, model_card=card,
    )
    log.info("[teacher] test accuracy %.4f (majority class %.4f), %d parameters, registered as %s%s:v%d",
             metrics["accuracy"], metrics["majority_class_accuracy"], metrics["num_parameters"],
             cfg.model_name, TEACHER_SUFFIX, version)
    return model, version, metrics


def load_teacher(cfg: PipelineConfig, ref: str = "latest") -> tuple[Any, int, dict]:
    """The registered teacher (for `raysys distill` without retraining)."""
    from raysys.registry import Registry

    loaded = Registry(cfg.registry_uri).load(cfg.model_name + TEACHER_SUFFIX, ref)
    return loaded.model, loaded.version, loaded.metrics.get("test", {})


def stage_distill(cfg: PipelineConfig, prep: Prepared, teacher_model, teacher_version: int,
                  teacher_metrics: dict, *, alias: str = "production",
                  lineage: dict | None = None, resume_sweep: str | None = None) -> tuple[int, dict, dict]:
    """Sweep distillation with Ray Tune, evaluate the chosen student (metrics, calibration, slices,
    latency, teacher agreement), register it with a model card and point `alias` at it; then register its
    dynamic-int8 variant (when `distill.quantize`) as the next version with alias `candidate`.
    `lineage` entries (e.g. a retrain job's provenance) are added to the cards' lineage.
    `resume_sweep`: the name of an interrupted sweep under `run_dir` to go on with instead of a new one.

    Returns (student version, student test metrics, chosen distillation config). The metrics carry
    `int8_variant` ({version, accuracy, latency, ...}) when a quantized variant was registered.
    """
    from raysys.data import read_split
    from raysys.distill import run_sweep
    from raysys.evaluate import full_evaluation, torch_threads
    from raysys.modelcard import build_model_card
    from raysys.models import build_model, predict_logits
    from raysys.models.quantize import DYNAMIC_INT8, quantize_dynamic_int8
    from raysys.monitor.profile import ReferenceProfile
    from raysys.registry import Registry

    schema, pre = prep.schema, prep.preprocessor
    sweep = run_sweep(cfg, schema, pre, teacher_model, run_name=resume_sweep, resume=resume_sweep is not None)
    student = build_model(sweep.student_spec)
    student.load_state_dict(sweep.best_state_dict)
    student.eval()
    x_num, x_cat, y = _test_arrays(cfg, prep)
    ev = cfg.distill.evaluation
    teacher_logits = predict_logits(teacher_model, x_num, x_cat).numpy()
    common = {**_evaluation_kwargs(cfg, schema), "teacher_logits": teacher_logits}
    with torch_threads(1):  # latency as one serving replica thread sees it, the same for every model
        metrics = full_evaluation(student, x_num, x_cat, y, schema.num_classes, **common)
        teacher_eval = full_evaluation(teacher_model, x_num, x_cat, y, schema.num_classes,
                                       latency_batch_size=ev.latency_batch_size, latency_repeats=ev.latency_repeats)
        q_model = quantize_dynamic_int8(student) if cfg.distill.quantize else None
        q_metrics = (full_evaluation(q_model, x_num, x_cat, y, schema.num_classes, **common)
                     if q_model is not None else None)
    teacher_cmp = {**teacher_metrics, "accuracy": teacher_eval["accuracy"],
                   "num_parameters": teacher_eval["num_parameters"], "latency": teacher_eval.get("latency")}

    def profile_of(model) -> dict:
        # the monitor's reference: raw training features and this model's own predictions on them
        train = read_split(cfg.data.root, "train")
        tx_num, tx_cat, _ = pre.transform_table(train)
        pred = predict_logits(model, tx_num, tx_cat).argmax(1).numpy()
        prof = ReferenceProfile.from_arrays(schema, pre.raw_numeric(train), tx_cat, num_bins=cfg.monitor.num_bins,
                                            pred=pred)
        # held-out rows: the model's predicted-probability distributions, calibration and accuracy, and the
        # bootstrap source that calibrates the online drift detector to monitor.ert
        val = read_split(cfg.data.root, "validation")
        vx_num, vx_cat, vy = pre.transform_table(val)
        v_proba = predict_logits(model, vx_num, vx_cat).double().softmax(1).numpy()
        prof.add_predictions(v_proba, vy)
        prof.calibrate(pre.raw_numeric(val), vx_cat, v_proba, ert=cfg.monitor.ert,
                       num_rows=cfg.monitor.calibration_rows)
        log.info("[distill] monitor reference: online detector threshold %.2f for ERT %d rows (%.1fs)",
                 prof.detector["threshold"], cfg.monitor.ert, prof.detector["calibration"]["seconds"])
        return prof.to_dict()

    teacher_ref = f"{cfg.model_name}{TEACHER_SUFFIX}:v{teacher_version}"
    distillation = {**{k: v for k, v in sweep.summary().items() if k not in ("trials",)},
                    "num_trials": len(sweep.trials)}
    lineage = {"parent_teacher": teacher_ref, "data_fingerprint": prep.fingerprint, "distill": dict(sweep.best_config),
               "sweep_id": sweep.sweep_id, "sweep_dir": str(sweep.results_dir), **(lineage or {})}
    training_config = {"teacher": json.loads(cfg.teacher.model_dump_json()),
                       "train": json.loads(cfg.train.model_dump_json()),
                       "distill": json.loads(cfg.distill.model_dump_json())}
    card = build_model_card(name=cfg.model_name, kind="student", schema=schema, data_fingerprint=prep.fingerprint,
                            metrics=metrics, training_config=training_config, distillation=distillation,
                            teacher_metrics=teacher_cmp, lineage=lineage, data_root=cfg.data.root)
    reg = Registry(cfg.registry_uri)
    version = reg.register(
        cfg.model_name, state_dict=student.state_dict(), model_spec=sweep.student_spec, schema=schema,
        preprocessor=pre,
        metrics={"test": metrics, "teacher_test": teacher_metrics, "sweep": sweep.trials},
        config=json.loads(cfg.model_dump_json()), lineage=lineage, reference_profile=profile_of(student),
        model_card=card,
    )
    reg.set_alias(cfg.model_name, alias, version)
    log.info("[distill] chose %s: student test accuracy %.4f, %d parameters (teacher %.4f, %d); %s:v%d is %s",
             dict(sweep.best_config), metrics["accuracy"], metrics["num_parameters"], teacher_eval["accuracy"],
             teacher_eval["num_parameters"], cfg.model_name, version, alias)
    if q_model is not None:
        q_lineage = {**lineage, "quantized_from": f"{cfg.model_name}:v{version}"}
        q_card = build_model_card(name=cfg.model_name, kind="student-int8", schema=schema,
                                  data_fingerprint=prep.fingerprint, metrics=q_metrics,
                                  training_config=training_config, distillation=distillation,
                                  teacher_metrics=teacher_cmp, lineage=q_lineage, quantization=DYNAMIC_INT8,
                                  data_root=cfg.data.root)
        q_version = reg.register(
            cfg.model_name, state_dict=student.state_dict(), model_spec={**sweep.student_spec,
                                                                         "quantization": DYNAMIC_INT8},
            schema=schema, preprocessor=pre,
            metrics={"test": q_metrics, "teacher_test": teacher_metrics, "float_test": metrics},
            config=json.loads(cfg.model_dump_json()), lineage=q_lineage, reference_profile=profile_of(q_model),
            model_card=q_card,
        )
        reg.set_alias(cfg.model_name, "candidate", q_version)
        metrics["int8_variant"] = {
            "version": q_version, "accuracy": q_metrics["accuracy"],
            "latency_per_row_ms_p50": q_metrics["latency"]["per_row_ms"]["p50"] if "latency" in q_metrics else None,
            "float_latency_per_row_ms_p50": metrics["latency"]["per_row_ms"]["p50"] if "latency" in metrics else None,
        }
        log.info("[distill] int8 variant %s:v%d (candidate): test accuracy %.4f (float %.4f)", cfg.model_name,
                 q_version, q_metrics["accuracy"], metrics["accuracy"])
    return version, metrics, dict(sweep.best_config)


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Train the teacher, distill, evaluate and register the student as `production`. Needs Ray up."""
    cfg = absolute(cfg)
    timer = StageTimer()
    prep = timer.run("data", stage_data, cfg)
    teacher, t_version, t_metrics = timer.run("teacher", stage_teacher, cfg, prep)
    s_version, s_metrics, best = timer.run("distill", stage_distill, cfg, prep, teacher, t_version, t_metrics)
    return PipelineResult(
        model_name=cfg.model_name, student_version=s_version, teacher_version=t_version,
        teacher_metrics=t_metrics, student_metrics=s_metrics,
        majority_accuracy=t_metrics["majority_class_accuracy"], best_distill_config=best,
        stage_seconds=timer.times, data_fingerprint=prep.fingerprint,
    )


# ----- traffic ------------------------------------------------------------------------------------------


def traffic_rows(cfg: PipelineConfig, n: int, *, seed: int, drift: dict[str, float] | None = None) -> list[dict]:
    """`n` request rows. Synthetic data: fresh rows from the generator, covariate-shifted by `drift`
    ({feature: shift in standard deviations}) through `DriftSpec`. Your own data: rows of the test split,
    with the same shift applied to the named numeric columns."""
    from raysys.data import DatasetSchema, DriftSpec, Preprocessor, SyntheticTask, read_split

    if cfg.data.source == "synthetic":
        table = SyntheticTask(cfg.data).sample(n, [cfg.data.seed, 100 + seed],
                                               DriftSpec(covariate=drift or {}))
        rows = table.drop_columns(["label"]).to_pylist()
        return rows
    schema = DatasetSchema.load(cfg.data.root)
    test = read_split(cfg.data.root, "test")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, test.num_rows, n)
    rows = test.take(idx).drop_columns([schema.label]).to_pylist()
    if drift:
        pre = Preprocessor.fit_split(schema, cfg.data.root)
        names = [f.name for f in schema.numeric]
        for feat, shift in drift.items():
            if feat not in names:
                raise ValueError(f"drift: {feat!r} is not a numeric feature; choose from {names}")
            std = float(pre.std[names.index(feat)])
            for r in rows:
                r[feat] = float(r[feat]) + shift * std
    return rows


def send_traffic(url: str, rows: list[dict], *, batch_size: int = 20, timeout_s: float = 30.0) -> dict:
    """POST `rows` to `<url>/v1/predict` in batches; return counts of responses by status and latencies."""
    import requests

    statuses: dict[int, int] = {}
    latencies = []
    with requests.Session() as s:
        for i in range(0, len(rows), batch_size):
            t0 = time.perf_counter()
            r = s.post(f"{url}/v1/predict", json={"instances": rows[i:i + batch_size]}, timeout=timeout_s)
            latencies.append((time.perf_counter() - t0) * 1000)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    lat = np.asarray(latencies)
    return {"requests": len(latencies), "rows": len(rows), "statuses": statuses,
            "client_p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "client_p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}


def wait_for_monitor(url: str, min_rows: int, timeout_s: float = 30.0) -> dict:
    """Poll `/v1/monitor` until it has seen `min_rows` rows (reporting is fire-and-forget, so it lags)."""
    import requests

    deadline = time.monotonic() + timeout_s
    report: dict = {}
    while time.monotonic() < deadline:
        r = requests.get(f"{url}/v1/monitor", timeout=10)
        if r.status_code == 200:
            report = r.json()
            if report.get("rows_seen", 0) >= min_rows:
                return report
        time.sleep(0.25)
    raise TimeoutError(f"monitor saw {report.get('rows_seen', 0)} of {min_rows} rows after {timeout_s}s")


def drift_feature(cfg: PipelineConfig) -> str:
    """The feature the demo shifts: the first numeric feature of the schema."""
    from raysys.data import DatasetSchema

    return DatasetSchema.load(cfg.data.root).numeric[0].name


def format_report(report: dict) -> str:
    """A short human-readable drift/latency summary of a monitor report."""
    lines = [f"rows seen {report.get('rows_seen')}  window {report.get('window_rows')}  "
             f"model v{report.get('model_version')}"]
    lat = report.get("latency_ms") or {}
    if lat:
        lines.append("latency ms  " + "  ".join(f"{k} {v:.2f}" for k, v in lat.items()
                                                if k.startswith("p") and v is not None))
    feats = report.get("features") or {}
    for name, st in feats.items():
        flag = "DRIFT" if st.get("drifted") else "ok"
        lines.append(f"  {name:<12} PSI {st.get('psi', float('nan')):7.3f}  {flag}")
    alerts = report.get("alerts") or []
    lines.append(f"alerts: {', '.join(a if isinstance(a, str) else a.get('feature', str(a)) for a in alerts) or 'none'}")
    return "\n".join(lines)


def exercise_endpoint(cfg: PipelineConfig, url: str, *, shift_sigma: float = 1.5) -> dict:
    """Send a window of normal traffic, then a window shifted on one feature, reading the monitor after
    each; also one bad request to show the 422. Returns both reports and the traffic counts."""
    import requests

    n = cfg.monitor.window_size
    feat = drift_feature(cfg)
    out: dict[str, Any] = {"drift_feature": feat, "shift_sigma": shift_sigma}
    bad = traffic_rows(cfg, 1, seed=7)
    bad[0]["no_such_feature"] = 1.0
    r = requests.post(f"{url}/v1/predict", json={"instances": bad}, timeout=30)
    out["bad_request"] = {"status": r.status_code, "body": r.json() if r.content else None}

    before = requests.get(f"{url}/v1/monitor", timeout=10).json().get("rows_seen", 0)
    out["normal_traffic"] = send_traffic(url, traffic_rows(cfg, n, seed=1))
    out["normal_report"] = wait_for_monitor(url, before + n)
    log.info("[traffic] %d normal rows sent, alerts: %s", n, out["normal_report"].get("alerts"))
    out["drift_traffic"] = send_traffic(url, traffic_rows(cfg, n, seed=2, drift={feat: shift_sigma}))
    out["drift_report"] = wait_for_monitor(url, before + 2 * n)
    log.info("[traffic] %d rows shifted by %.1f sigma on %s sent, alerts: %s", n, shift_sigma, feat,
             out["drift_report"].get("alerts"))
    return out


# ----- job entrypoints (jobs/*.py) -----------------------------------------------------------------------


def job_parser(doc: str | None, *, root_default: str | None = os.environ.get("RAYSYS_ROOT", "~/raysys"),
               root_help: str = "directory for data, runs and registry (default $RAYSYS_ROOT or ~/raysys)"):
    """The `--preset/--config/--root` flags every job takes."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="tiny, demo or large")
    p.add_argument("--config", default=None, help="YAML file overriding the preset")
    p.add_argument("--root", default=root_default, help=root_help)
    return p


def job_config(args, overrides: dict | None = None) -> PipelineConfig:
    """Preset + YAML + overrides, rooted at `--root` when given; sets up logging. ValueError names the field."""
    from raysys.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config, preset_name=args.preset, overrides=overrides)
    return cfg.with_root(Path(args.root).expanduser()) if args.root else cfg
