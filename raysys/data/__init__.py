"""Schema, synthetic generator with drift injection, Parquet IO and feature preprocessing."""

from raysys.data.dataset import Preprocessor, ensure_dataset, fingerprint, read_split, split_files
from raysys.data.schema import DatasetSchema, FeatureSpec, SchemaError
from raysys.data.synthetic import SPLITS, DriftSpec, SyntheticTask, write_synthetic

__all__ = [
    "SPLITS", "DatasetSchema", "DriftSpec", "FeatureSpec", "Preprocessor", "SchemaError", "SyntheticTask",
    "ensure_dataset", "fingerprint", "read_split", "split_files", "write_synthetic",
]
