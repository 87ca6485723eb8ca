"""Paths, bytes and JSON under one registry root on `pyarrow.fs`, so the same registry code writes a
local directory or object storage (`s3://`, `gs://`).

Safety (the lessons of MLflow's path-traversal CVEs, CVE-2023-1177 .. CVE-2024-3848): every model name,
alias and version ref is checked against one ASCII pattern on every read and write path (`check_name`,
`as_version`), and `RegistryFiles.path` refuses any component that could leave the root ('', '.', '..', '/',
'\\', NUL, control characters), so a name such as '../x', '%2e%2e', 'a#b' or '/etc' is a ValueError naming
the field before any filesystem call. On a local filesystem every file is fsynced before the rename that
publishes it and its directory after (pyarrow's LocalFileSystem has no fsync); object stores keep pyarrow's
writes, whose single PUT is atomic there.
"""

from __future__ import annotations

import errno
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

# fullmatch, re.ASCII: '$' would accept a trailing newline, and \w or IGNORECASE would let Unicode look-alikes in
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
NAME_RULE = ("1 to 128 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', '\\', "
             "'%', '#', spaces or other characters)")
_VERSION_RE = re.compile(r"[vV]?([0-9]{1,9})", re.ASCII)
VERSION_RULE = "a positive version number such as 3, '3' or 'v3'"
# a path component that cannot leave its directory on POSIX, Windows or an object store
_BAD_COMPONENT = re.compile(r"[/\\\x00-\x1f\x7f]")


def shown(value: Any) -> str:
    """`repr(value)` cut to 80 characters, for error messages about untrusted input."""
    try:
        r = repr(value)
    except ValueError:  # an int beyond Python's str conversion limit
        return f"<a {type(value).__name__} too large to show>"
    return r if len(r) <= 80 else f"{r[:60]}... ({len(value) if isinstance(value, str) else '?'} characters)"


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


def check_name(kind: str, value: Any) -> str:
    """`value` when it is a valid model or alias name; ValueError naming `kind` and the rule otherwise."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(f"registry: {kind} {shown(value)} is invalid; use {NAME_RULE}")
    return value


def is_name(value: Any) -> bool:
    """Whether `value` is a valid model or alias name (`check_name` without the error)."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def check_component(part: str) -> str:
    """One path component under the root: ValueError for anything that could name another directory."""
    if not part or part in (".", "..") or _BAD_COMPONENT.search(part):
        raise ValueError(f"registry: path component {shown(part)} is invalid (empty, '.', '..', or holds '/', '\\' "
                         f"or a control character); registry names must be {NAME_RULE}")
    return part


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

    @property
    def local(self) -> bool:
        """Whether paths are on a local filesystem (os calls: fsync, link, rename) rather than object storage."""
        return self.fs.type_name == "local"

    def path(self, *parts: str | int) -> str:
        """The root joined with `parts`, each checked (`check_component`) so that no part can leave the root."""
        return "/".join([self.root, *(check_component(str(p)) for p in parts)])

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
        """Write `path` (created or truncated). Local: os.open + os.fsync, so the bytes are on disk before any
        rename publishes them; object stores: one pyarrow output stream (a PUT, visible only when complete)."""
        if self.local:
            _write_synced(path, data)
            return
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def make_dir(self, path: str, recursive: bool = False) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def publish_dir(self, tmp: str, target: str) -> None:
        """Rename the complete directory `tmp` to `target` (local filesystems only): `tmp` is fsynced first
        (`write` synced each file in it), so a crash never publishes a version whose files are missing or empty.
        Raises OSError when `target` exists and is not empty. The caller fsyncs the parent (`fsync_dir`) once
        it knows the rename was its own: an error there must not read as a lost race."""
        assert self.local, "publish_dir needs a local filesystem (object stores cannot rename directories)"
        fsync_dir(tmp)
        os.rename(tmp, target)

    def discard(self, path: str) -> None:
        """Remove the file or directory `path` if it is there, best effort (cleanup after a failed write)."""
        try:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            elif info.type != pafs.FileType.NotFound:
                self.fs.delete_file(path)
        except OSError:
            pass

    def replace(self, path: str, data: bytes) -> None:
        """Write `path` atomically: a temporary name, then a rename over the old file (readers see old or new).
        Local: the temporary file is fsynced before the rename and the directory after, so a crash leaves the
        old or the new bytes, never an empty file. A write that fails removes its temporary file."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            self.write(tmp, data)
            if self.local:
                os.replace(tmp, path)
                fsync_dir(os.path.dirname(path))
            else:
                self.fs.move(tmp, path)
        except BaseException:
            self.discard(tmp)
            raise

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` holding `data` unless it exists: True when this call created it, False when another
        writer had. Readers never see a partial file. On a local filesystem the complete (fsynced) file is
        hard-linked into place (`link` refuses an existing target, atomically) and the directory fsynced.
        pyarrow.fs has no conditional put for object stores, so there it is check-then-write followed by a
        read-back of this writer's bytes: two writers that race inside that window can both succeed (the later
        one's bytes stay), which is the documented limit of alias moves on object storage. A write that fails
        removes its temporary file."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        if self.local:
            try:
                self.write(tmp, data)
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                self.discard(tmp)
            fsync_dir(os.path.dirname(path))
            return True
        if self.exists(path):
            return False
        try:
            self.write(tmp, data)
            self.fs.move(tmp, path)
        except BaseException:
            self.discard(tmp)
            raise
        return self.read(path) == data

    def delete_file(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)


def _write_synced(path: str, data: bytes) -> None:
    """`data` into `path` (created or truncated) and fsynced before the descriptor closes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory, so that the names created, renamed or removed in it survive a crash."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:  # a platform without directory descriptors: nothing to sync
        if err.errno in (errno.EACCES, errno.EISDIR):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # filesystems that cannot sync a directory
            raise
    finally:
        os.close(fd)


def as_version(ref: Any) -> int:
    """3, "3" or "v3" -> 3; ValueError naming the rule for anything else (0, negatives, "3.0", "٣", "3\\n")."""
    if isinstance(ref, bool):
        raise ValueError(f"registry: version {ref!r} is invalid; use {VERSION_RULE}")
    if isinstance(ref, (int, np.integer)):
        v = int(ref)
    else:
        m = _VERSION_RE.fullmatch(ref) if isinstance(ref, str) else None
        if m is None:
            raise ValueError(f"registry: version {shown(ref)} is invalid; use {VERSION_RULE}")
        v = int(m.group(1))
    if not 1 <= v <= 999_999_999:
        raise ValueError(f"registry: version {shown(v)} is out of range; use {VERSION_RULE}")
    return v


def is_version_ref(ref: Any) -> bool:
    """Whether `ref` names a version number (3, "3", "v3") rather than an alias or "latest"."""
    if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
        return True
    return isinstance(ref, str) and _VERSION_RE.fullmatch(ref) is not None


def check_ref(ref: Any) -> int | str:
    """A version ref as `Registry.resolve` takes it: a version number (int), or "latest" / an alias name (str).
    ValueError naming the field and the allowed forms for anything else."""
    if is_version_ref(ref):
        return as_version(ref)
    if isinstance(ref, str) and (ref == "latest" or _NAME_RE.fullmatch(ref)):
        return ref
    raise ValueError(f"registry: version ref {shown(ref)} is invalid; use {VERSION_RULE}, 'latest', or an alias "
                     f"name ({NAME_RULE})")
