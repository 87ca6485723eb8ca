"""`raysys registry export N --mlflow`: one registry version as a loadable MLflow model, no pickle of ours.

The model is a "models from code" pyfunc: `raysys/tracking/pyfunc_model.py` (copied into the model by MLflow)
plus the version's safetensors weights, JSON model spec, schema, preprocessor and manifest as artifacts (each
verified against the registry's sha256 before it is copied, and again when the model loads). It is logged in an
`export` run and registered as a version of the MLflow registered model of the same name, tagged
`raysys_version` / `raysys_format=pyfunc`, with the raysys aliases that point at that version. The raysys
registry stays the source of truth: exporting a version again reuses its MLflow version and only moves the
aliases. Loading it (`mlflow.pyfunc.load_model("models:/<name>@production")`) needs raysys installed, and
mlflow-skinny is enough.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from raysys.tracking.exported import ARTIFACT_FILES, PREDICTION_COLUMN, PROBABILITY_PREFIX
from raysys.tracking.mlflow_log import _experiment, _mlflow, default_uri

CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
FORMAT = "pyfunc"


def _requirements() -> list[str]:
    """Pinned as this process runs them (explicit: MLflow's own inference would import the model in a subprocess)."""
    from importlib.metadata import version

    import raysys

    return [f"raysys=={raysys.__version__}", *(f"{p}=={version(p)}" for p in ("torch", "safetensors", "pandas",
                                                                               "numpy", "pydantic"))]


def _signature(schema):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = [ColSpec("double" if f.kind == "numeric" else "string", f.name, required=not f.nullable)
              for f in schema.features]
    outputs = [ColSpec("string", PREDICTION_COLUMN), *(ColSpec("double", f"{PROBABILITY_PREFIX}{c}")
                                                       for c in schema.classes)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def _input_example(schema, preprocessor: dict):
    """One raw row (numeric features at their training mean, categorical at their first category): MLflow stores
    it beside the model and checks at export time that the model loads and scores it."""
    import pandas as pd

    means = iter(preprocessor["mean"])
    row = {f.name: float(next(means)) if f.kind == "numeric" else f.categories[0] for f in schema.features}
    return pd.DataFrame([row])


def _exported_version(client, name: str, version: int):
    """The MLflow version an earlier export made of raysys `version` (None when there is none)."""
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        return None
    found = [v for v in client.search_model_versions(filter_string=f"name = '{name}'")
             if v.tags.get("raysys_version") == str(version) and v.tags.get("raysys_format") == FORMAT]
    return min(found, key=lambda v: int(v.version)) if found else None


def _log_model(mlflow, client, exp_id: str, name: str, version: int, files: dict[str, bytes], source: str):
    from raysys.data.schema import DatasetSchema

    schema = DatasetSchema.from_json(files["schema.json"])
    example = _input_example(schema, json.loads(files["preprocessor.json"]))
    with tempfile.TemporaryDirectory(prefix="raysys-export-") as tmp:
        paths = {}
        for key, fn in ARTIFACT_FILES.items():
            (Path(tmp) / fn).write_bytes(files[fn])
            paths[key] = str(Path(tmp) / fn)
        if "model_card.md" in files:  # for people browsing the model; the loader does not read it
            (Path(tmp) / "model_card.md").write_bytes(files["model_card.md"])
            paths["model_card"] = str(Path(tmp) / "model_card.md")
        mlflow.set_experiment(experiment_id=exp_id)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"export {name}:v{version}") as run:
            mlflow.set_tags({"raysys.kind": "export", "raysys.model": name, "raysys.version": str(version),
                             "raysys.source": source})
            info = mlflow.pyfunc.log_model(name="model", python_model=str(CODE_FILE), artifacts=paths,
                                           pip_requirements=_requirements(), signature=_signature(schema),
                                           input_example=example)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="copied from the raysys registry (source of truth)")
    return client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id,
                                       tags={"raysys_version": str(version), "raysys_format": FORMAT,
                                             "raysys_source": source})


def export_version(registry_uri: str, name: str, ref: str | int, uri: str | None = None, *,
                   experiment: str = "raysys") -> dict[str, Any]:
    """Export raysys version `ref` (a number or an alias) of `name` to MLflow at `uri` (default
    sqlite:///<run root>/mlflow.db beside a local registry, else ./mlflow.db). Returns the MLflow version, its
    `models:/` URI, the aliases set and the raysys version."""
    from raysys.registry import Registry

    mlflow = _mlflow()
    reg = Registry(registry_uri)
    version, files = reg.version_files(name, ref)
    aliases = sorted(a for a, v in reg.aliases(name).items() if v == version)
    local_root = None if "://" in reg.uri else Path(reg.uri).parent
    uri = uri or default_uri(local_root or Path.cwd())
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    mv = _exported_version(client, name, version)
    if mv is None:
        exp_id = _experiment(client, experiment, local_root or Path.cwd())
        source = reg.describe(name, version)["uri"]
        mv = _log_model(mlflow, client, exp_id, name, version, files, source)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, str(mv.version))
    return {"uri": uri, "name": name, "version": version, "mlflow_version": int(mv.version),
            "model_uri": f"models:/{name}/{mv.version}", "aliases": aliases}
