"""The servers benchmarks/serve_load.py compares the endpoint with, each started as its users start it, all
scoring with the same student and the same validation code (`serve.parsing`, `serve.scoring`), one torch thread
per process:

- `uvicorn`: benchmarks/_plain_fastapi.py under one uvicorn process (no batching);
- `gunicorn`: the same app under gunicorn with `workers` uvicorn workers (FastAPI's deployment docs: one
  worker per core), as many as the endpoint has replicas;
- `litserve`: benchmarks/_litserve_peer.py, LitServe batched with `workers` inference workers.

`cpus`: start the server under `taskset -c cpus` (every process it forks inherits it). `server_cpu_s` sums the
CPU time of a server's whole process tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("uvicorn", "gunicorn", "litserve")


def _env(reg, model: str) -> dict:
    return dict(os.environ, RAYSYS_BENCH_REGISTRY=reg.uri, RAYSYS_BENCH_MODEL=model, OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT))


def peer_command(name: str, port: int, workers: int) -> list[str]:
    # the app by its file's folder, not as `benchmarks._plain_fastapi`: Opacus installs a top-level package
    # named `benchmarks`, which shadows this folder
    py, here = sys.executable, str(ROOT / "benchmarks")
    if name == "uvicorn":
        return [py, "-m", "uvicorn", "_plain_fastapi:app", "--app-dir", here, "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", "--no-access-log"]
    if name == "gunicorn":
        return [py, "-m", "gunicorn", "_plain_fastapi:app", "--pythonpath", here, "-k",
                "uvicorn.workers.UvicornWorker", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--log-level",
                "warning"]
    if name == "litserve":
        return [py, str(ROOT / "benchmarks" / "_litserve_peer.py"), "--port", str(port), "--workers", str(workers)]
    raise ValueError(f"peer: unknown {name!r}; choose from {PEERS}")


def require_peers(names) -> None:
    """SystemExit naming the pip extra when a peer's server package is missing."""
    import importlib.util

    mods = {"gunicorn": "gunicorn", "litserve": "litserve", "uvicorn": "uvicorn"}
    missing = [mods[n] for n in names if importlib.util.find_spec(mods[n]) is None]
    if missing:
        raise SystemExit(f"serve_load: peer server package(s) {missing} missing; `pip install -e .[bench]` "
                         "installs them")


def start_peer(name: str, reg, model: str, port: int, workers: int, cpus: str | None = None) -> subprocess.Popen:
    cmd = peer_command(name, port, workers)
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(reg, model), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(proc: subprocess.Popen | None, url: str, body: bytes, headers: dict, timeout_s: float = 120) -> None:
    """Until a real prediction answers 200 (LitServe's workers load the model after its HTTP server is up)."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}): {proc.stderr.read()[-3000:]!r}")
        try:
            if requests.post(url, data=body, headers=headers, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def stop_peer(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def tree(pid: int) -> list:
    """psutil.Process of `pid` and all its descendants now."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def server_cpu_s(procs) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except Exception:  # psutil.NoSuchProcess: a process that went away counts what it had
            pass
    return total
