"""Bring your own data: any Parquet file or directory plus a label column -> the raysys dataset layout.

String columns become categorical features (their distinct values in the data are the categories),
numeric columns numeric features; the label is rewritten as an index into `schema.classes`. Nulls stay in the
data and mark their column nullable (the Preprocessor imputes them, fitted on train), unless the import is asked
to refuse them. Rows are
split into train/validation/test by a seeded permutation, so the same seed gives the same split.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from raysys.data.schema import DatasetSchema, SchemaError, infer_schema
from raysys.data.synthetic import SPLITS

MISSING_POLICIES = ("impute", "refuse")
# held-out splits below this many rows weaken the monitor's detector calibration (50 rows) and the test figures
SMALL_SPLIT_ROWS = 50


def _nullable_columns(table: pa.Table, label: str, missing: str) -> set[str]:
    """The feature columns holding nulls; SchemaError for a null label, an all-null column, or any null
    when `missing` is "refuse"."""
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing: unknown policy {missing!r}; choose one of {list(MISSING_POLICIES)}")
    out = set()
    for name in table.column_names:
        nulls = table.column(name).null_count
        if not nulls:
            continue
        if name == label:
            raise SchemaError(name, f"{nulls} rows have no label; drop them before import")
        if missing == "refuse":
            raise SchemaError(name, f"{nulls} null values; fill or drop them before import, or let raysys impute "
                                    "them (missing='impute', `raysys data import --missing impute`)")
        if nulls == table.num_rows:
            raise SchemaError(name, "every value is null; drop the column")
        out.add(name)
    return out


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(validation rows, test rows) of an `n`-row table: the fractions rounded down, but at least one row each
    while train keeps at least one; a warning for a held-out split below `SMALL_SPLIT_ROWS` (what it weakens
    is listed on the model card)."""
    if n < 3:
        raise ValueError(f"source: {n} rows; the import needs at least 3 (one each for train, validation and "
                         "test), and a useful model far more")
    n_val, n_test = max(1, int(n * val_fraction)), max(1, int(n * test_fraction))
    while n_val + n_test > n - 1:  # tiny tables: give train a row back, from the larger held-out split
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    for name, rows, flag in (("validation", n_val, "--val-fraction"), ("test", n_test, "--test-fraction")):
        if rows < SMALL_SPLIT_ROWS:
            warnings.warn(f"{name}: {rows} rows of {n}; below {SMALL_SPLIT_ROWS} rows some parts of the loop are "
                          f"reduced or skipped (each named on the model card's limitations); raise {flag} or "
                          "add rows", stacklevel=2)
    return n_val, n_test


def import_parquet(source: str | Path, out: str | Path, *, label: str, val_fraction: float = 0.15,
                   test_fraction: float = 0.15, seed: int = 0, rows_per_shard: int = 250_000,
                   missing: str = "impute") -> DatasetSchema:
    """`missing="impute"` keeps nulls in the data and marks their columns nullable in the schema (the
    Preprocessor imputes them, fitted on train); "refuse" raises SchemaError on the first column with nulls."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise ValueError(f"source: {str(source)!r} does not exist")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction/test_fraction: each must be in (0, 1) and together below 1")
    table = pads.dataset(str(source), format="parquet").to_table()
    if label not in table.column_names:
        raise SchemaError(label, f"label column not found; columns are {table.column_names}")
    nullable = _nullable_columns(table, label, missing)
    categories = {}
    for field in table.schema:
        if field.name != label and (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
                                    or pa.types.is_dictionary(field.type)):
            col = table.column(field.name).cast(pa.string())
            table = table.set_column(table.schema.get_field_index(field.name), field.name, col)
            categories[field.name] = sorted(v for v in pc.unique(col).to_pylist() if v is not None)
    label_values = table.column(label).to_numpy(zero_copy_only=False)
    classes_raw = sorted(set(label_values.tolist()))
    if len(classes_raw) < 2:
        raise SchemaError(label, "needs at least two distinct classes")
    classes = [str(c) for c in classes_raw]
    lookup = {c: i for i, c in enumerate(classes_raw)}
    y = np.fromiter((lookup[v] for v in label_values.tolist()), dtype=np.int64, count=len(label_values))
    table = table.set_column(table.schema.get_field_index(label), label, pa.array(y))
    schema = infer_schema(table.schema, label, categories, classes, nullable)

    n = table.num_rows
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = split_sizes(n, val_fraction, test_fraction)
    parts = {"validation": perm[:n_val], "test": perm[n_val:n_val + n_test], "train": perm[n_val + n_test:]}
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for split in SPLITS:
        idx = np.sort(parts[split])
        if len(idx) == 0:
            raise ValueError(f"{split}: no rows; the dataset has {n} rows, too few for this split")
        d = tmp / split
        d.mkdir(parents=True)
        sub = table.take(pa.array(idx))
        for s, start in enumerate(range(0, sub.num_rows, rows_per_shard)):
            pq.write_table(sub.slice(start, rows_per_shard), d / f"part-{s:05d}.parquet")
    schema.save(tmp)
    if out.exists():
        raise ValueError(f"out: {str(out)!r} already exists; choose a new directory (imports never overwrite)")
    tmp.rename(out)
    return schema
