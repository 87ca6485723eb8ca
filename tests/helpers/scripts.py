"""Running a benchmark (or another) script as a user runs it (its own process and process group, stopped whole when it
overruns) and reading the JSON object of its last stdout line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_benchmark(name: str, *args: str, timeout_s: float) -> dict:
    return run_script(BENCHMARKS / name, *args, timeout_s=timeout_s)


def run_script(path: Path, *args: str, timeout_s: float, expect_exit: int | None = None) -> dict:
    """The JSON object of `path`'s last stdout line (run with this interpreter); `expect_exit`: its exit code
    must be this one."""
    proc = subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:  # past its time: the script and every Ray process it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    name = Path(path).name
    assert expect_exit is None or proc.returncode == expect_exit, \
        f"{name} exited {proc.returncode}; stderr:\n{stderr[-4000:]}"
    lines = stdout.strip().splitlines()
    assert lines, f"{name} printed nothing; stderr:\n{stderr[-3000:]}"
    try:
        return json.loads(lines[-1])
    except ValueError as e:
        raise AssertionError(f"{name}: last line is not JSON: {lines[-1][:500]!r}; stderr:\n{stderr[-3000:]}") from e
