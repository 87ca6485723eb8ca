"""An exported registry version, scored outside raysys's serving stack (no MLflow import here, so it is testable
without the extra): the files `raysys registry export --mlflow` copies (safetensors weights, the JSON model spec,
schema and preprocessor, the manifest), checked against the manifest's sha256, the model rebuilt from the spec
with raysys's own builders. Raw rows are validated and transformed as `/v1/predict` does them (the schema's
`rows_to_arrays`, the preprocessor's imputation and standardisation), so the probabilities are the endpoint's.
Nothing is unpickled."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysys.data.dataset import Preprocessor
from raysys.data.schema import DatasetSchema, SchemaError
from raysys.models import build_model
from raysys.models.quantize import apply_quantization, split_spec
from raysys.registry.manifest import MANIFEST_FILE, WEIGHTS_FILE, verified

# artifact key (what the pyfunc's context.artifacts names) -> the registry file it copies
ARTIFACT_FILES = {"weights": WEIGHTS_FILE, "model_spec": "model.json", "schema": "schema.json",
                  "preprocessor": "preprocessor.json", "manifest": MANIFEST_FILE}
PREDICTION_COLUMN = "prediction"
PROBABILITY_PREFIX = "probability_"


@dataclass
class ExportedScorer:
    model: torch.nn.Module
    schema: DatasetSchema
    preprocessor: Preprocessor
    model_spec: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.schema.classes)

    @classmethod
    def from_files(cls, paths: dict[str, str]) -> ExportedScorer:
        """`paths`: artifact key -> local file (ARTIFACT_FILES' keys). Each file must match the manifest."""
        from safetensors.torch import load as st_load

        blobs = {key: Path(paths[key]).read_bytes() for key in ARTIFACT_FILES}
        manifest = json.loads(blobs["manifest"])
        where = f"exported {manifest.get('name', 'model')}"
        for key, fn in ARTIFACT_FILES.items():
            if key != "manifest":
                verified(blobs[key], manifest["files"][fn], where, fn)
        spec = json.loads(blobs["model_spec"])
        float_spec, quantization = split_spec(spec)
        model = build_model(float_spec)
        model.load_state_dict(st_load(blobs["weights"]), strict=True)
        schema = DatasetSchema.from_json(blobs["schema"])
        pre = Preprocessor.from_dict(schema, json.loads(blobs["preprocessor"]))
        return cls(apply_quantization(model.eval(), quantization), schema, pre, spec)

    def predict_proba_rows(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Raw rows (feature name -> value, None for a missing value of a nullable feature) -> float64
        probabilities [n, C]. ValueError naming the field for a row the endpoint would refuse."""
        try:
            x_num_raw, x_cat = self.schema.rows_to_arrays(rows, prefix="rows")
        except SchemaError as e:
            raise ValueError(f"{e.field}: {e.message}") from None
        x_num = self.preprocessor.standardize(x_num_raw, self.preprocessor.fill_missing(x_num_raw, x_cat))
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x_num, dtype=np.float32)),
                                torch.from_numpy(np.ascontiguousarray(x_cat, dtype=np.int64)))
            return torch.softmax(logits.double(), dim=1).numpy()

    def predict_frame(self, frame):
        """A pandas DataFrame of raw rows (the schema's feature columns; others are ignored; NaN/None where a
        nullable feature is missing) -> a DataFrame: `prediction` (class name) and `probability_<class>`."""
        import pandas as pd

        names = [f.name for f in self.schema.features]
        absent = [n for n in names if n not in frame.columns]
        if absent:
            raise ValueError(f"model_input: missing feature column(s) {absent}; expected {names}")
        features = frame[names].astype(object)
        rows = features.where(features.notna(), None).to_dict("records")
        probs = self.predict_proba_rows([{k: _native(v) for k, v in row.items()} for row in rows])
        out = pd.DataFrame({PREDICTION_COLUMN: [self.classes[i] for i in probs.argmax(1).tolist()]},
                           index=frame.index)
        for j, c in enumerate(self.classes):
            out[f"{PROBABILITY_PREFIX}{c}"] = probs[:, j]
        return out


def _native(v: Any) -> Any:
    """numpy scalars (a DataFrame's cells) as the Python values JSON rows hold."""
    return v.item() if isinstance(v, np.generic) else v
