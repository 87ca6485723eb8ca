"""Soft targets once: the teacher's logits on the transfer set, stored beside the data.

`compute_soft_targets` runs the teacher over the splits (`raysys.distill.teacher_scoring`: by a Ray Data actor
pool, `map_batches` over a fixed pool of actors each holding the teacher, or in this process when the set is
small) and writes the rows back as Parquet, with one float32 column per class (`_teacher_logit_<j>`) and, for
the hint loss, one per hidden unit (`_teacher_hint_<j>`):

    <data root>/soft_targets/<teacher key>/{train,validation}/*.parquet
                                          /meta.json   (teacher key, rows, classes, seconds)

The teacher key is a sha256 over the teacher's weights, so a new teacher never reads an old teacher's
targets and the same teacher computes them only once, however many sweeps follow. The rows carry every
original column, so a reader needs no join (Ray Data does not promise row order across files). Tune
trials get these arrays and never run the teacher: for a sweep of N trials x E epochs that is N*E
teacher passes over the transfer set replaced by one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from torch import nn

from raysys.data import DatasetSchema, Preprocessor
from raysys.data.dataset import parquet_rows, split_files
from raysys.distill.kd import supports_hint
from raysys.distill.teacher_scoring import (
    HINT_PREFIX,
    LOGIT_PREFIX,
    predictor_here,
    score_here,
    score_rows_with_ray_data,
    score_splits_here,
    score_splits_with_ray_data,
)

log = logging.getLogger(__name__)

SOFT_TARGETS_DIR = "soft_targets"
META_FILE = "meta.json"


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp directory into place, replacing an older one. When a concurrent writer (another
    sweep on the same teacher) renamed theirs in first, theirs is kept: it is as good as ours."""
    if final.exists():
        shutil.rmtree(final)
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise


def teacher_key(teacher: nn.Module) -> str:
    """16 hex digits of sha256 over the teacher's class name and weights (name, shape, dtype, bytes)."""
    h = hashlib.sha256(type(teacher).__name__.encode())
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class SoftTargets:
    """Where a teacher's soft targets live and what computing them cost."""

    path: str
    key: str
    splits: list[str]
    num_rows: dict[str, int]
    num_classes: int
    hint_width: int
    seconds: float
    reused: bool
    num_actors: int
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "teacher_key": self.key, "splits": list(self.splits),
                "num_rows": dict(self.num_rows), "num_classes": self.num_classes, "hint_width": self.hint_width,
                "compute_seconds": self.seconds, "reused": self.reused, "num_actors": self.num_actors,
                "transfer": self.meta.get("transfer")}


def compute_soft_targets(data_root: str | Path, schema: DatasetSchema, preprocessor: Preprocessor,
                         teacher: nn.Module, *, splits: tuple[str, ...] = ("train", "validation"),
                         num_actors: int = 2, hints: bool = False, batch_size: int = 4096,
                         force: bool = False, gpus: float = 0.0,
                         local_max_macs: float | None = None) -> SoftTargets:
    """Run the teacher over `splits` with Ray Data (`num_actors` actors, each with `gpus` of a GPU when > 0), store
    the rows with its logits as Parquet under `<data_root>/soft_targets/<teacher key>/`; reuse them when present.
    A small set (`score_here` with `local_max_macs`; 0 always uses Ray Data) is scored in this process instead,
    on the teacher's device, into the same files (`num_actors` 0 in the result).

    Starts a local Ray when none is connected and Ray Data is used. The write goes to a temporary directory
    renamed into place, so a crash never leaves a half-written set that a later sweep would trust.
    """
    if num_actors < 1:
        raise ValueError(f"distill.soft_target_actors: must be >= 1 (got {num_actors})")
    if hints and not supports_hint(teacher):
        raise ValueError(f"hint_weight: the teacher ({type(teacher).__name__}) has no body/head to give hints")
    root = Path(data_root)
    key = teacher_key(teacher) + ("-h" if hints else "")
    final = root / SOFT_TARGETS_DIR / key
    if final.exists() and not force:
        meta = json.loads((final / META_FILE).read_text())
        if set(splits) <= set(meta["splits"]):
            log.info("soft targets: reusing %s (computed in %.1fs)", final, meta["seconds"])
            return SoftTargets(path=str(final), key=key, splits=list(meta["splits"]), num_rows=meta["num_rows"],
                               num_classes=meta["num_classes"], hint_width=meta["hint_width"],
                               seconds=float(meta["seconds"]), reused=True, num_actors=int(meta["num_actors"]),
                               meta=meta)
    files = {split: split_files(root, split) for split in splits}
    every_file = [f for fs in files.values() for f in fs]
    here = score_here(parquet_rows(every_file), teacher, every_file, max_macs=local_max_macs)
    tmp = root / SOFT_TARGETS_DIR / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    was_training = teacher.training
    t0 = time.perf_counter()
    try:
        if here:
            num_actors = 0
            num_rows = score_splits_here(files, tmp, schema, preprocessor, teacher, hints, batch_size)
        else:
            num_actors, num_rows = score_splits_with_ray_data(files, tmp, schema, preprocessor, teacher, hints,
                                                              batch_size, num_actors, gpus)
        seconds = time.perf_counter() - t0
        meta = {"teacher_key": key, "splits": list(splits), "num_rows": num_rows, "num_classes": schema.num_classes,
                "hint_width": int(teacher.head.in_features) if hints else 0, "seconds": round(seconds, 3),
                "num_actors": num_actors, "batch_size": batch_size,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _publish_dir(tmp, final)  # force, or an older set without these splits, is replaced
    finally:
        teacher.train(was_training)  # scoring puts the teacher in eval mode; the caller's mode is restored
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("soft targets: %s rows scored %s in %.1fs -> %s", num_rows,
             f"by {num_actors} Ray Data actors" if num_actors else "in this process", seconds, final)
    return SoftTargets(path=str(final), key=key, splits=list(splits), num_rows=num_rows,
                       num_classes=schema.num_classes, hint_width=meta["hint_width"], seconds=seconds,
                       reused=False, num_actors=num_actors, meta=meta)


def read_soft_targets(targets: SoftTargets | str | Path, split: str, preprocessor: Preprocessor
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """`(x_num, x_cat, y, teacher_logits, teacher_hints or None)` of one split of stored soft targets."""
    path = Path(targets.path if isinstance(targets, SoftTargets) else targets) / split
    files = sorted(str(p) for p in path.glob("*.parquet"))
    if not files:
        raise ValueError(f"soft targets: no Parquet files under {str(path)!r}; compute them first")
    table = pads.dataset(files, format="parquet").to_table()
    x_num, x_cat, y = preprocessor.transform_table(table)

    def stack(prefix: str) -> np.ndarray | None:
        cols = sorted((c for c in table.column_names if c.startswith(prefix)), key=lambda c: int(c[len(prefix):]))
        if not cols:
            return None
        return np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in cols], 1).astype(np.float32)

    logits = stack(LOGIT_PREFIX)
    if logits is None:
        raise ValueError(f"soft targets: {str(path)!r} has no {LOGIT_PREFIX}* columns")
    return x_num, x_cat, y, logits, stack(HINT_PREFIX)


