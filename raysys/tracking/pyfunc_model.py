"""The MLflow "models from code" file of an exported registry version (`raysys registry export N --mlflow`).

MLflow copies this file into the model directory and runs it when the model is loaded
(`mlflow.pyfunc.load_model`): no Python object of ours is pickled. `load_context` rebuilds the torch model from
the version's JSON spec with raysys's own builders and loads its safetensors weights
(raysys.tracking.exported); `predict` takes a pandas DataFrame of raw rows.

Never import this module yourself: importing it registers the model with MLflow (`mlflow.models.set_model`).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from raysys.tracking.exported import ExportedScorer


class RaysysModel(PythonModel):
    def load_context(self, context) -> None:
        self.scorer = ExportedScorer.from_files(context.artifacts)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return self.scorer.predict_frame(model_input)


mlflow.models.set_model(RaysysModel())
