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


# Parquet files up to this size in all are read by the driver into the object store (`read_blocks`) when a Ray
# Dataset over them is wanted in memory anyway
DRIVER_READ_MAX_BYTES = 256 * 2**20


def parquet_bytes(files: list[str]) -> int:
    """The Parquet files' size on disk (local paths)."""
    return sum(Path(f).stat().st_size for f in files)


def parquet_rows(files: list[str]) -> int:
    """The Parquet files' rows, from their footers (no data read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def read_blocks(files: list[str], *, min_blocks: int = 1, path_column: str | None = None) -> list[pa.Table]:
    """Parquet files read here as Arrow tables, one per file, the largest halved until there are `min_blocks`,
    each with a `path_column` of its file's path when one is named: the blocks of a small in-memory Ray Dataset
    (`ray.data.from_arrow`). Reading a few MiB here takes milliseconds; Ray Data's Parquet reader (2.60's
    DataSourceV2) starts a pool of footer-reader actors for each read, seconds of process start-up per read on
    a small cluster."""
    blocks = []
    for f in files:
        table = pq.read_table(f)
        if path_column is not None:
            table = table.append_column(path_column, pa.array([f] * table.num_rows, type=pa.string()))
        blocks.append(table)
    while len(blocks) < min_blocks:
        big = max(range(len(blocks)), key=lambda i: blocks[i].num_rows)
        table = blocks[big]
        if table.num_rows < 2:
            break
        half = table.num_rows // 2
        blocks[big:big + 1] = [table.slice(0, half), table.slice(half)]
    return blocks


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
    if any(v is None for v in values):
        raise SchemaError(name, "null category for a feature that is not nullable")
    pos = np.searchsorted(sorted_cats, values)
    pos_c = np.minimum(pos, len(cats) - 1)
    ok = sorted_cats[pos_c] == values
    if not ok.all():
        bad = values[~ok][0]
        raise SchemaError(name, f"unknown category {bad!r}; allowed: {categories}")
    return order[pos_c].astype(np.int64)


def _floats(values) -> np.ndarray:
    """A numeric column -> float32, None (an object column's null) -> NaN."""
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = np.array([np.nan if v is None else v for v in arr], dtype=np.float64)
    return arr.astype(np.float32)


class Preprocessor:
    """Standardises numeric features (train-split mean/std) and maps categories to indices; imputes the
    nulls of nullable features (train median / most frequent category) and appends, per nullable numeric
    feature, an is-missing 0/1 column after the standardised ones (`schema.missing_indicators`).

    Its state (mean, std and the fill values) is JSON stored with every model version, so the endpoint
    transforms requests exactly as training did. A state without `fill` (saved before nulls were allowed)
    still loads: its schema has no nullable feature.
    """

    def __init__(self, schema: DatasetSchema, mean: list[float], std: list[float],
                 fill: dict[str, float | str] | None = None):
        if len(mean) != len(schema.numeric) or len(std) != len(schema.numeric):
            raise ValueError("preprocessor: mean/std must have one entry per numeric feature")
        self.schema = schema
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.fill = dict(fill or {})
        unknown = set(self.fill) - {f.name for f in schema.features if f.nullable}
        if unknown:
            raise ValueError(f"preprocessor: fill values for features that are not nullable: {sorted(unknown)}")
        # a nullable feature without a fill value (an identity preprocessor) imputes the mean / first category
        self._num_fill = np.array([float(self.fill.get(f.name, m)) for f, m in zip(schema.numeric, self.mean)],
                                  dtype=np.float32)
        self._nullable_num = np.array([f.nullable for f in schema.numeric], dtype=bool)
        self._any_nullable = any(f.nullable for f in schema.features)
        self._cat_fill = [f.categories.index(self.fill[f.name]) if f.name in self.fill else 0
                          for f in schema.categorical]

    @classmethod
    def fit(cls, schema: DatasetSchema, table: pa.Table) -> Preprocessor:
        mean, std, fill = [], [], {}
        for f in schema.numeric:
            col = table.column(f.name).cast(pa.float64())
            if col.null_count and not f.nullable:
                raise SchemaError(f.name, f"{col.null_count} null values in the training split; fill or drop them "
                                          "(or mark the feature nullable)")
            if f.nullable:  # impute with the train median, then standardise the imputed column
                x = col.to_numpy(zero_copy_only=False)
                med = float(np.nanmedian(x)) if np.isfinite(x).any() else 0.0
                fill[f.name] = med
                col = pa.chunked_array([pa.array(np.where(np.isnan(x), med, x))])
            m = pc.mean(col).as_py()
            s = pc.stddev(col).as_py() or 1.0
            mean.append(float(m))
            std.append(float(s) if s > 1e-12 else 1.0)
        for f in schema.categorical:
            if f.nullable:  # the train split's most frequent category
                counts = pc.value_counts(table.column(f.name).drop_null()).to_pylist()
                fill[f.name] = max(counts, key=lambda c: c["counts"])["values"] if counts else f.categories[0]
        return cls(schema, mean, std, fill)

    @classmethod
    def fit_split(cls, schema: DatasetSchema, root: str | Path) -> Preprocessor:
        cols = [f.name for f in schema.numeric] + [f.name for f in schema.categorical if f.nullable]
        return cls.fit(schema, read_split(root, "train", cols))

    def fill_missing(self, x_num_raw: np.ndarray, x_cat: np.ndarray) -> np.ndarray | None:
        """Impute in place: NaN of nullable numeric features -> fill value, -1 categories -> fill category.
        Returns the numeric is-missing mask [n, n_num] (None when the schema has no nullable feature)."""
        if not self._any_nullable:
            return None
        missing = np.isnan(x_num_raw) & self._nullable_num
        x_num_raw[missing] = np.broadcast_to(self._num_fill, x_num_raw.shape)[missing]
        for j, f in enumerate(self.schema.categorical):
            if f.nullable:
                col = x_cat[:, j]
                col[col < 0] = self._cat_fill[j]
        return missing

    def standardize(self, x_num_raw: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
        """Raw (imputed) numeric values -> the model's numeric input: standardised values, then one is-missing
        column per nullable numeric feature (`missing`: `fill_missing`'s mask; None: nothing missing)."""
        z = ((np.asarray(x_num_raw, dtype=np.float32) - self.mean) / self.std).astype(np.float32)
        if not self._nullable_num.any():
            return z
        ind = np.zeros((len(z), int(self._nullable_num.sum())), dtype=np.float32)
        if missing is not None:
            ind[:] = missing[:, self._nullable_num]
        return np.concatenate([z, ind], 1)

    def _categories(self, values, j: int, f) -> np.ndarray:
        if f.nullable:
            values = np.asarray(values, dtype=object)
            nulls = np.array([v is None for v in values], dtype=bool)
            if nulls.any():
                values = np.where(nulls, f.categories[self._cat_fill[j]], values)
        return _category_indices(values, f.categories or [], f.name)

    def transform_batch(self, batch: dict[str, np.ndarray], with_label: bool = True):
        """A columnar batch (Ray Data numpy batch or table.to_pydict) -> (x_num, x_cat[, y]) arrays."""
        n = len(batch[self.schema.features[0].name])
        x_raw = np.empty((n, len(self.schema.numeric)), dtype=np.float32)
        for j, f in enumerate(self.schema.numeric):
            x_raw[:, j] = _floats(batch[f.name])
        x_cat = np.empty((n, len(self.schema.categorical)), dtype=np.int64)
        for j, f in enumerate(self.schema.categorical):
            x_cat[:, j] = self._categories(batch[f.name], j, f)
        x_num = self.standardize(x_raw, self.fill_missing(x_raw, x_cat))
        if not with_label:
            return x_num, x_cat
        return x_num, x_cat, self.schema.label_indices(np.asarray(batch[self.schema.label]))

    def transform_table(self, table: pa.Table, with_label: bool = True):
        batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        return self.transform_batch(batch, with_label=with_label)

    def raw_numeric(self, table: pa.Table) -> np.ndarray:
        """The numeric columns as raw float32 values, nulls imputed (what the monitor profiles)."""
        x = np.stack([_floats(table.column(f.name).to_numpy(zero_copy_only=False)) for f in self.schema.numeric], 1)
        missing = np.isnan(x) & self._nullable_num
        x[missing] = np.broadcast_to(self._num_fill, x.shape)[missing]
        return x

    def to_dict(self) -> dict:
        out = {"mean": self.mean.tolist(), "std": self.std.tolist()}
        if self.fill:
            out["fill"] = dict(self.fill)
            out["missing_indicators"] = self.schema.missing_indicators
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, schema: DatasetSchema, d: dict) -> Preprocessor:
        ind = d.get("missing_indicators")
        if ind is not None and ind != schema.missing_indicators:
            raise ValueError(f"preprocessor: missing_indicators {ind} do not match the schema's nullable numeric "
                             f"features {schema.missing_indicators}")
        return cls(schema, d["mean"], d["std"], d.get("fill"))
