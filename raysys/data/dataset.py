"""Reading a dataset directory, its fingerprint, and the feature preprocessing shared by train and serve.

A dataset directory is `schema.json` plus `train/`, `validation/` and `test/` folders of Parquet
files. `ensure_dataset` generates the synthetic one when it is missing; bring-your-own data only needs
the same layout (`raysys data import` makes it from any Parquet directory).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from raysys.config import DataConfig
from raysys.data.schema import DatasetSchema, SchemaError
from raysys.data.synthetic import SPLITS, write_synthetic


def split_dir(root: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}; choose one of {list(SPLITS)}")
    return Path(root) / split


def split_files(root: str | Path, split: str) -> list[str]:
    d = split_dir(root, split)
    files = sorted(str(p) for p in d.glob("*.parquet"))
    if not files:
        raise ValueError(f"data.root: no Parquet files in {str(d)!r}; expected {list(SPLITS)} folders of *.parquet")
    return files


def ensure_dataset(cfg: DataConfig) -> DatasetSchema:
    """Return the dataset's schema, generating the synthetic data first when it is not there yet."""
    root = Path(cfg.root)
    if not (root / "schema.json").exists():
        if cfg.source != "synthetic":
            raise ValueError(f"data.root: {str(root)!r} has no schema.json; run `raysys data import` first")
        write_synthetic(cfg, root)
    schema = DatasetSchema.load(root)
    for split in SPLITS:
        files = split_files(root, split)
        schema.check_table(pq.read_schema(files[0]), where=files[0])
    return schema


def read_split(root: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """A whole split as one Arrow table (used for evaluation and small in-memory stages)."""
    return pads.dataset(split_files(root, split), format="parquet").to_table(columns=columns)


def fingerprint(root: str | Path) -> str:
    """sha256 over the schema and every Parquet file's name and bytes: same data, same fingerprint."""
    h = hashlib.sha256()
    root = Path(root)
    h.update((root / "schema.json").read_bytes())
    for split in SPLITS:
        for f in split_files(root, split):
            h.update(f"{split}/{Path(f).name}".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _category_indices(values: np.ndarray, categories: list[str], name: str) -> np.ndarray:
    cats = np.asarray(categories, dtype=object)
    order = np.argsort(cats)
    sorted_cats = cats[order]
    values = np.asarray(values, dtype=object)
    pos = np.searchsorted(sorted_cats, values)
    pos_c = np.minimum(pos, len(cats) - 1)
    ok = sorted_cats[pos_c] == values
    if not ok.all():
        bad = values[~ok][0]
        raise SchemaError(name, f"unknown category {bad!r}; allowed: {categories}")
    return order[pos_c].astype(np.int64)


class Preprocessor:
    """Standardises numeric features (train-split mean/std) and maps categories to indices.

    Its state is two float lists per numeric feature, stored as JSON with every model version, so the
    endpoint transforms requests exactly as training did.
    """

    def __init__(self, schema: DatasetSchema, mean: list[float], std: list[float]):
        if len(mean) != len(schema.numeric) or len(std) != len(schema.numeric):
            raise ValueError("preprocessor: mean/std must have one entry per numeric feature")
        self.schema = schema
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def fit(cls, schema: DatasetSchema, table: pa.Table) -> Preprocessor:
        mean, std = [], []
        for f in schema.numeric:
            col = table.column(f.name).cast(pa.float64())
            if col.null_count:
                raise SchemaError(f.name, f"{col.null_count} null values in the training split; fill or drop them")
            m = pc.mean(col).as_py()
            s = pc.stddev(col).as_py() or 1.0
            mean.append(float(m))
            std.append(float(s) if s > 1e-12 else 1.0)
        return cls(schema, mean, std)

    @classmethod
    def fit_split(cls, schema: DatasetSchema, root: str | Path) -> Preprocessor:
        return cls.fit(schema, read_split(root, "train", [f.name for f in schema.numeric]))

    def standardize(self, x_num_raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(x_num_raw, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def transform_batch(self, batch: dict[str, np.ndarray], with_label: bool = True):
        """A columnar batch (Ray Data numpy batch or table.to_pydict) -> (x_num, x_cat[, y]) arrays."""
        n = len(batch[self.schema.features[0].name])
        x_raw = np.empty((n, len(self.schema.numeric)), dtype=np.float32)
        for j, f in enumerate(self.schema.numeric):
            x_raw[:, j] = np.asarray(batch[f.name], dtype=np.float32)
        x_cat = np.empty((n, len(self.schema.categorical)), dtype=np.int64)
        for j, f in enumerate(self.schema.categorical):
            x_cat[:, j] = _category_indices(batch[f.name], f.categories or [], f.name)
        x_num = self.standardize(x_raw)
        if not with_label:
            return x_num, x_cat
        return x_num, x_cat, self.schema.label_indices(np.asarray(batch[self.schema.label]))

    def transform_table(self, table: pa.Table, with_label: bool = True):
        batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        return self.transform_batch(batch, with_label=with_label)

    def raw_numeric(self, table: pa.Table) -> np.ndarray:
        return np.stack([table.column(f.name).to_numpy(zero_copy_only=False).astype(np.float32)
                         for f in self.schema.numeric], 1)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, schema: DatasetSchema, d: dict) -> Preprocessor:
        return cls(schema, d["mean"], d["std"])
