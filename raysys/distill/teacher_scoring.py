"""Scoring rows with the teacher, for `raysys.distill.soft_targets`: in this process (a small set) or by a Ray Data
actor pool (`map_batches` over `TeacherPredictor`, one teacher per actor). Each returns or writes the rows with
one float32 column per class (`_teacher_logit_<j>`) and, for the hint loss, one per hidden unit
(`_teacher_hint_<j>`); the caller owns the directories and their publication.

A set of rows x teacher parameters <= `LOCAL_SCORE_MAX_MACS` (about an MLP's multiply-adds: a second or two of
one core) is scored here: Ray Data's actor pool takes ~10 s to start on a small cluster, far longer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from torch import nn

from raysys.data import DatasetSchema, Preprocessor
from raysys.data.dataset import DRIVER_READ_MAX_BYTES, parquet_bytes, read_blocks
from raysys.distill.kd import HiddenCapture

LOGIT_PREFIX = "_teacher_logit_"
HINT_PREFIX = "_teacher_hint_"
PATH_COLUMN = "path"  # added by read_parquet(include_paths=True), or by read_blocks
SPLIT_COLUMN = "_split"
# rows x teacher parameters (about the multiply-adds of an MLP's forward pass) up to which the teacher scores
# the rows in the calling process: ~1-3 s of one core, against ~10 s for Ray Data's actor pool to start here
LOCAL_SCORE_MAX_MACS = 5e9


class TeacherPredictor:
    """The `map_batches` callable class: one teacher per actor, built once in `__init__`."""

    def __init__(self, teacher_ref: Any, schema_json: str, preprocessor: dict[str, Any], hints: bool,
                 num_threads: int | None = 1, device: str = "cpu"):
        import ray

        # the actor reserves one CPU; more intra-op threads would fight the other actors for the cores
        # (None: the calling process's own setting, for scoring in place)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model: nn.Module = ray.get(teacher_ref) if isinstance(teacher_ref, ray.ObjectRef) else teacher_ref
        self.device = torch.device(device)  # "cuda": the GPU share the actor reserved (distill.gpus_per_trial)
        self.model.eval().to(self.device)
        schema = DatasetSchema.from_json(schema_json)
        self.pre = Preprocessor.from_dict(schema, preprocessor)
        self.hints = hints

    def score(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The teacher's output columns for a batch of raw feature columns: `_teacher_logit_<j>` (and
        `_teacher_hint_<j>` with hints), float32."""
        x_num, x_cat = self.pre.transform_batch(batch, with_label=False)
        xn, xc = torch.from_numpy(x_num).to(self.device), torch.from_numpy(x_cat).to(self.device)
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            if self.hints:
                with HiddenCapture(self.model) as cap:
                    logits = self.model(xn, xc)
                hidden = cap.value.float().cpu().numpy()
                out.update({f"{HINT_PREFIX}{j}": hidden[:, j].copy() for j in range(hidden.shape[1])})
            else:
                logits = self.model(xn, xc)
        logits = logits.float().cpu().numpy()
        return {**{f"{LOGIT_PREFIX}{j}": logits[:, j].copy() for j in range(logits.shape[1])}, **out}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        if PATH_COLUMN in out:  # <root>/<split>/part-*.parquet -> the split, for the partitioned write
            out[SPLIT_COLUMN] = np.array([Path(p).parent.name for p in out.pop(PATH_COLUMN)], dtype=object)
        return {**out, **self.score(batch)}

    def score_table(self, table: pa.Table, batch_size: int) -> pa.Table:
        """`table` with the teacher's output columns appended, scored in this process `batch_size` rows at a
        time (the original columns stay as they are, types and nulls included)."""
        names = [f.name for f in self.pre.schema.features]
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            parts.append(self.score({n: chunk.column(n).to_numpy(zero_copy_only=False) for n in names}))
        for name in parts[0] if parts else ():
            table = table.append_column(name, pa.array(np.concatenate([p[name] for p in parts])))
        return table


def actor_resources(gpus: float) -> dict[str, float]:
    """What each scoring actor reserves: one CPU, and `gpus` of a GPU when > 0."""
    return {"num_cpus": 1, **({"num_gpus": gpus} if gpus else {})}


def score_here(num_rows: int, teacher: nn.Module, files: list[str] = (), *, max_macs: float | None = None) -> bool:
    """Whether scoring `num_rows` rows (from `files`, local Parquet) with `teacher` is small enough to do in
    this process: rows x parameters <= `max_macs` (None: `LOCAL_SCORE_MAX_MACS`) and the files readable here
    (<= DRIVER_READ_MAX_BYTES)."""
    budget = LOCAL_SCORE_MAX_MACS if max_macs is None else max_macs
    params = sum(p.numel() for p in teacher.parameters())
    return num_rows * params <= budget and parquet_bytes(list(files)) <= DRIVER_READ_MAX_BYTES


