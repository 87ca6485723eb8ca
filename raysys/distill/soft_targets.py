"""Soft targets once: the teacher's logits on the transfer set, computed with Ray Data batch inference.

`compute_soft_targets` reads a split's Parquet files with `ray.data.read_parquet`, runs the teacher in
`map_batches` over a fixed pool of actors (`compute=ActorPoolStrategy(size=n)`: each actor loads the
teacher once and scores many batches) and writes the rows back as Parquet beside the data, with one
float32 column per class (`_teacher_logit_<j>`) and, for the hint loss, one per hidden unit
(`_teacher_hint_<j>`):

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
import torch
from torch import nn

from raysys.data import DatasetSchema, Preprocessor
from raysys.data.dataset import DRIVER_READ_MAX_BYTES, parquet_bytes, read_blocks, split_files
from raysys.distill.kd import HiddenCapture, supports_hint

log = logging.getLogger(__name__)

SOFT_TARGETS_DIR = "soft_targets"
LOGIT_PREFIX = "_teacher_logit_"
HINT_PREFIX = "_teacher_hint_"
META_FILE = "meta.json"
PATH_COLUMN = "path"  # added by read_parquet(include_paths=True), or by read_blocks
SPLIT_COLUMN = "_split"


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


class TeacherPredictor:
    """The `map_batches` callable class: one teacher per actor, built once in `__init__`."""

    def __init__(self, teacher_ref: Any, schema_json: str, preprocessor: dict[str, Any], hints: bool,
                 num_threads: int = 1, device: str = "cpu"):
        import ray

        # the actor reserves one CPU; more intra-op threads would fight the other actors for the cores
        torch.set_num_threads(num_threads)
        self.model: nn.Module = ray.get(teacher_ref) if isinstance(teacher_ref, ray.ObjectRef) else teacher_ref
        self.device = torch.device(device)  # "cuda": the GPU share the actor reserved (distill.gpus_per_trial)
        self.model.eval().to(self.device)
        schema = DatasetSchema.from_json(schema_json)
        self.pre = Preprocessor.from_dict(schema, preprocessor)
        self.hints = hints

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x_num, x_cat = self.pre.transform_batch(batch, with_label=False)
        xn, xc = torch.from_numpy(x_num).to(self.device), torch.from_numpy(x_cat).to(self.device)
        out = dict(batch)
        if PATH_COLUMN in out:  # <root>/<split>/part-*.parquet -> the split, for the partitioned write
            out[SPLIT_COLUMN] = np.array([Path(p).parent.name for p in out.pop(PATH_COLUMN)], dtype=object)
        with torch.inference_mode():
            if self.hints:
                with HiddenCapture(self.model) as cap:
                    logits = self.model(xn, xc)
                hidden = cap.value.float().cpu().numpy()
                for j in range(hidden.shape[1]):
                    out[f"{HINT_PREFIX}{j}"] = hidden[:, j].copy()
            else:
                logits = self.model(xn, xc)
        logits = logits.float().cpu().numpy()
        for j in range(logits.shape[1]):
            out[f"{LOGIT_PREFIX}{j}"] = logits[:, j].copy()
        return out


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


def _actor_resources(gpus: float) -> dict[str, float]:
    """What each scoring actor reserves: one CPU, and `gpus` of a GPU when > 0."""
    return {"num_cpus": 1, **({"num_gpus": gpus} if gpus else {})}


def _ray_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def compute_soft_targets(data_root: str | Path, schema: DatasetSchema, preprocessor: Preprocessor,
                         teacher: nn.Module, *, splits: tuple[str, ...] = ("train", "validation"),
                         num_actors: int = 2, hints: bool = False, batch_size: int = 4096,
                         force: bool = False, gpus: float = 0.0) -> SoftTargets:
    """Run the teacher over `splits` with Ray Data (`num_actors` actors, each with `gpus` of a GPU when > 0), store
    the rows with its logits as Parquet under `<data_root>/soft_targets/<teacher key>/`; reuse them when present.

    Starts a local Ray when none is connected. The write goes to a temporary directory renamed into
    place, so a crash never leaves a half-written set that a later sweep would trust.
    """
    import ray
    from ray.data import ActorPoolStrategy

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
    if not ray.is_initialized():
        ray.init()
    num_actors = min(num_actors, _ray_cpus())
    tmp = root / SOFT_TARGETS_DIR / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    was_training = teacher.training
    t0 = time.perf_counter()
    teacher_ref = ray.put(teacher.eval())  # the actors get an eval-mode copy; the caller's mode is restored
    teacher.train(was_training)
    num_rows: dict[str, int] = {}
    names = {f.name for f in schema.features} | {schema.label}
    # all splits in one Ray Data pipeline (one actor pool start, the costly part on a small cluster); rows
    # remember their split through the file path. A feature named like the path column forces one
    # pipeline per split instead.
    one_pipeline = PATH_COLUMN not in names and SPLIT_COLUMN not in names
    groups = [list(splits)] if one_pipeline else [[s] for s in splits]
    try:
        for group in groups:
            files = [f for split in group for f in split_files(root, split)]
            # at least one block per actor, or a small split leaves all but one actor idle
            ds = _rows(files, max(num_actors, len(files)), with_paths=one_pipeline)
            scored = ds.map_batches(
                TeacherPredictor, batch_size=batch_size, batch_format="numpy",
                compute=ActorPoolStrategy(size=num_actors), **_actor_resources(gpus),
                fn_constructor_kwargs={"teacher_ref": teacher_ref, "schema_json": schema.to_json(), "hints": hints,
                                       "preprocessor": preprocessor.to_dict(), "device": "cuda" if gpus else "cpu"})
            if not one_pipeline:
                scored.write_parquet(str((tmp / group[0]).resolve()))
                num_rows[group[0]] = pads.dataset(str(tmp / group[0]), format="parquet").count_rows()
                continue
            out = (tmp / "_by_split").resolve()
            scored.write_parquet(str(out), partition_cols=[SPLIT_COLUMN])
            for split in group:
                (out / f"{SPLIT_COLUMN}={split}").rename(tmp / split)
                num_rows[split] = pads.dataset(str(tmp / split), format="parquet").count_rows()
            shutil.rmtree(out)
        seconds = time.perf_counter() - t0
        meta = {"teacher_key": key, "splits": list(splits), "num_rows": num_rows, "num_classes": schema.num_classes,
                "hint_width": int(teacher.head.in_features) if hints else 0, "seconds": round(seconds, 3),
                "num_actors": num_actors, "batch_size": batch_size,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _publish_dir(tmp, final)  # force, or an older set without these splits, is replaced
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("soft targets: %s rows scored by %d Ray Data actors in %.1fs -> %s", num_rows, num_actors, seconds,
             final)
    return SoftTargets(path=str(final), key=key, splits=list(splits), num_rows=num_rows,
                       num_classes=schema.num_classes, hint_width=meta["hint_width"], seconds=seconds,
                       reused=False, num_actors=num_actors, meta=meta)


def _rows(files: list[str], blocks: int, *, with_paths: bool):
    """A Ray Dataset of the files' rows in at least `blocks` blocks (with a PATH_COLUMN when `with_paths`): read
    here when small (no reader actors to start), else by Ray Data's Parquet reader."""
    import ray.data

    if parquet_bytes(files) <= DRIVER_READ_MAX_BYTES:
        return ray.data.from_arrow(read_blocks(files, min_blocks=blocks, path_column=PATH_COLUMN if with_paths
                                               else None))
    return ray.data.read_parquet(files, include_paths=with_paths, override_num_blocks=blocks)


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
                             batch_size: int = 4096, force: bool = False, gpus: float = 0.0) -> tuple[str, float, bool]:
    """Unlabeled MUNGE transfer rows (raysys.distill.transfer) scored by the teacher with Ray Data, like
    `compute_soft_targets`, and stored beside them as
    `<data_root>/soft_targets/<teacher key>-transfer-munge-<num_rows>-s<seed>/*.parquet`.

    Returns `(path, seconds, reused)`. The rows are made from the training split only, so no validation
    or test row leaks into the student's inputs.
    """
    import ray
    from ray.data import ActorPoolStrategy

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
    if not ray.is_initialized():
        ray.init()
    num_actors = min(num_actors, _ray_cpus())
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    t0 = time.perf_counter()
    rows = munge(read_split(root, "train", [f.name for f in schema.features]), schema, preprocessor, num_rows,
                 seed=seed)
    was_training = teacher.training
    teacher_ref = ray.put(teacher.eval())
    teacher.train(was_training)
    try:
        ds = ray.data.from_arrow(rows).repartition(num_actors)
        ds.map_batches(
            TeacherPredictor, batch_size=batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(size=num_actors), **_actor_resources(gpus),
            fn_constructor_kwargs={"teacher_ref": teacher_ref, "schema_json": schema.to_json(),
                                   "preprocessor": preprocessor.to_dict(), "hints": False,
                                   "device": "cuda" if gpus else "cpu"},
        ).write_parquet(str(tmp.resolve()))
        seconds = time.perf_counter() - t0
        (tmp / META_FILE).write_text(json.dumps({"num_rows": num_rows, "seed": seed, "method": "munge",
                                                 "seconds": round(seconds, 3), "num_actors": num_actors}))
        _publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("transfer rows: %d MUNGE rows scored by %d Ray Data actors in %.1fs -> %s", num_rows, num_actors,
             seconds, final)
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
