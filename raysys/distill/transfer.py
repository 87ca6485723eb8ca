"""Unlabeled transfer rows for distillation: MUNGE (Bucila, Caruana and Niculescu-Mizil, 2006, "Model
compression").

A small student learns the teacher's function better from more inputs than the labeled split holds, and
the teacher labels inputs for free: its logits are the student's soft targets whether or not a row has a
label. Tabular data rarely comes with a pool of unlabeled rows, so MUNGE makes them from the training
split: each new row starts from a random training row `e` and its nearest neighbour `e'` (Euclidean over
standardised numeric features and one-hot categories), then, attribute by attribute with probability
`swap_prob`, takes a numeric value from `Normal(e'_a, |e_a - e'_a| / spread)` or the neighbour's category.
The rows stay near the data (interpolating between close neighbours), without labels. Rows are made in
the raw feature space (the training split's own columns), so the teacher scores them through the same
preprocessing as every other row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raysys.data import DatasetSchema, Preprocessor

# neighbour search is all-pairs over at most this many candidate rows (chunked, float32): a few seconds
# for 20k rows; larger splits search a random subset (the neighbour only sets the perturbation's scale)
MAX_NEIGHBOUR_POOL = 20_000


def _features(schema: DatasetSchema, preprocessor: Preprocessor, table: pa.Table) -> np.ndarray:
    """Standardised numeric features and one-hot categories: the space neighbours are found in."""
    x_num, x_cat = preprocessor.transform_batch({c: table.column(c).to_numpy(zero_copy_only=False)
                                                 for c in table.column_names}, with_label=False)
    parts = [x_num.astype(np.float32)]
    for j, card in enumerate(schema.cardinalities):
        parts.append(np.eye(card, dtype=np.float32)[x_cat[:, j]])
    return np.concatenate(parts, axis=1) if parts else np.zeros((table.num_rows, 0), np.float32)


def nearest_neighbours(points: np.ndarray, pool: np.ndarray, *, exclude_self: bool, chunk: int = 2048
                       ) -> np.ndarray:
    """Index into `pool` of each point's nearest pool row (Euclidean); with `exclude_self`, `points` must
    be `pool` itself and a row is not its own neighbour."""
    p, q = torch.from_numpy(np.ascontiguousarray(points)), torch.from_numpy(np.ascontiguousarray(pool))
    out = np.empty(len(p), dtype=np.int64)
    for i in range(0, len(p), chunk):
        d = torch.cdist(p[i:i + chunk], q)
        if exclude_self:
            rows = torch.arange(i, min(i + chunk, len(p)))
            d[rows - i, rows] = float("inf")
        out[i:i + chunk] = d.argmin(1).numpy()
    return out


def munge(table: pa.Table, schema: DatasetSchema, preprocessor: Preprocessor, num_rows: int, *,
          swap_prob: float = 0.5, spread: float = 1.0, seed: int = 0) -> pa.Table:
    """`num_rows` unlabeled MUNGE rows made from `table` (raw feature columns, as in the Parquet splits).

    Returns a table with the schema's feature columns only (no label). Deterministic in `seed`.
    """
    if num_rows < 0:
        raise ValueError(f"distill.num_transfer_rows: must be >= 0 (got {num_rows})")
    if not 0.0 <= swap_prob <= 1.0:
        raise ValueError(f"swap_prob: must be in [0, 1] (got {swap_prob})")
    if not spread > 0:
        raise ValueError(f"spread: must be > 0 (got {spread})")
    n = table.num_rows
    if n < 2:
        raise ValueError(f"munge: needs at least 2 training rows to find neighbours (got {n})")
    rng = np.random.default_rng(seed)
    feats = _features(schema, preprocessor, table)
    if n <= MAX_NEIGHBOUR_POOL:
        pool_idx = np.arange(n)
    else:
        pool_idx = np.sort(rng.choice(n, MAX_NEIGHBOUR_POOL, replace=False))
    src = rng.integers(0, n, num_rows)
    # a row's neighbour: search the pool, never returning the row itself
    uniq, inv = np.unique(src, return_inverse=True)
    if n <= MAX_NEIGHBOUR_POOL:
        nn_all = nearest_neighbours(feats, feats, exclude_self=True)
        nbr = nn_all[src]
    else:
        pool = feats[pool_idx]
        d_idx = nearest_neighbours(feats[uniq], pool, exclude_self=False)
        nbr_u = pool_idx[d_idx]
        same = nbr_u == uniq  # a source row that is in the pool found itself: take a random other row
        nbr_u[same] = (uniq[same] + rng.integers(1, n, int(same.sum()))) % n
        nbr = nbr_u[inv]
    cols: dict[str, pa.Array] = {}
    for f in schema.numeric:
        v = table.column(f.name).to_numpy(zero_copy_only=False).astype(np.float64)
        a, b = v[src], v[nbr]
        swap = rng.random(num_rows) < swap_prob
        noise = rng.normal(0.0, 1.0, num_rows) * np.abs(a - b) / spread
        cols[f.name] = pa.array(np.where(swap, b + noise, a), type=table.schema.field(f.name).type
                                if pa.types.is_floating(table.schema.field(f.name).type) else pa.float64())
    for f in schema.categorical:
        col = table.column(f.name).combine_chunks()
        swap = rng.random(num_rows) < swap_prob
        cols[f.name] = col.take(pa.array(np.where(swap, nbr, src)))
    return pa.table(cols)


def munge_arrays(table: pa.Table, schema: DatasetSchema, preprocessor: Preprocessor, num_rows: int,
                 **kw) -> tuple[np.ndarray, np.ndarray]:
    """`munge` then the preprocessing: `(x_num, x_cat)` ready for a student or `predict_logits`."""
    rows = munge(table, schema, preprocessor, num_rows, **kw)
    return preprocessor.transform_batch({c: rows.column(c).to_numpy(zero_copy_only=False)
                                         for c in rows.column_names}, with_label=False)