TRANSFER_PREFIX = "transfer-munge"


def compute_transfer_targets(data_root: str | Path, schema: DatasetSchema, preprocessor: Preprocessor,
                             teacher: nn.Module, num_rows: int, *, seed: int = 0, num_actors: int = 2,
                             batch_size: int = 4096, force: bool = False, gpus: float = 0.0,
                             local_max_macs: float | None = None) -> tuple[str, float, bool]:
    """Unlabeled MUNGE transfer rows (raysys.distill.transfer) scored by the teacher with Ray Data, or in this
    process when few (`score_here`), like `compute_soft_targets`, and stored beside them as
    `<data_root>/soft_targets/<teacher key>-transfer-munge-<num_rows>-s<seed>/*.parquet`.

    Returns `(path, seconds, reused)`. The rows are made from the training split only, so no validation
    or test row leaks into the student's inputs.
    """
    from raysys.data import read_split
    from raysys.distill.transfer import munge

    if num_rows < 1:
        raise ValueError(f"distill.transfer_multiplier: gives {num_rows} transfer rows; need >= 1")
    root = Path(data_root)
    # a sibling of the teacher's soft-target dir, never inside it: that dir's presence means "complete"
    final = root / SOFT_TARGETS_DIR / f"{teacher_key(teacher)}-{TRANSFER_PREFIX}-{num_rows}-s{seed}"
    if final.exists() and not force:
        meta = json.loads((final / META_FILE).read_text())
        log.info("transfer rows: reusing %s", final)
        return str(final), float(meta["seconds"]), True
    here = score_here(num_rows, teacher, max_macs=local_max_macs)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    t0 = time.perf_counter()
    rows = munge(read_split(root, "train", [f.name for f in schema.features]), schema, preprocessor, num_rows,
                 seed=seed)
    was_training = teacher.training
    try:
        if here:
            num_actors = 0
            tmp.mkdir(parents=True)
            pq.write_table(predictor_here(teacher, schema, preprocessor, False).score_table(rows, batch_size),
                           tmp / "part-00000.parquet")
        else:
            num_actors = score_rows_with_ray_data(rows, tmp, schema, preprocessor, teacher, batch_size, num_actors,
                                                  gpus)
        seconds = time.perf_counter() - t0
        (tmp / META_FILE).write_text(json.dumps({"num_rows": num_rows, "seed": seed, "method": "munge",
                                                 "seconds": round(seconds, 3), "num_actors": num_actors}))
        _publish_dir(tmp, final)
    finally:
        teacher.train(was_training)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("transfer rows: %d MUNGE rows scored %s in %.1fs -> %s", num_rows,
             f"by {num_actors} Ray Data actors" if num_actors else "in this process", seconds, final)
    return str(final), seconds, False


def read_transfer_targets(path: str | Path, preprocessor: Preprocessor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(x_num, x_cat, teacher_logits)` of stored transfer rows (no labels)."""
    files = sorted(str(p) for p in Path(path).glob("*.parquet"))
    if not files:
        raise ValueError(f"transfer rows: no Parquet files under {str(path)!r}; compute them first")
    table = pads.dataset(files, format="parquet").to_table()
    x_num, x_cat = preprocessor.transform_table(table, with_label=False)
    cols = sorted((c for c in table.column_names if c.startswith(LOGIT_PREFIX)), key=lambda c: int(c[len(LOGIT_PREFIX):]))
    if not cols:
        raise ValueError(f"transfer rows: {str(path)!r} has no {LOGIT_PREFIX}* columns")
    logits = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in cols], 1).astype(np.float32)
    return x_num, x_cat, logits
