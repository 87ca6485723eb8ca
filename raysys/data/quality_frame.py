"""The data quality checks' view of a dataset: every split as numpy arrays, nulls kept visible.

Numeric features are float64 with NaN for a null; categorical features are codes into one vocabulary per
feature shared by all splits (the schema's categories first, then any other value met), -1 for a null. Row
`index` is the row's position in its split (Parquet files in name order), the number a finding lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysys.data.dataset import read_split, split_files
from raysys.data.schema import DatasetSchema
from raysys.data.synthetic import SPLITS


@dataclass
class SplitArrays:
    name: str
    index: np.ndarray  # int64 [n]: row positions in the split
    num: np.ndarray  # float64 [n, n_num], NaN for null
    cat: np.ndarray  # int64 [n, n_cat], -1 for null
    y: np.ndarray  # int64 [n]
    num_rows_total: int  # rows in the split before sampling

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class QualityFrame:
    schema: DatasetSchema
    splits: dict[str, SplitArrays]
    vocab: list[list[str]] = field(default_factory=list)  # per categorical feature: code -> value
    mean: np.ndarray | None = None  # train mean / std per numeric feature (nulls left out)
    std: np.ndarray | None = None

    @property
    def train(self) -> SplitArrays:
        return self.splits["train"]

    def standardized(self, split: str) -> np.ndarray:
        return (self.splits[split].num - self.mean) / self.std


def _numeric(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).cast(pa.float64())
    return col.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN


def _codes(table: pa.Table, name: str, vocab: list[str], lookup: dict[str, int]) -> np.ndarray:
    col = table.column(name)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    values = col.to_pylist()
    for v in set(values) - set(lookup) - {None}:  # values outside the schema's categories: new codes
        lookup[v] = len(vocab)
        vocab.append(v)
    return np.fromiter((-1 if v is None else lookup[v] for v in values), dtype=np.int64, count=len(values))


def _sample(table: pa.Table, max_rows: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    n = table.num_rows
    if n <= max_rows:
        return table, np.arange(n, dtype=np.int64)
    idx = np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False)).astype(np.int64)
    return table.take(pa.array(idx)), idx


def load_frame(root: str | Path, schema: DatasetSchema, *, max_rows: int, seed: int = 0) -> QualityFrame:
    """Read every split (at most `max_rows` rows each, a seeded sample beyond that) into a QualityFrame."""
    vocab = [list(f.categories or []) for f in schema.categorical]
    lookups = [{c: i for i, c in enumerate(v)} for v in vocab]
    splits = {}
    for s, split in enumerate(SPLITS):
        schema.check_table(pq.read_schema(split_files(root, split)[0]), where=f"{split} split")
        table = read_split(root, split, [f.name for f in schema.features] + [schema.label])
        total = table.num_rows
        table, index = _sample(table, max_rows, seed + s)
        label = table.column(schema.label)
        if label.null_count:
            raise ValueError(f"{schema.label}: {label.null_count} rows of the {split} split have no label; "
                             "drop them")
        n_num, n_cat = len(schema.numeric), len(schema.categorical)
        num = np.stack([_numeric(table, f.name) for f in schema.numeric], 1) if n_num else np.zeros((len(index), 0))
        cat = (np.stack([_codes(table, f.name, vocab[j], lookups[j]) for j, f in enumerate(schema.categorical)], 1)
               if n_cat else np.zeros((len(index), 0), dtype=np.int64))
        y = schema.label_indices(label.to_numpy(zero_copy_only=False))
        splits[split] = SplitArrays(split, index, num, cat, y, total)
    frame = QualityFrame(schema, splits, vocab)
    train = splits["train"].num
    with np.errstate(all="ignore"):
        frame.mean = np.nan_to_num(np.nanmean(train, 0)) if len(train) else np.zeros(train.shape[1])
        std = np.nan_to_num(np.nanstd(train, 0)) if len(train) else np.ones(train.shape[1])
    frame.std = np.where(std > 1e-12, std, 1.0)
    return frame


# ----- row keys -----


def _mix(h: np.ndarray, col: np.ndarray) -> np.ndarray:
    """One step of a 64-bit row hash (splitmix64 finaliser of the column, folded into h); wraps on purpose."""
    z = col.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (h * np.uint64(0x100000001B3)) ^ z


def row_keys(num_keys: np.ndarray, cat: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """A uint64 hash per row of integer numeric keys, category codes (and the label when given): rows with
    equal keys are equal (a false match needs a 64-bit collision)."""
    h = np.full(len(cat), np.uint64(0xCBF29CE484222325))
    with np.errstate(over="ignore"):
        for col in [*num_keys.T, *cat.T, *([] if y is None else [y])]:
            h = _mix(h, col.view(np.uint64) if col.dtype == np.int64 else col.astype(np.int64).view(np.uint64))
    return h


def exact_num_keys(num: np.ndarray) -> np.ndarray:
    """Numeric values as int64 bit patterns (every NaN the same, -0.0 == 0.0)."""
    x = np.where(np.isnan(num), np.nan, num + 0.0)
    return np.ascontiguousarray(x, dtype=np.float64).view(np.int64)


def near_num_keys(z: np.ndarray, tolerance: float) -> np.ndarray:
    """Standardized numeric values rounded to `tolerance` (NaN -> its own key)."""
    k = np.round(np.where(np.isnan(z), 0.0, z) / tolerance)
    k = np.clip(k, -(2 ** 62), 2 ** 62).astype(np.int64)
    return np.where(np.isnan(z), np.int64(-(2 ** 63)), k)



@dataclass
class CheckResult:
    """What one check measured: its value (compared with the `quality.<check>` thresholds), one line for
    people, example rows (at most `quality.max_examples`) and the per-split/per-feature details."""

    value: float
    message: str
    examples: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)
