"""The `tracking:` section: a copy of each run in MLflow."""

from __future__ import annotations

from pydantic import Field

from raysys.config.strict import Strict


class TrackingConfig(Strict):
    """Experiment tracking in MLflow (the optional extra `pip install raysys[mlflow]`); the raysys registry
    stays the source of truth, MLflow gets a copy of the runs, metrics and versions from the driver."""

    mlflow: bool = Field(False, description="Log each `raysys run`/`demo` to MLflow (teacher, sweep trials "
                                            "nested under the sweep, evaluation, registered versions).")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; setting it turns tracking on "
                                                     "(None: sqlite:///<root>/mlflow.db when `mlflow` is on).")
    experiment: str = Field("raysys", description="MLflow experiment the runs go under.")

    @property
    def enabled(self) -> bool:
        return self.mlflow or self.mlflow_uri is not None
