"""A finished run, copied into MLflow from the driver (Ray Train v2 has no Tune logger callback, and the
registry is the source of truth): one parent run per call with, nested under it, a run per teacher
version (params, per-epoch metrics, test metrics, model card), the sweep with one nested run per trial
(params, per-epoch validation metrics from Tune's progress.csv, best figures, Pareto/chosen tags), and
the evaluation of the production student (metrics, confusion matrix, model card, the HTML report). Every
registered version becomes an MLflow model version whose source is the raysys registry's version directory
(tag `raysys_version`), and the registry's current aliases are set on them.

Needs the optional extra (`pip install raysys[mlflow]`: mlflow-skinny, SQLAlchemy, Alembic).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from raysys.report.load import ModelVersion, RunData, load_run

EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "samples_per_s", "mem_max_total_bytes")
TRIAL_EPOCH_METRICS = ("train_loss", "train_soft", "train_hard", "val_loss", "val_accuracy")
TEST_METRICS = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "log_loss", "num_parameters",
                "teacher_agreement", "majority_class_accuracy")
TRIAL_PARAMS = ("temperature", "alpha", "lr", "hidden_dims")


def _mlflow():
    try:
        import mlflow
    except ImportError as e:
        raise ValueError("tracking.mlflow: MLflow is not installed; `pip install 'raysys[mlflow]'` "
                         "(mlflow-skinny, SQLAlchemy, Alembic)") from e
    return mlflow


def default_uri(root: str | Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params (`train.lr`), values as short strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v, default=str)[:250] if not isinstance(v, str) else v[:250]
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v


def _test_metrics(test: dict[str, Any]) -> dict[str, float]:
    out = {k: float(test[k]) for k in TEST_METRICS if _number(test.get(k))}
    cal = test.get("calibration") or {}
    if _number(cal.get("ece")):
        out["ece"] = float(cal["ece"])
    lat = ((test.get("latency") or {}).get("per_row_ms") or {})
    if _number(lat.get("p50")):
        out["latency_per_row_ms_p50"] = float(lat["p50"])
    return out


def _experiment(client, name: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # artifacts beside the run dir, not in ./mlruns of whatever directory the command ran in
    return client.create_experiment(name, artifact_location=(root / "mlartifacts").resolve().as_uri())


def _log_teacher(mlflow, t: ModelVersion) -> None:
    with mlflow.start_run(run_name=f"teacher {t.ref}", nested=True):
        mlflow.set_tags({"raysys.kind": "teacher", "raysys.model": t.name, "raysys.version": str(t.version)})
        mlflow.log_params(_flat({k: t.config.get(k) or {} for k in ("teacher", "train")}))
        for e in t.metrics.get("epochs") or []:
            mlflow.log_metrics({k: float(e[k]) for k in EPOCH_METRICS if _number(e.get(k))}, step=int(e["epoch"]))
        mlflow.log_metrics({f"test_{k}": v for k, v in _test_metrics(t.test).items()})
        if t.card_md:
            mlflow.log_text(t.card_md, "model_card.md")


def _trial_epochs(trial: dict[str, Any]) -> list[dict[str, str]]:
    path = Path(str(trial.get("path") or "")) / "progress.csv"
    if not trial.get("path") or not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _log_sweep(mlflow, sweep: dict[str, Any]) -> None:
    with mlflow.start_run(run_name=f"sweep {sweep.get('sweep_id', '')}", nested=True):
        mlflow.set_tags({"raysys.kind": "sweep", "raysys.search": str(sweep.get("search")),
                         "raysys.scheduler": str(sweep.get("scheduler"))})
        mlflow.log_params(_flat({"best": sweep.get("best_config") or {}}))
        if _number(sweep.get("best_val_accuracy")):
            mlflow.log_metric("best_val_accuracy", float(sweep["best_val_accuracy"]))
        for trial in sweep.get("trials") or []:
            with mlflow.start_run(run_name=f"trial {trial.get('trial_id')}", nested=True):
                mlflow.set_tags({"raysys.kind": "trial", "raysys.trial_id": str(trial.get("trial_id")),
                                 "raysys.pareto": str(bool(trial.get("pareto"))),
                                 "raysys.chosen": str(bool(trial.get("chosen"))),
                                 "raysys.error": str(trial.get("error") or "")})
                mlflow.log_params({p: json.dumps(trial.get(p)) for p in TRIAL_PARAMS})
                for row in _trial_epochs(trial):
                    vals = {k: float(row[k]) for k in TRIAL_EPOCH_METRICS if row.get(k) not in (None, "")}
                    mlflow.log_metrics(vals, step=int(float(row.get("epoch") or 0)))
                mlflow.log_metrics({k: float(trial[k]) for k in ("best_val_accuracy", "num_parameters",
                                                                 "latency_ms_per_row", "epochs_run")
                                    if _number(trial.get(k))})


def _log_evaluation(mlflow, data: RunData, report: Path | None) -> str | None:
    s = data.student
    if s is None:
        return None
    with mlflow.start_run(run_name=f"evaluation {s.ref}", nested=True) as run:
        mlflow.set_tags({"raysys.kind": "evaluation", "raysys.model": s.name, "raysys.version": str(s.version)})
        mlflow.log_metrics({f"test_{k}": v for k, v in _test_metrics(s.test).items()})
        teacher = s.metrics.get("teacher_test") or {}
        mlflow.log_metrics({f"teacher_test_{k}": v for k, v in _test_metrics(teacher).items()})
        if s.test.get("confusion_matrix"):
            mlflow.log_dict({"classes": s.test.get("classes"), "matrix": s.test["confusion_matrix"]},
                            "confusion_matrix.json")
        if s.card_md:
            mlflow.log_text(s.card_md, "model_card.md")
        if report is not None and report.is_file():
            mlflow.log_artifact(str(report))
        return run.info.run_id


def _register(client, data: RunData, versions: list[ModelVersion], run_id: str | None) -> dict[str, Any]:
    """Each registry version as an MLflow model version (once: a version already there is kept), and the
    registry's current aliases on them. Returns {name: {raysys version: MLflow version}}."""
    out: dict[str, Any] = {}
    for mv in versions:
        name = mv.name
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name, description="copied from the raysys registry (source of truth)")
        # a version `raysys registry export --mlflow` made (a loadable pyfunc) wins over a directory copy
        found = sorted(client.search_model_versions(filter_string=f"name = '{name}'"),
                       key=lambda v: (v.tags.get("raysys_format") == "pyfunc", -int(v.version)))
        known = {v.tags.get("raysys_version"): v.version for v in found}
        if str(mv.version) not in known:
            source = (Path(data.registry) / name / "versions" / str(mv.version)).resolve().as_uri()
            created = client.create_model_version(name, source=source, run_id=run_id,
                                                  tags={"raysys_version": str(mv.version),
                                                        "raysys_kind": (mv.card or {}).get("kind", "")})
            known[str(mv.version)] = created.version
        out.setdefault(name, {})[mv.version] = int(known[str(mv.version)])
    return out


