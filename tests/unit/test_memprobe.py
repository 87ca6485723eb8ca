"""serve.memprobe: the layers of this process's memory move as the memory does (the soak benchmark reads them
inside each replica to tell a leak from an allocator that keeps freed pages)."""

from __future__ import annotations

import pytest

from serve.memprobe import malloc_stats, memory_report

pytestmark = pytest.mark.skipif(malloc_stats() is None, reason="needs glibc >= 2.33 (mallinfo2)")


def test_a_held_allocation_shows_in_rss_and_in_mallocs_in_use_bytes():
    before = memory_report()
    held = bytearray(64 * 1024 * 1024)  # one mmap'd block, touched so that it is resident
    held[::4096] = b"x" * len(held[::4096])
    during = memory_report()
    assert during["malloc_in_use_mb"] - before["malloc_in_use_mb"] >= 60, (before, during)
    assert during["rss_anon_mb"] - before["rss_anon_mb"] >= 60, (before, during)
    del held
    assert memory_report()["malloc_in_use_mb"] - before["malloc_in_use_mb"] < 4


_FREED_BUT_KEPT = """
import json
from serve.memprobe import memory_report
before = memory_report()
# 16 kB blocks freed between small live ones: holes malloc keeps (they cannot fold into the heap's top and be
# returned on their own) until malloc_trim hands their whole pages back to the kernel
pairs = [(bytearray(16 * 1024), bytearray(600)) for _ in range(5000)]
kept_small = [small for _, small in pairs]
del pairs
kept = memory_report()
print(json.dumps({"before": before, "kept": kept, "trimmed": memory_report(trim=True)}))
"""


def test_trim_gives_back_what_was_freed_but_kept_and_python_holds_none_of_it():
    # in a fresh interpreter: in this one, whatever ran before decides where in the heap the blocks land
    import json
    import subprocess
    import sys

    from helpers import REPO

    out = subprocess.run([sys.executable, "-c", _FREED_BUT_KEPT], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    before, kept, trimmed = got["before"], got["kept"], got["trimmed"]
    assert kept["malloc_free_mb"] - before["malloc_free_mb"] >= 40, got
    assert abs(kept["py_blocks"] - before["py_blocks"]) < 20_000, got
    assert trimmed["trimmed_mb"] >= 30, trimmed
    assert set(trimmed) >= {"rss_mb", "rss_file_mb", "malloc_arena_mb", "gc_objects", "threads"}
