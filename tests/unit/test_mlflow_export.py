"""Tier 1: `raysys registry export N --mlflow`: a registry version exported to a temporary MLflow sqlite store,
loaded back with `mlflow.pyfunc.load_model` (models from code, mlflow-skinny) and scored on raw rows exactly as
the endpoint's scorer scores them; no pickle of ours in the model (skipped without the extra `raysys[mlflow]`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from raysys.config import DataConfig, ModelConfig
from raysys.data import Preprocessor, SyntheticTask
from raysys.models import build_model, model_spec
from raysys.models.quantize import DYNAMIC_INT8
from raysys.registry import Registry

NAME = "raysys-student"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two versions of NAME (a float MLP: production, its int8 variant: candidate) in <root>/registry."""
    root = tmp_path_factory.mktemp("run")
    cfg = DataConfig(num_train_rows=300, num_val_rows=50, num_test_rows=50, num_numeric=4, num_categorical=2,
                     num_categories=3, num_classes=3, seed=5)
    task = SyntheticTask(cfg)
    schema = task.schema()
    table = task.sample(300, [5, 1])
    pre = Preprocessor.fit(schema, table)
    torch.manual_seed(0)
    spec = model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3))
    model = build_model(spec)
    reg = Registry(root / "registry")
    common = dict(state_dict=model.state_dict(), schema=schema, preprocessor=pre, metrics={"accuracy": 0.7},
                  config={}, lineage={})
    v1 = reg.register(NAME, model_spec=spec, **common)
    v2 = reg.register(NAME, model_spec={**spec, "quantization": DYNAMIC_INT8}, **common)
    reg.set_alias(NAME, "production", v1)
    reg.set_alias(NAME, "candidate", v2)
    frame = task.sample(40, [9, 2]).to_pandas().drop(columns=[schema.label])
    return reg, root, frame


def _scorer_answer(reg: Registry, ref, frame) -> tuple[list[str], np.ndarray]:
    """What the endpoint answers for these rows (serve.scoring over serve.parsing)."""
    from serve.parsing import rows_to_request
    from serve.scoring import Scorer, format_prediction

    scorer = Scorer.from_loaded(reg.load(NAME, ref))
    rows = json.loads(frame.to_json(orient="records"))
    checked = rows_to_request(rows, scorer.schema, scorer.preprocessor)
    out = format_prediction(scorer, scorer.predict_proba(checked.x_num, checked.x_cat))
    return out["predictions"], np.asarray(out["probabilities"])


@pytest.mark.parametrize("ref", ["production", "2"])
def test_an_exported_version_loads_with_pyfunc_and_predicts_as_the_scorer(registry, tmp_path, monkeypatch, ref):
    mlflow = pytest.importorskip("mlflow")
    from raysys.tracking.mlflow_export import export_version

    reg, root, frame = registry
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    got = export_version(reg.uri, NAME, ref, uri)
    version = reg.resolve(NAME, ref)
    assert got["version"] == version and got["aliases"] == (["production"] if version == 1 else ["candidate"])
    client = mlflow.MlflowClient(tracking_uri=uri)
    alias = got["aliases"][0]
    mv = client.get_model_version_by_alias(NAME, alias)
    assert mv.tags["raysys_version"] == str(version) and mv.tags["raysys_format"] == "pyfunc"

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{alias}")
    out = model.predict(frame)
    classes, probs = _scorer_answer(reg, ref, frame)
    assert out["prediction"].tolist() == classes
    got_probs = out[[f"probability_{c}" for c in reg.load(NAME, ref).schema.classes]].to_numpy()
    np.testing.assert_allclose(got_probs, probs, rtol=0, atol=1e-12)

    # the model directory: MLflow's metadata, our code file, safetensors + JSON; nothing pickled
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/{mv.version}",
                                                dst_path=str(tmp_path / "dl"))
    names = {p.name for p in __import__("pathlib").Path(local).rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_model.py", "model.safetensors", "model.json", "schema.json",
            "preprocessor.json", "manifest.json"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".pt", ".pth", ".joblib"))
                or "pickle" in n or "cloudpickle" in n], names
    assert not (tmp_path / "mlruns").exists()


def test_exporting_again_reuses_the_version_and_moves_the_aliases(registry, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from raysys.tracking.mlflow_export import export_version

    reg, _, _ = registry
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = export_version(reg.uri, NAME, 1, uri)
    assert export_version(reg.uri, NAME, "production", uri)["mlflow_version"] == first["mlflow_version"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1


def test_a_row_the_endpoint_refuses_is_refused_naming_the_field(registry, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from raysys.tracking.mlflow_export import export_version

    reg, _, frame = registry
    got = export_version(reg.uri, NAME, 1, f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(got["model_uri"])
    # columns beside the features (a label, an id) are ignored
    assert model.predict(frame.assign(label="a", row_id=1)).equals(model.predict(frame))
    cat = next(f.name for f in reg.load(NAME, 1).schema.categorical)
    bad = frame.head(3).copy()
    bad[cat] = ["never-seen"] * 3
    with pytest.raises(Exception, match=cat):
        model.predict(bad)


def test_the_cli_exports_to_the_default_store_beside_the_run(registry):
    pytest.importorskip("mlflow")
    from raysys.cli import app

    reg, root, _ = registry
    res = CliRunner().invoke(app, ["registry", "export", "production", "--mlflow", "--preset", "tiny",
                                   "--root", str(root)])
    assert res.exit_code == 0, res.output
    assert (root / "mlflow.db").is_file() and "models:/raysys-student/" in res.output
    res = CliRunner().invoke(app, ["registry", "export", "production", "--preset", "tiny", "--root", str(root)])
    assert res.exit_code == 2 and "--mlflow" in res.output
