"""The retrain's dataset: the served model's recent traffic joined with the labels users sent back, split
into train / validation / test (the holdout the candidate is judged on).

The monitor writes the traffic as Parquet directly under `traffic_uri` and the joined feedback labels
(request_id, row, label) under `<traffic_uri>/labels`. Labels come late, so `wait_for_labelled_traffic`
polls. Each row goes to a split by a hash of its request id and row, so a rerun or another reader puts it
in the same split, and the holdout is never trained on.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

log = logging.getLogger("raysys")

SPLIT_ORDER = ("test", "validation", "train")
MIN_SPLIT_ROWS = {"train": 50, "validation": 20, "test": 20}


class RetrainError(ValueError):
    """A retrain that cannot run as asked; the message says why and what to change."""


def _parquet_files(uri: str):
    """(filesystem, the *.parquet files directly under `uri`, oldest first)."""
    import pyarrow.fs as pafs

    if "://" in uri:
        fs, root = pafs.FileSystem.from_uri(uri)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _read_dir(uri: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, files = _parquet_files(uri)
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    return (pa.concat_tables(tables, promote_options="default") if tables else None), len(files)


def read_labelled_traffic(traffic_uri: str, labels_uri: str, schema) -> tuple[Any, dict[str, Any]]:
    """Recent traffic rows that have a label: the schema's features, the label (class index, column
    `schema.label`), request_id and row. Returns (table, counts)."""
    import numpy as np
    import pyarrow as pa

    traffic, n_traffic_files = _read_dir(traffic_uri)
    labels, n_label_files = _read_dir(labels_uri)
    info = {"traffic_uri": traffic_uri, "labels_uri": labels_uri, "traffic_files": n_traffic_files,
            "label_files": n_label_files, "traffic_rows": traffic.num_rows if traffic is not None else 0,
            "label_rows": labels.num_rows if labels is not None else 0}
    if traffic is None or labels is None:
        return None, {**info, "labelled_rows": 0}
    for col in ("request_id", "row"):
        if col not in traffic.column_names:
            raise RetrainError(f"the recent traffic at {traffic_uri} has no {col!r} column, so labels cannot be "
                               f"joined to it; keep request_id out of monitor.traffic_drop_columns")
    names = [f.name for f in schema.features]
    sensitive = [f.name for f in schema.features if f.sensitive]
    if sensitive:
        raise RetrainError(f"features {sensitive} are marked sensitive in the schema, so the recent traffic holds "
                           "only their salted hashes (or nothing: monitor.traffic_sensitive); a model cannot be "
                           "retrained on it. Retrain from a dataset that holds them (`raysys run`)")
    missing = [n for n in names if n not in traffic.column_names]
    if missing:
        raise RetrainError(f"the recent traffic lacks features {missing} (monitor.traffic_drop_columns?); "
                           "a model cannot be retrained without them")
    traffic = traffic.select([*names, "request_id", "row"])
    labels = labels.select(["request_id", "row", "label"]).rename_columns(["request_id", "row", "_label"])
    joined = traffic.join(labels, keys=["request_id", "row"], join_type="inner")
    y = schema.label_indices(np.asarray(joined.column("_label").to_pylist(), dtype=object))
    joined = joined.drop_columns(["_label"]).append_column(schema.label, pa.array(y, type=pa.int64()))
    for f in schema.categorical:  # hashed (monitor.traffic_hash_columns) or unknown categories
        seen = set(joined.column(f.name).to_pylist())
        unknown = sorted(map(str, seen - set(f.categories or [])))
        if unknown:
            raise RetrainError(f"feature {f.name!r} has values outside its categories in the recent traffic "
                               f"({unknown[:3]}...); is it in monitor.traffic_hash_columns?")
    return joined, {**info, "labelled_rows": joined.num_rows}


def wait_for_labelled_traffic(traffic_uri: str, labels_uri: str, schema, min_rows: int, wait_s: float,
                              poll_s: float = 2.0):
    """`read_labelled_traffic`, polled until it has `min_rows` rows or `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    last = -1
    while True:
        table, info = read_labelled_traffic(traffic_uri, labels_uri, schema)
        have = info["labelled_rows"]
        if have >= min_rows:
            return table, info
        if time.monotonic() >= deadline:
            raise RetrainError(
                f"only {have} labelled rows of recent traffic after waiting {wait_s:.0f}s (need --min-labelled-rows "
                f"{min_rows}; {info['traffic_rows']} traffic rows in {info['traffic_files']} files at {traffic_uri}, "
                f"{info['label_rows']} labels at {labels_uri}): send labels to /v1/feedback, or lower "
                "--min-labelled-rows / raise --label-wait-s")
        if have != last:
            log.info("retrain: %d of %d labelled rows so far (%d traffic rows); waiting up to %.0fs more", have,
                     min_rows, info["traffic_rows"], deadline - time.monotonic())
            last = have
        time.sleep(poll_s)


def assign_splits(request_ids: list[str], rows: list[int], holdout: float, val: float, seed: int) -> list[str]:
    """A split per labelled row from a hash of (seed, request id, row): stable across reruns and readers."""
    out = []
    for rid, r in zip(request_ids, rows, strict=True):
        u = zlib.crc32(f"{seed}:{rid}:{r}".encode()) / 2**32
        out.append("test" if u < holdout else "validation" if u < holdout + val else "train")
    return out


def write_dataset(root: Path, schema, recent, *, holdout: float, val: float, seed: int, base=None,
                  provenance: dict[str, Any]) -> dict[str, int]:
    """The raysys dataset layout (schema.json, train/validation/test Parquet) from the labelled recent rows
    (+ `base` rows into train), and `retrain.json` with `provenance`. Returns rows per split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [f.name for f in schema.features] + [schema.label]
    split = np.asarray(assign_splits(recent.column("request_id").to_pylist(), recent.column("row").to_pylist(),
                                     holdout, val, seed))
    data = recent.select(cols)
    counts = {}
    for name in SPLIT_ORDER:
        part = data.filter(pa.array(split == name))
        if name == "train" and base is not None and base.num_rows:
            part = pa.concat_tables([part, base.select(cols).cast(part.schema)])
        counts[name] = part.num_rows
        if part.num_rows < MIN_SPLIT_ROWS[name]:
            raise RetrainError(
                f"{recent.num_rows} labelled rows give {counts.get('test', 0)} holdout / "
                f"{counts.get('validation', 0)} validation / {counts.get('train', '?')} train rows; the {name} "
                f"split needs at least {MIN_SPLIT_ROWS[name]}: raise --min-labelled-rows or change "
                "--holdout-fraction / --val-fraction")
        (root / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(part, root / name / "part-00000.parquet")
    schema.save(root)
    (root / "retrain.json").write_text(json.dumps({**provenance, "split_rows": counts}, indent=2, default=str))
    return counts


def base_rows(loaded, n: int, seed: int):
    """`n` rows of the training split the served version was trained on, when its data root is still there."""
    import numpy as np

    from raysys.data import read_split

    root = ((loaded.config or {}).get("data") or {}).get("root")
    if n <= 0:
        return None
    if not root or not (Path(root) / "train").is_dir():
        log.warning("retrain: --base-rows %d ignored: v%d records no training data root that still exists (%s)", n,
                    loaded.version, root)
        return None
    table = read_split(root, "train")
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, min(n, table.num_rows), replace=False))
    return table.take(idx)
