"""Monitor persistence on `pyarrow.fs` (a local dir or object storage): state snapshots (JSON + npz, never
pickle, written atomically) and recent traffic as rotated, bounded Parquet files."""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs


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


def hash_value(value: Any, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:16]


class TrafficWriter:
    """Recent traffic as Parquet: rows buffered in memory, written `rows_per_file` at a time to
    `<uri>/part-<ms>-<id>.parquet`; only the newest `max_files` files are kept. Columns named in
    `drop_columns` are never written; those in `hash_columns` are written as a salted sha256 prefix."""

    def __init__(self, uri: str, *, rows_per_file: int, max_files: int, drop_columns=(), hash_columns=(),
                 salt: str = "raysys"):
        self.fs, self.root = _fs(uri)
        self.fs.create_dir(self.root, recursive=True)
        self.rows_per_file, self.max_files = int(rows_per_file), int(max_files)
        self.drop, self.hash, self.salt = set(drop_columns), set(hash_columns), salt
        self._parts: list[pa.Table] = []
        self.rows_buffered = 0
        self.files_written = 0
        self.rows_written = 0

    def add(self, columns: dict[str, Any]) -> None:
        cols = {}
        for k, v in columns.items():
            if k in self.drop:
                continue
            if k in self.hash:
                v = [hash_value(x, self.salt) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
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
