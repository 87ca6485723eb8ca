"""What a long-running process's resident memory is made of, read from inside it: a replica's RSS growth
is a leak only if something holds the memory. Called through a Serve handle (`StudentEndpoint.memory`, not an
HTTP route: only a client of the Ray cluster reaches it) by benchmarks/soak.py.

The layers, from the outside in:
- `rss_mb`, `rss_anon_mb`, `rss_file_mb`: what the kernel counts (/proc/self/status); file-backed pages are
  shared libraries and mapped files, anonymous ones are the heaps.
- `malloc_in_use_mb` (glibc `mallinfo2`: uordblks + hblkhd): bytes malloc has handed out and not had back,
  from every arena (Python's large objects, torch, Ray's C++ core, gRPC). `malloc_free_mb` (fordblks): freed
  bytes malloc keeps in its arenas; they count in RSS until `malloc_trim` returns them. RSS growing with
  `malloc_in_use_mb` flat is fragmentation or arena growth, not a leak.
- `py_blocks` (`sys.getallocatedblocks`) and `gc_objects`: what Python holds; flat while RSS grows means the
  growth is below Python.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import threading
from pathlib import Path
from typing import Any

_MB = 1024 * 1024


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallinfo2.restype = _Mallinfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None


_LIBC = _libc()


def _status_mb() -> dict[str, float]:
    keys = {"VmRSS:": "rss_mb", "RssAnon:": "rss_anon_mb", "RssFile:": "rss_file_mb"}
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k = line.split(None, 1)[0] if line else ""
            if k in keys:
                out[keys[k]] = round(int(line.split()[1]) / 1024, 2)
    except OSError:
        pass
    return out


def malloc_stats() -> dict[str, float] | None:
    if _LIBC is None:
        return None
    m = _LIBC.mallinfo2()
    return {"malloc_in_use_mb": round((m.uordblks + m.hblkhd) / _MB, 2), "malloc_free_mb": round(m.fordblks / _MB, 2),
            "malloc_arena_mb": round(m.arena / _MB, 2), "malloc_mmap_mb": round(m.hblkhd / _MB, 2)}


def memory_report(trim: bool = False) -> dict[str, Any]:
    """This process's memory by layer (see the module doc). `trim=True`: call glibc's `malloc_trim(0)` first
    and report the RSS it gave back (`trimmed_mb`): memory freed but kept by the allocator, not held by anyone."""
    out: dict[str, Any] = {}
    if trim and _LIBC is not None:
        before = _status_mb().get("rss_mb")
        _LIBC.malloc_trim(0)
        after = _status_mb().get("rss_mb")
        out["trimmed_mb"] = round(before - after, 2) if before is not None and after is not None else None
    out.update(_status_mb())
    out.update(malloc_stats() or {})
    out.update(py_blocks=sys.getallocatedblocks(), gc_objects=len(gc.get_objects()),
               threads=threading.active_count(),
               # what glibc read when this process started (serve.malloc_arena_max puts it in a replica's env)
               malloc_arena_max=os.environ.get("MALLOC_ARENA_MAX"))
    return out
