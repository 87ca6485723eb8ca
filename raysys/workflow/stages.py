"""The loop, stage by stage: data -> quality -> teacher -> distillation -> evaluation -> registry.

The `raysys` CLI and the jobs (`raysys.jobs`) both call these functions, so a job on a cluster and the
local demo run the same code. Each stage logs one line when it starts and one when it ends, with its time
and headline figures.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raysys.config import PipelineConfig
from raysys.workflow.reach import check_nodes_reach

log = logging.getLogger("raysys")

TEACHER_SUFFIX = "-teacher"


@dataclass
class StageTimer:
    times: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn, *args, **kwargs):
        log.info("[%s] started", name, extra=progress(name, "start"))
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t0, 2)
        log.info("[%s] done in %.1fs", name, self.times[name], extra=progress(name, "done"))
        return out


def progress(task: str, event: str, completed: int = 0, total: int | None = None) -> dict:
    """A log record's `extra=` that the CLI's progress bars read (raysys.cli.progress); plain lines elsewhere."""
    return {"raysys_progress": {"task": task, "event": event, "completed": completed, "total": total}}


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
    quality: dict | None = None  # the data quality report's card summary (stage_quality), when it ran
    plan: Any = None  # small_tables.TablePlan: what the table's size reduces or skips (None: nothing)


def stage_data(cfg: PipelineConfig) -> Prepared:
    """Generate (synthetic) or check (your own) the dataset; fit the preprocessor on the train split."""
    from raysys.data import Preprocessor, ensure_dataset, fingerprint
    from raysys.workflow.small_tables import plan_for_table, split_rows

    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    data_fp = fingerprint(cfg.data.root)
    rows = split_rows(cfg.data.root)
    log.info("[data] %s: %d features (%d numeric, %d categorical), %d classes, rows %s, fingerprint %s",
             cfg.data.root, len(schema.features), len(schema.numeric), len(schema.categorical),
             schema.num_classes, rows, data_fp[:12])
    sl = cfg.distill.evaluation.slices
    has_slices = bool(schema.categorical and sl.categorical != []) or bool(sl.numeric_bins) or sl.num_quantile_bins > 0
    return Prepared(schema, pre, data_fp, plan=plan_for_table(cfg, rows, has_slices=has_slices))


def size_limitations(prep: Prepared) -> list[str]:
    """The model card's lines for what the table's size reduced or skipped (evaluation, monitor, quality)."""
    from raysys.workflow.small_tables import quality_notes

    return (list(prep.plan.notes) if prep.plan is not None else []) + quality_notes(prep.quality)


def stage_quality(cfg: PipelineConfig, prep: Prepared) -> dict | None:
    """The data quality report before training (`cfg.quality`), written to
    `<run_dir>/data_quality/<fingerprint>.json` (reused when the data and the quality config are unchanged);
    a refusal raises ValueError naming the check and rows. Sets and returns `prep.quality`, the summary the
    model cards and lineage carry (None when `quality.enabled` is off)."""
    from raysys.data.quality import card_summary, check_dataset, enforce, write_report

    if not cfg.quality.enabled:
        return None
    path = Path(cfg.run_dir) / "data_quality" / f"{prep.fingerprint[:16]}.json"
    config = json.loads(cfg.quality.model_dump_json())
    report = json.loads(path.read_text()) if path.exists() else None
    if report is None or report.get("config") != config:
        report = check_dataset(cfg.data.root, cfg.quality, prep.schema)
        write_report(report, path)
    for f in report["findings"]:
        log.warning("[quality] %s %s: %s", f["level"], f["check"], f["message"])
    log.info("[quality] %s: %d finding(s), report %s", report["status"], len(report["findings"]), path)
    enforce(report)
    prep.quality = card_summary(report, str(path))
    return prep.quality


def _quality_lineage(prep: Prepared) -> dict:
    return {"data_quality": {"status": prep.quality["status"], "report": prep.quality["report"]}} \
        if prep.quality else {}


def _test_arrays(cfg: PipelineConfig, prep: Prepared):
    from raysys.data import read_split

    return prep.preprocessor.transform_table(read_split(cfg.data.root, "test"))


def _evaluation_kwargs(cfg: PipelineConfig, prep: Prepared) -> dict:
    """`full_evaluation`'s settings for a registered version's test-split card (teacher and students alike);
    calibration bins and the latency batch reduced to what a small test split holds (`prep.plan`)."""
    from raysys.distill import split_raw_columns

    ev, schema, plan = cfg.distill.evaluation, prep.schema, prep.plan
    return dict(class_names=list(schema.classes), raw_columns=split_raw_columns(cfg, schema, "test"),
                categorical=[f.name for f in schema.categorical], slices=ev.slices,
                num_calibration_bins=plan.num_calibration_bins if plan else ev.num_calibration_bins,
                latency_batch_size=plan.latency_batch_size if plan else ev.latency_batch_size,
                latency_repeats=ev.latency_repeats)


def _config_sections(cfg: PipelineConfig, *names: str) -> dict:
    return {n: json.loads(getattr(cfg, n).model_dump_json()) for n in names}


# ----- teacher -----------------------------------------------------------------------------------------


def stage_teacher(cfg: PipelineConfig, prep: Prepared) -> tuple[Any, int, dict]:
    """Train the teacher with Ray Train, evaluate it on the test split (the student's evaluation: metrics,
    calibration, slices, latency on one thread), register it with a model card of kind `teacher`.
    Returns (model, registry version, test metrics)."""
    from raysys.models import build_model
    from raysys.train import train_teacher
    from raysys.workflow.small_tables import sized
    from raysys.workflow.trust_stage import privacy_of

    cfg = sized(cfg, prep.plan)  # batch and epochs sized to a small table (cfg.sizing), as the card says
    # Ray Train's workers read the splits and write checkpoints, on whatever node they land
    check_nodes_reach({"run_dir": cfg.run_dir}, {"data.root": cfg.data.root})
    teacher = train_teacher(cfg, prep.schema, prep.preprocessor)
    model = build_model(teacher.model_spec)
    model.load_state_dict(teacher.state_dict())
    model.eval()
    metrics = _evaluate_teacher(cfg, prep, model, privacy_of(teacher.metrics))
    version = _register_teacher(cfg, prep, teacher, model, metrics)
    log.info("[teacher] test accuracy %.4f (majority class %.4f), %d parameters, registered as %s%s:v%d",
             metrics["accuracy"], metrics["majority_class_accuracy"], metrics["num_parameters"],
             cfg.model_name, TEACHER_SUFFIX, version)
    return model, version, metrics


def _evaluate_teacher(cfg: PipelineConfig, prep: Prepared, model, privacy: dict | None = None) -> dict:
    from raysys.evaluate import full_evaluation, torch_threads
    from raysys.workflow.trust_stage import model_trust

    schema = prep.schema
    x_num, x_cat, y = _test_arrays(cfg, prep)
    with torch_threads(1):  # latency as one serving thread sees it, like the student's card
        metrics = full_evaluation(model, x_num, x_cat, y, schema.num_classes, **_evaluation_kwargs(cfg, prep))
    metrics["majority_class_accuracy"] = float(np.bincount(y, minlength=schema.num_classes).max() / len(y))
    metrics["trust"] = model_trust(cfg, prep, model, (x_num, x_cat, y), privacy=privacy, who="teacher")
    metrics["privacy"] = privacy  # DP-SGD's accounting (None: trained without), what a private student composes
    return metrics


def _register_teacher(cfg: PipelineConfig, prep: Prepared, teacher, model, metrics: dict) -> int:
    from raysys.registry import Registry
    from raysys.registry.modelcard import build_model_card
    from raysys.workflow.trust_stage import governance

    schema = prep.schema
    lineage = {"data_fingerprint": prep.fingerprint, "checkpoint": teacher.checkpoint_dir, **_quality_lineage(prep)}
    card = build_model_card(
        name=cfg.model_name + TEACHER_SUFFIX, kind="teacher", schema=schema, data_fingerprint=prep.fingerprint,
        metrics=metrics, lineage=lineage, data_root=cfg.data.root, data_quality=prep.quality,
        governance=governance(cfg, prep, metrics.get("trust")),
        training_config={**_config_sections(cfg, "teacher", "train"),
                         # per-epoch figures stay in the version's metrics.json
                         "epochs_run": len(teacher.metrics),
                         "last_epoch": teacher.metrics[-1] if teacher.metrics else None},
        intended_use=(f"The teacher: classification into {list(schema.classes)}, trained with Ray Train to be "
                      "distilled into the served student (its soft targets train the student). Sized for "
                      "accuracy, not latency: serve the student (see its card)."),
        limitations=[f"Test accuracy {metrics['accuracy']:.3f} against {metrics['majority_class_accuracy']:.3f} "
                     "for always answering the most common class.", *size_limitations(prep)])
    return Registry(cfg.registry_uri).register(
        cfg.model_name + TEACHER_SUFFIX, state_dict=model.state_dict(), model_spec=teacher.model_spec,
        schema=schema, preprocessor=prep.preprocessor, metrics={"test": metrics, "epochs": teacher.metrics},
        config=json.loads(cfg.model_dump_json()), lineage=lineage, model_card=card,
    )


def load_teacher(cfg: PipelineConfig, ref: str = "latest") -> tuple[Any, int, dict]:
    """The registered teacher (for `raysys distill` without retraining)."""
    from raysys.registry import Registry

    loaded = Registry(cfg.registry_uri).load(cfg.model_name + TEACHER_SUFFIX, ref)
    return loaded.model, loaded.version, loaded.metrics.get("test", {})


# ----- distillation ------------------------------------------------------------------------------------


@dataclass
class _StudentEvaluation:
    metrics: dict  # the float student's test metrics
    teacher: dict  # the teacher's test figures beside the student's, for the card
    int8_model: Any = None
    int8_metrics: dict | None = None


@dataclass
class _CardFacts:
    """What the float student's and its int8 variant's cards and registry entries share."""
    lineage: dict
    training_config: dict
    distillation: dict


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
    from raysys.distill import run_sweep
    from raysys.registry import Registry
    from raysys.workflow.small_tables import sized
    from raysys.workflow.trust_stage import check_private_teacher, student_privacy

    cfg = sized(cfg, prep.plan)
    check_private_teacher(cfg, teacher_metrics, teacher_version)
    # Ray Data's tasks write the soft targets under data.root, Tune's trials their checkpoints under run_dir
    check_nodes_reach({"run_dir": cfg.run_dir, "data.root": cfg.data.root})
    sweep = run_sweep(cfg, prep.schema, prep.preprocessor, teacher_model, run_name=resume_sweep,
                      resume=resume_sweep is not None)
    student = _best_student(sweep)
    log.info("[register] evaluating the chosen student on the test split, then registering it",
             extra=progress("register", "start"))
    privacy = student_privacy(cfg, sweep.privacy, teacher_metrics.get("privacy"))
    ev = _evaluate_student(cfg, prep, student, teacher_model, teacher_metrics, privacy)
    facts = _card_facts(cfg, prep, sweep, teacher_version, lineage)
    reg = Registry(cfg.registry_uri)
    version = _register_student(cfg, prep, reg, sweep, student, ev, teacher_metrics, facts)
    reg.set_alias(cfg.model_name, alias, version)
    log.info("[distill] chose %s: student test accuracy %.4f, %d parameters (teacher %.4f, %d); %s:v%d is %s",
             dict(sweep.best_config), ev.metrics["accuracy"], ev.metrics["num_parameters"], ev.teacher["accuracy"],
             ev.teacher["num_parameters"], cfg.model_name, version, alias)
    if ev.int8_model is not None:
        ev.metrics["int8_variant"] = _register_int8(cfg, prep, reg, sweep, student, ev, teacher_metrics, facts,
                                                    version)
    log.info("[register] done: %s:v%d", cfg.model_name, version, extra=progress("register", "done"))
    return version, ev.metrics, dict(sweep.best_config)


def _best_student(sweep):
    from raysys.models import build_model

    student = build_model(sweep.student_spec)
    student.load_state_dict(sweep.best_state_dict)
    student.eval()
    return student


def _evaluate_student(cfg: PipelineConfig, prep: Prepared, student, teacher_model,
                      teacher_metrics: dict, privacy: dict | None = None) -> _StudentEvaluation:
    """The student, its int8 variant (when `distill.quantize`) and the teacher on the test split, latency
    measured on one thread for each, as one serving replica thread sees it."""
    from raysys.evaluate import full_evaluation, torch_threads
    from raysys.models import predict_logits
    from raysys.models.quantize import quantize_dynamic_int8
    from raysys.workflow.trust_stage import model_trust

    schema, ev = prep.schema, cfg.distill.evaluation
    x_num, x_cat, y = _test_arrays(cfg, prep)
    teacher_logits = predict_logits(teacher_model, x_num, x_cat).numpy()
    common = {**_evaluation_kwargs(cfg, prep), "teacher_logits": teacher_logits}
    with torch_threads(1):
        metrics = full_evaluation(student, x_num, x_cat, y, schema.num_classes, **common)
        teacher_eval = full_evaluation(teacher_model, x_num, x_cat, y, schema.num_classes,
                                       latency_batch_size=common["latency_batch_size"],
                                       latency_repeats=ev.latency_repeats)
        q_model = quantize_dynamic_int8(student) if cfg.distill.quantize else None
        q_metrics = (full_evaluation(q_model, x_num, x_cat, y, schema.num_classes, **common)
                     if q_model is not None else None)
    test = (x_num, x_cat, y)
    metrics["trust"] = model_trust(cfg, prep, student, test, privacy=privacy, who="student")
    if q_metrics is not None:
        q_metrics["trust"] = model_trust(cfg, prep, q_model, test, attack_model=student, privacy=privacy,
                                         who="student-int8")
    teacher_cmp = {**teacher_metrics, "accuracy": teacher_eval["accuracy"],
                   "num_parameters": teacher_eval["num_parameters"], "latency": teacher_eval.get("latency")}
    return _StudentEvaluation(metrics, teacher_cmp, q_model, q_metrics)


def _card_facts(cfg: PipelineConfig, prep: Prepared, sweep, teacher_version: int,
                extra_lineage: dict | None) -> _CardFacts:
    teacher_ref = f"{cfg.model_name}{TEACHER_SUFFIX}:v{teacher_version}"
    distillation = {**{k: v for k, v in sweep.summary().items() if k not in ("trials",)},
                    "num_trials": len(sweep.trials)}
    lineage = {"parent_teacher": teacher_ref, "data_fingerprint": prep.fingerprint, "distill": dict(sweep.best_config),
               "sweep_id": sweep.sweep_id, "sweep_dir": str(sweep.results_dir), **_quality_lineage(prep),
               **(extra_lineage or {})}
    return _CardFacts(lineage, _config_sections(cfg, "teacher", "train", "distill"), distillation)


def _register_student(cfg: PipelineConfig, prep: Prepared, reg, sweep, student, ev: _StudentEvaluation,
                      teacher_metrics: dict, facts: _CardFacts) -> int:
    from raysys.registry.modelcard import build_model_card
    from raysys.workflow.reference import monitor_reference
    from raysys.workflow.trust_stage import governance

    card = build_model_card(name=cfg.model_name, kind="student", schema=prep.schema,
                            data_fingerprint=prep.fingerprint, metrics=ev.metrics,
                            governance=governance(cfg, prep, ev.metrics.get("trust"), teacher_metrics.get("trust")),
                            intended_use=cfg.governance.intended_use,
                            training_config=facts.training_config, distillation=facts.distillation,
                            teacher_metrics=ev.teacher, lineage=facts.lineage, data_root=cfg.data.root,
                            data_quality=prep.quality, limitations=size_limitations(prep))
    return reg.register(
        cfg.model_name, state_dict=student.state_dict(), model_spec=sweep.student_spec, schema=prep.schema,
        preprocessor=prep.preprocessor,
        metrics={"test": ev.metrics, "teacher_test": teacher_metrics, "sweep": sweep.trials},
        config=json.loads(cfg.model_dump_json()), lineage=facts.lineage,
        reference_profile=monitor_reference(cfg, prep.schema, prep.preprocessor, student, prep.plan),
        model_card=card,
    )


def _register_int8(cfg: PipelineConfig, prep: Prepared, reg, sweep, student, ev: _StudentEvaluation,
                   teacher_metrics: dict, facts: _CardFacts, float_version: int) -> dict:
    """Register the int8 variant as the next version with alias `candidate`; returns its `int8_variant`
    figures for the float student's metrics."""
    from raysys.models.quantize import DYNAMIC_INT8
    from raysys.registry.modelcard import build_model_card
    from raysys.workflow.reference import monitor_reference
    from raysys.workflow.trust_stage import governance

    metrics, q_metrics = ev.metrics, ev.int8_metrics
    q_lineage = {**facts.lineage, "quantized_from": f"{cfg.model_name}:v{float_version}"}
    q_card = build_model_card(name=cfg.model_name, kind="student-int8", schema=prep.schema,
                              data_fingerprint=prep.fingerprint, metrics=q_metrics,
                              governance=governance(cfg, prep, q_metrics.get("trust"), teacher_metrics.get("trust")),
                              intended_use=cfg.governance.intended_use,
                              training_config=facts.training_config, distillation=facts.distillation,
                              teacher_metrics=ev.teacher, lineage=q_lineage, quantization=DYNAMIC_INT8,
                              data_root=cfg.data.root, data_quality=prep.quality,
                              limitations=size_limitations(prep))
    q_version = reg.register(
        cfg.model_name, state_dict=student.state_dict(), model_spec={**sweep.student_spec,
                                                                     "quantization": DYNAMIC_INT8},
        schema=prep.schema, preprocessor=prep.preprocessor,
        metrics={"test": q_metrics, "teacher_test": teacher_metrics, "float_test": metrics},
        config=json.loads(cfg.model_dump_json()), lineage=q_lineage,
        reference_profile=monitor_reference(cfg, prep.schema, prep.preprocessor, ev.int8_model, prep.plan),
        model_card=q_card,
    )
    reg.set_alias(cfg.model_name, "candidate", q_version)
    log.info("[distill] int8 variant %s:v%d (candidate): test accuracy %.4f (float %.4f)", cfg.model_name,
             q_version, q_metrics["accuracy"], metrics["accuracy"])
    return {
        "version": q_version, "accuracy": q_metrics["accuracy"],
        "latency_per_row_ms_p50": q_metrics["latency"]["per_row_ms"]["p50"] if "latency" in q_metrics else None,
        "float_latency_per_row_ms_p50": metrics["latency"]["per_row_ms"]["p50"] if "latency" in metrics else None,
    }


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Check the data's quality, train the teacher, distill, evaluate and register the student as
    `production`. Needs Ray up."""
    cfg = absolute(cfg)
    timer = StageTimer()
    prep = timer.run("data", stage_data, cfg)
    timer.run("quality", stage_quality, cfg, prep)
    teacher, t_version, t_metrics = timer.run("teacher", stage_teacher, cfg, prep)
    s_version, s_metrics, best = timer.run("distill", stage_distill, cfg, prep, teacher, t_version, t_metrics)
    return PipelineResult(
        model_name=cfg.model_name, student_version=s_version, teacher_version=t_version,
        teacher_metrics=t_metrics, student_metrics=s_metrics,
        majority_accuracy=t_metrics["majority_class_accuracy"], best_distill_config=best,
        stage_seconds=timer.times, data_fingerprint=prep.fingerprint,
    )
