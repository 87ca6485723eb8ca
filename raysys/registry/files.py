"""Paths, bytes and JSON under one registry root on `pyarrow.fs`, so the same registry code writes a
local directory or object storage (`s3://`, `gs://`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def utc_now() -> str:
    # time.gmtime rather than datetime.UTC, which needs Python 3.11 (pyproject allows 3.10)
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _json_default(o: Any) -> Any:
    # metrics often hold numpy scalars/arrays or tensors; store them as plain JSON numbers/lists
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def as_dict(obj: Any, what: str) -> dict[str, Any]:
    """`obj` (a dict, a pydantic model or an object with `to_dict()`) as plain JSON values."""
    if obj is None:
        return {}
    if hasattr(obj, "model_dump"):  # pydantic config / schema
        return json.loads(obj.model_dump_json())
    if hasattr(obj, "to_dict"):  # Preprocessor, ReferenceProfile
        return obj.to_dict()
    if isinstance(obj, dict):
        return json.loads(json.dumps(obj, default=_json_default))
    raise ValueError(f"register: {what} must be a dict (or an object with to_dict()/model_dump()), "
                     f"got {type(obj).__name__}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_name(kind: str, value: str) -> str:
    """`value` when it is a valid model or alias name; ValueError naming the rule otherwise."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"registry: {kind} {value!r} is invalid; use letters, digits, '.', '_' or '-' "
                         "(starting with a letter or digit, at most 128 characters)")
    return value


class RegistryFiles:
    """Byte IO under one root. `uri` is a local path (made absolute) or a pyarrow.fs URI."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri
        self.fs, root = pafs.FileSystem.from_uri(uri)
        self.root = root.rstrip("/") or "/"
        # POSIX rename of a directory is atomic and refuses a non-empty target; object stores cannot
        # rename directories at all
        self.atomic_dir_rename = self.fs.type_name == "local"

    def path(self, *parts: str | int) -> str:
        return "/".join([self.root, *(str(p) for p in parts)])

    def uri_of(self, path: str) -> str:
        if self.fs.type_name == "local":
            return path
        return f"{self.uri.split('://', 1)[0]}://{path}"

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_dir(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.Directory

    def is_file(self, paths: list[str]) -> list[bool]:
        return [info.type == pafs.FileType.File for info in self.fs.get_file_info(paths)]

    def children(self, path: str) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))

    def subdirs(self, path: str) -> list[str]:
        return [i.base_name for i in self.children(path) if i.type == pafs.FileType.Directory]

    def files(self, path: str) -> list[str]:
        return [i.base_name for i in self.children(path) if i.type == pafs.FileType.File]

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def replace(self, path: str, data: bytes) -> None:
        """Write `path` atomically: a temporary name, then a rename over the old file (readers see old or new)."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.write(tmp, data)
        self.fs.move(tmp, path)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` holding `data` unless it exists: True when this call created it, False when another
        writer had. Readers never see a partial file. On a local filesystem the complete file is hard-linked
        into place (`link` refuses an existing target, atomically). pyarrow.fs has no conditional put for
        object stores, so there it is check-then-write followed by a read-back of this writer's bytes: two
        writers that race inside that window can both succeed (the later one's bytes stay), which is the
        documented limit of alias moves on object storage."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        if self.fs.type_name == "local":
            self.write(tmp, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.exists(path):
            return False
        self.write(tmp, data)
        self.fs.move(tmp, path)
        return self.read(path) == data

    def delete_file(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)


def as_version(ref: int | str) -> int:
    """3, "3" or "v3" -> 3; ValueError for anything else."""
    if isinstance(ref, bool):
        raise ValueError(f"registry: version {ref!r} is not a number")
    if isinstance(ref, (int, np.integer)):
        return int(ref)
    s = str(ref).strip()
    if s.lower().startswith("v") and s[1:].isdigit():
        s = s[1:]
    if not s.isdigit():
        raise ValueError(f"registry: version {ref!r} is not a number")
    return int(s)


def is_version_ref(ref: int | str) -> bool:
    """Whether `ref` names a version number (3, "3", "v3") rather than an alias."""
    if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
        return True
    s = str(ref).strip()
    return s.isdigit() or (s[:1].lower() == "v" and s[1:].isdigit())
