"""The deployment's traffic salt: the secret key of the HMAC-SHA256 that hashes identifiers and sensitive columns
in the monitor's stored traffic (`monitor.traffic_hash_columns`, features the schema marks `sensitive`).

A constant salt would let anyone who reads the Parquet files brute-force a low-entropy hashed value (a user id,
an e-mail) and join hashed columns across deployments; a secret per deployment does neither. It must also stay
the same across monitor restarts, or hashed request ids written before a restart stop joining the labels
written after it. Where it comes from, in order:

- `RAYSYS_TRAFFIC_SALT`: the secret itself, in the monitor actor's environment;
- `RAYSYS_TRAFFIC_SALT_FILE`: the first line of this file (a mounted Secret); missing or empty is an error,
  never a silently different salt;
- neither: `<traffic_uri>/_traffic_salt`, generated once (`secrets.token_hex(32)`) and kept there (mode 0600 on a
  local disk, created exclusively and atomically). Whoever can read the traffic directory can read this file:
  set one of the two variables where the traffic lives on shared storage.

The salt is never logged, and never written to snapshots, reports or the Parquet files; the monitor's report
says where it came from (`traffic.salt_from`), never what it is.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import uuid
from collections.abc import Mapping
from typing import Any

from pyarrow import fs as pafs

TRAFFIC_SALT_ENV = "RAYSYS_TRAFFIC_SALT"
TRAFFIC_SALT_FILE_ENV = "RAYSYS_TRAFFIC_SALT_FILE"
SALT_FILE = "_traffic_salt"  # "_": pyarrow datasets skip it; raysys's readers take *.parquet only
MIN_SALT_CHARS = 16

log = logging.getLogger("raysys")


def hash_value(value: Any, salt: str | bytes) -> str:
    """HMAC-SHA256 of `str(value)` keyed by the deployment's salt, as 16 hex characters (64 bits)."""
    key = salt.encode() if isinstance(salt, str) else salt
    return hmac.new(key, str(value).encode("utf-8", "backslashreplace"), hashlib.sha256).hexdigest()[:16]


def _checked(salt: str, where: str) -> str:
    salt = salt.strip()
    if not salt:
        raise ValueError(f"{where}: the traffic salt is empty; set a secret of at least {MIN_SALT_CHARS} characters "
                         "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    if len(salt) < MIN_SALT_CHARS:
        raise ValueError(f"{where}: the traffic salt has {len(salt)} characters; use at least {MIN_SALT_CHARS} "
                         "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return salt


def _read_first_line(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    return lines[0] if lines else ""


def _create_local(path: str, salt: str) -> None:
    """Write `salt` to `path` (0600) unless the file exists: a temp file, then a hard link, which fails when
    another monitor got there first (then its salt is the one used)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(salt + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _create_remote(fs: pafs.FileSystem, path: str, salt: str) -> None:
    """Object storage has no exclusive create: write a temp object and move it unless the salt exists by then
    (the caller reads back what is there, so two racing monitors converge on one salt but for a tiny window)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write((salt + "\n").encode())
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        fs.move(tmp, path)
    else:
        fs.delete_file(tmp)


def load_traffic_salt(fs: pafs.FileSystem, root: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(salt, where it came from) for the traffic under `root` on `fs`. See the module docstring for the order;
    ValueError for a named file that is missing or a salt that is too short."""
    env = os.environ if environ is None else environ
    local = isinstance(fs, pafs.LocalFileSystem)
    if env.get(TRAFFIC_SALT_ENV):
        return _checked(env[TRAFFIC_SALT_ENV], TRAFFIC_SALT_ENV), f"${TRAFFIC_SALT_ENV}"
    named = env.get(TRAFFIC_SALT_FILE_ENV)
    if named:
        path = os.path.expanduser(named)
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline()
        except OSError as e:
            raise ValueError(f"{TRAFFIC_SALT_FILE_ENV}={named}: cannot read the traffic salt file ({e.strerror})") from None
        return _checked(first, f"{TRAFFIC_SALT_FILE_ENV}={named}"), f"${TRAFFIC_SALT_FILE_ENV} ({named})"
    path = f"{root.rstrip('/')}/{SALT_FILE}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        fresh = secrets.token_hex(32)
        if local:
            _create_local(path, fresh)
        else:
            _create_remote(fs, path, fresh)
        log.info("raysys monitor: generated this deployment's traffic salt at %s (set %s or %s to manage it as a "
                 "secret)", path, TRAFFIC_SALT_ENV, TRAFFIC_SALT_FILE_ENV)
    if local and os.stat(path).st_mode & 0o077:
        log.warning("raysys monitor: %s is readable by other users; chmod 600 it", path)
    return _checked(_read_first_line(fs, path), path), path
