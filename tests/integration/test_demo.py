"""Tier 3: `raysys demo` as a new user runs it (README's first command; here on the tiny preset): the whole loop
on its own embedded local Ray, in its own process group and HOME, with no RAY_* variable. The console shows
raysys's stages and results and where the endpoint is; Ray's own chatter goes to the run's log file."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers.cluster import BIN

from raysys.cli.loop import LOG_FILE
from serve.ingress import free_port

MAX_CONSOLE_LINES = 60  # issue 25: "under 60 lines on a run without errors"


@pytest.mark.integration
def test_demo_runs_the_loop_and_its_console_is_short(tmp_path):
    port, root, home = free_port(), tmp_path / "runs", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), CI="true", COLUMNS="100")  # a common terminal width
    proc = subprocess.Popen([str(BIN / "raysys"), "demo", "--preset", "tiny", "--root", str(root), "--port",
                             str(port), "--exit"], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-5000:]
    lines = out.splitlines()
    assert len(lines) < MAX_CONSOLE_LINES, f"{len(lines)} console lines:\n{out}"
    assert "loop completed" in out and f":{port}/" in out, out  # the endpoint's address
    for stage in ("data", "teacher", "distill", "serve"):
        assert stage in out.lower(), (stage, out)
    assert "(pid=" not in out and "Running Dataset" not in out, out  # no Ray worker lines, no Ray Data plans
    logs = list(Path(root).rglob(LOG_FILE))
    assert logs and logs[0].stat().st_size > 0, list(Path(root).rglob("*"))[:20]
