"""Monitor persistence on `pyarrow.fs` (a local dir or object storage): state snapshots (JSON + npz, never
pickle, written atomically), and recent traffic with its joined labels as rotated, bounded Parquet files
(what a retrain job trains and judges the candidate on). Identifiers and sensitive columns in the traffic are
hashed with the deployment's secret salt (`raysys.monitor.salt`)."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from raysys.monitor.salt import hash_value, load_traffic_salt

log = logging.getLogger("raysys")

LABELS_DIR = "labels"


def labels_uri(traffic_uri: str) -> str:
    """Where the monitor writes the joined feedback labels: `<traffic_uri>/labels` (request_id, row, label);
    the traffic files themselves sit directly under `traffic_uri`."""
    return f"{traffic_uri.rstrip('/')}/{LABELS_DIR}"


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        import os

        uri = os.path.abspath(os.path.expanduser(uri))
        local = pafs.LocalFileSystem()
        return local, uri
    return pafs.FileSystem.from_uri(uri)


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


class SnapshotStore:
    """`<uri>/<key>/state.json` + `<uri>/<key>/arrays.npz`."""

    def __init__(self, uri: str, key: str):
        self.fs, root = _fs(uri)
        self.dir = f"{root.rstrip('/')}/{key}"
        self.fs.create_dir(self.dir, recursive=True)

    def save(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        # arrays first: a state.json always points at complete arrays of its own snapshot
        token = uuid.uuid4().hex[:8]
        _write_atomic(self.fs, f"{self.dir}/arrays-{token}.npz", buf.getvalue())
        old = self._arrays_name()
        _write_atomic(self.fs, f"{self.dir}/state.json", json.dumps({**state, "arrays": f"arrays-{token}.npz"}).encode())
        if old and old != f"arrays-{token}.npz":
            try:
                self.fs.delete_file(f"{self.dir}/{old}")
            except OSError:
                pass

    def _arrays_name(self) -> str | None:
        st = self._read_state()
        return st.get("arrays") if st else None

    def _read_state(self) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(f"{self.dir}/state.json") as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def load(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        st = self._read_state()
        if not st:
            return None
        try:
            with self.fs.open_input_stream(f"{self.dir}/{st['arrays']}") as f:
                with np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
        except (FileNotFoundError, OSError, KeyError, ValueError):
            return None
        return st, arrays


class TrafficWriter:
    """Recent traffic as Parquet: rows buffered in memory, written `rows_per_file` at a time to
    `<uri>/part-<ms>-<id>.parquet`; only the newest `max_files` files are kept. Columns named in
    `drop_columns` are never written; those in `hash_columns` are written as `hash_value(v, salt)` (HMAC-SHA256
    keyed by the deployment's secret salt, 16 hex characters): hashing needs a salt, there is no default one."""

    def __init__(self, uri: str, *, rows_per_file: int, max_files: int, drop_columns=(), hash_columns=(),
                 salt: str | bytes | None = None):
        self.fs, self.root = _fs(uri)
        self.fs.create_dir(self.root, recursive=True)
        self.rows_per_file, self.max_files = int(rows_per_file), int(max_files)
        self.drop, self.hash = set(drop_columns), set(hash_columns)
        self._salt = salt
        self._parts: list[pa.Table] = []
        self.rows_buffered = 0
        self.files_written = 0
        self.rows_written = 0

    def __repr__(self) -> str:  # never the salt
        return f"TrafficWriter({self.root!r}, drop={sorted(self.drop)}, hash={sorted(self.hash)})"

    def add(self, columns: dict[str, Any], *, drop=(), hash=()) -> None:  # noqa: A002 (mirrors hash_columns)
        """Buffer a table of columns; `drop` and `hash` add to the writer's own drop/hash columns for these."""
        cols = {}
        for k, v in columns.items():
            if k in self.drop or k in drop:
                continue
            if k in self.hash or k in hash:
                if not self._salt:
                    raise ValueError(f"TrafficWriter: column {k!r} is to be hashed but the writer has no salt")
                v = [hash_value(x, self._salt) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
            cols[k] = v
        table = pa.table(cols)
        self._parts.append(table)
        self.rows_buffered += table.num_rows
        if self.rows_buffered >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        table = pa.concat_tables(self._parts, promote_options="default")
        self._parts, self.rows_buffered = [], 0
        for lo in range(0, table.num_rows, self.rows_per_file):
            part = table.slice(lo, self.rows_per_file)
            buf = pa.BufferOutputStream()
            pq.write_table(part, buf)
            name = f"{self.root}/part-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:6]}.parquet"
            _write_atomic(self.fs, name, buf.getvalue().to_pybytes())
            self.files_written += 1
            self.rows_written += part.num_rows
        self._rotate()

    def files(self) -> list[str]:
        sel = pafs.FileSelector(self.root, allow_not_found=True)
        return sorted(i.path for i in self.fs.get_file_info(sel) if i.path.endswith(".parquet"))

    def _rotate(self) -> None:
        files = self.files()
        for old in files[:max(0, len(files) - self.max_files)]:
            try:
                self.fs.delete_file(old)
            except OSError:
                pass

    def stats(self) -> dict[str, Any]:
        return {"uri": self.root, "files_written": self.files_written, "rows_written": self.rows_written,
                "rows_buffered": self.rows_buffered, "files_kept": len(self.files())}


class RecentTraffic:
    """The monitor's recent traffic under `traffic_uri` and the labels joined to it under
    `<traffic_uri>/labels` (request_id, row, label), with the same rotation and PII rules, and one salt (so
    hashed request ids still join). Features the schema marks `sensitive` are hashed (`traffic_sensitive:
    hash`) or dropped (`drop`), never written raw. Written every `flush_interval_s` (or at once,
    `flush(force=True)`); storage trouble is logged, never raised into ingest.
    """

    def __init__(self, cfg, clock: Callable[[], float], environ=None):
        fs, root = _fs(cfg.traffic_uri)
        fs.create_dir(root, recursive=True)
        salt, self.salt_from = load_traffic_salt(fs, root, environ)
        opts = dict(rows_per_file=cfg.traffic_rows_per_file, max_files=cfg.traffic_max_files,
                    drop_columns=cfg.traffic_drop_columns, hash_columns=cfg.traffic_hash_columns, salt=salt)
        self.traffic = TrafficWriter(cfg.traffic_uri, **opts)
        self.labels = TrafficWriter(labels_uri(self.traffic.root), **opts)
        self.sensitive_mode = cfg.traffic_sensitive
        self.sensitive: frozenset[str] = frozenset()  # the served schema's sensitive features (Monitor.set_profile)
        self.flush_interval_s = cfg.traffic_flush_interval_s
        self._clock = clock
        self._last_flush = clock()
        self._pending_labels: list[tuple] = []

    def add_rows(self, profile, batch, request_ids: list | None, rows_per_request: list[int] | None) -> None:
        """A checked `RecordBatch` as columns: time, model version, request id and row (the label join),
        the raw feature values, the predicted class and its confidence."""
        n = batch.n
        cols: dict[str, Any] = {"ts": np.full(n, time.time()), "model_version": [batch.key] * n}
        if request_ids:
            cols["request_id"] = [str(r) for r, k in zip(request_ids, rows_per_request) for _ in range(k)]
            cols["row"] = np.asarray([i for k in rows_per_request for i in range(k)], dtype=np.int64)
        for j, f in enumerate(profile.numeric):
            cols[f.name] = batch.x_num[:, j]
        for j, f in enumerate(profile.categorical):
            cols[f.name] = np.asarray(f.categories, dtype=object)[batch.x_cat[:, j]].tolist()
        cls = np.asarray(list(profile.classes) + [None], dtype=object)
        cols["prediction"] = cls[batch.pred].tolist()
        if batch.proba is not None:
            cols["confidence"] = batch.proba.max(1)
        protect = {"drop": self.sensitive} if self.sensitive_mode == "drop" else {"hash": self.sensitive}
        self.traffic.add(cols, **protect)

    def stats(self) -> dict[str, Any]:
        """The traffic writer's figures, the sensitive columns and where the salt came from (never the salt)."""
        return {**self.traffic.stats(), "sensitive_columns": sorted(self.sensitive),
                "sensitive_stored_as": self.sensitive_mode, "salt_from": self.salt_from}

    def add_labels(self, request_id: str, preds, labels: list[int], version) -> None:
        now = time.time()
        self._pending_labels.extend((now, request_id, i, y, p, version) for i, (p, y) in enumerate(zip(preds, labels)))

    def write_labels(self, classes: list[str]) -> None:
        """Hand the labels joined since the last call to the labels writer (one table per call)."""
        if not self._pending_labels:
            return
        rows, self._pending_labels = self._pending_labels, []
        cls = np.asarray(classes, dtype=object)
        ts, rid, row, label, pred, version = zip(*rows)
        try:  # the writer writes a file when it has rows_per_file rows: storage trouble must not lose the join
            self.labels.add({
                "ts": np.asarray(ts), "request_id": list(rid), "row": np.asarray(row, dtype=np.int64),
                "label": cls[np.asarray(label, dtype=np.int64)].tolist(),
                "prediction": [cls[p] if 0 <= p < len(cls) else None for p in pred],
                "model_version": [str(v) for v in version]})
        except Exception as e:
            log.warning("raysys monitor: writing joined labels failed: %s", e)

    def flush(self, classes: list[str], force: bool = False) -> None:
        """Write the buffered traffic and labels when `flush_interval_s` has passed (or now, `force`)."""
        if not force and self._clock() - self._last_flush < self.flush_interval_s:
            return
        self._last_flush = self._clock()
        try:
            self.write_labels(classes)
            self.traffic.flush()
            self.labels.flush()
        except Exception as e:
            log.warning("raysys monitor: writing recent traffic/labels failed: %s", e)
