"""Experiment tracking: a finished run copied into MLflow (optional extra `raysys[mlflow]`). Ray-free."""

from raysys.tracking.mlflow_log import default_uri, log_run

__all__ = ["default_uri", "log_run"]