def predictor_here(teacher: nn.Module, schema: DatasetSchema, preprocessor: Preprocessor, hints: bool
                   ) -> TeacherPredictor:
    """A `TeacherPredictor` over the caller's own teacher, on the device it is on, with this process's threads."""
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    return TeacherPredictor(teacher, schema.to_json(), preprocessor.to_dict(), hints, num_threads=None,
                            device=str(device))


def score_splits_here(files: dict[str, list[str]], tmp: Path, schema: DatasetSchema, preprocessor: Preprocessor,
                      teacher: nn.Module, hints: bool, batch_size: int) -> dict[str, int]:
    """Each split's rows with the teacher's columns, scored in this process, as `tmp/<split>/part-00000.parquet`."""
    predictor = predictor_here(teacher, schema, preprocessor, hints)
    num_rows = {}
    for split, split_paths in files.items():
        table = predictor.score_table(pads.dataset(split_paths, format="parquet").to_table(), batch_size)
        (tmp / split).mkdir(parents=True)
        pq.write_table(table, tmp / split / "part-00000.parquet")
        num_rows[split] = table.num_rows
    return num_rows


def score_splits_with_ray_data(files: dict[str, list[str]], tmp: Path, schema: DatasetSchema,
                               preprocessor: Preprocessor, teacher: nn.Module, hints: bool, batch_size: int,
                               num_actors: int, gpus: float) -> tuple[int, dict[str, int]]:
    """Each split's rows with the teacher's columns, scored by a Ray Data actor pool, under `tmp/<split>/`.
    Returns the actors used and the rows per split."""
    teacher_ref, num_actors = _teacher_on_ray(teacher, num_actors)
    num_rows: dict[str, int] = {}
    names = {f.name for f in schema.features} | {schema.label}
    # all splits in one Ray Data pipeline (one actor pool start, the costly part on a small cluster); rows
    # remember their split through the file path. A feature named like the path column forces one
    # pipeline per split instead.
    one_pipeline = PATH_COLUMN not in names and SPLIT_COLUMN not in names
    groups = [list(files)] if one_pipeline else [[s] for s in files]
    for group in groups:
        group_files = [f for split in group for f in files[split]]
        # at least one block per actor, or a small split leaves all but one actor idle
        ds = _rows(group_files, max(num_actors, len(group_files)), with_paths=one_pipeline)
        scored = _map_teacher(ds, teacher_ref, schema, preprocessor, hints, batch_size, num_actors, gpus)
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
    return num_actors, num_rows


def _teacher_on_ray(teacher: nn.Module, num_actors: int):
    """(the eval-mode teacher in the object store, the actors to use: at most the cluster's CPUs); starts a local
    Ray when none is connected."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray.put(teacher.eval()), min(num_actors, max(1, int(ray.cluster_resources().get("CPU", 1))))


def _map_teacher(ds, teacher_ref, schema: DatasetSchema, preprocessor: Preprocessor, hints: bool, batch_size: int,
                 num_actors: int, gpus: float):
    """`ds` with the teacher's columns, by a pool of `num_actors` `TeacherPredictor` actors."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        TeacherPredictor, batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=num_actors), **actor_resources(gpus),
        fn_constructor_kwargs={"teacher_ref": teacher_ref, "schema_json": schema.to_json(), "hints": hints,
                               "preprocessor": preprocessor.to_dict(), "device": "cuda" if gpus else "cpu"})


def _rows(files: list[str], blocks: int, *, with_paths: bool):
    """A Ray Dataset of the files' rows in at least `blocks` blocks (with a PATH_COLUMN when `with_paths`): read
    here when small (no reader actors to start), else by Ray Data's Parquet reader."""
    import ray.data

    if parquet_bytes(files) <= DRIVER_READ_MAX_BYTES:
        return ray.data.from_arrow(read_blocks(files, min_blocks=blocks, path_column=PATH_COLUMN if with_paths
                                               else None))
    return ray.data.read_parquet(files, include_paths=with_paths, override_num_blocks=blocks)


def score_rows_with_ray_data(rows: pa.Table, tmp: Path, schema: DatasetSchema, preprocessor: Preprocessor,
                             teacher: nn.Module, batch_size: int, num_actors: int, gpus: float) -> int:
    """`rows` with the teacher's logits, scored by a Ray Data actor pool, written under `tmp`; the actors used."""
    import ray.data

    teacher_ref, num_actors = _teacher_on_ray(teacher, num_actors)
    ds = ray.data.from_arrow(rows).repartition(num_actors)
    _map_teacher(ds, teacher_ref, schema, preprocessor, False, batch_size, num_actors, gpus).write_parquet(
        str(tmp.resolve()))
    return num_actors