def _set_aliases(client, data: RunData, mapping: dict[str, Any]) -> dict[str, int]:
    current: dict[str, int] = {}
    for e in data.alias_events:  # oldest first: the last move of each alias is its state
        current[e["alias"]] = int(e["version"])
    set_ = {}
    for alias, version in current.items():
        mlflow_version = mapping.get(data.model_name, {}).get(version)
        if mlflow_version is not None:
            client.set_registered_model_alias(data.model_name, alias, str(mlflow_version))
            set_[alias] = mlflow_version
    return set_


def log_run(root: str | Path, uri: str | None = None, *, experiment: str = "raysys",
            report: str | Path | None = None, registry: str | Path | None = None) -> dict[str, Any]:
    """Copy the run directory `root` into MLflow at `uri` (default sqlite:///<root>/mlflow.db). Returns the
    parent run id, the experiment id and the registered versions."""
    mlflow = _mlflow()
    data = load_run(root, registry=registry)
    uri = uri or default_uri(data.root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = _experiment(client, experiment, Path(data.root))
    mlflow.set_experiment(experiment_id=exp_id)  # nested runs take the active experiment, not their parent's
    report_path = Path(report) if report else Path(data.root) / "report.html"
    with mlflow.start_run(experiment_id=exp_id, run_name=f"raysys {data.student.ref if data.student else data.root}"
                          ) as parent:
        mlflow.set_tags({"raysys.kind": "pipeline", "raysys.root": data.root})
        if data.student is not None:
            mlflow.log_params(_flat({"distill": data.student.lineage.get("distill") or {}}))
            mlflow.set_tag("raysys.data_fingerprint", str(data.student.lineage.get("data_fingerprint", "")))
        for t in data.teachers:
            _log_teacher(mlflow, t)
        if data.sweep:
            _log_sweep(mlflow, data.sweep)
        eval_run = _log_evaluation(mlflow, data, report_path)
    mapping = _register(client, data, [*data.teachers, *data.students], eval_run)
    aliases = _set_aliases(client, data, mapping)
    return {"uri": uri, "experiment_id": exp_id, "run_id": parent.info.run_id, "versions": mapping,
            "aliases": aliases}
