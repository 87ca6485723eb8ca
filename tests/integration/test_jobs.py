"""Tier 3: `ray start --head` with token authentication, then `ray job submit -- python jobs/pipeline.py`.

The cluster is a real `ray start` cluster in its own process group, temp dir and HOME (so its token and
address file never touch the developer's), stopped by killing that group; the job runs the tiny preset
end to end, including the Serve endpoint and the drift report.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from helpers import REPO

from serve.ingress import free_port, ingress_env

BIN = Path(sys.executable).parent


def _wait_http(url: str, timeout_s: float = 90) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return requests.get(url, timeout=5)
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _kill_leftovers(root: str) -> list[int]:
    """Kill what the cluster left outside its process group: Serve's HAProxy is re-parented to init and
    outlives a stopped cluster (found after fresh-clone runs). Only processes whose working directory lies
    in this cluster's own temp dir (the job's working_dir) are touched."""
    killed = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            inside = os.readlink(d / "cwd").startswith(root.rstrip("/") + "/")
        except OSError:
            continue
        if inside:
            try:
                os.kill(int(d.name), signal.SIGKILL)
                killed.append(int(d.name))
            except ProcessLookupError:
                pass
    return killed


@pytest.fixture
def token_cluster(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # a short temp dir: Ray's unix socket paths must stay under ~107 characters
    ray_tmp = tempfile.mkdtemp(prefix="rsj-", dir="/tmp")
    env = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    # the shipped Serve ingress, with HAProxy ports of its own (the session's cluster holds others)
    env.update(ingress_env(private_ports=True))
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=60)
    port, dash = free_port(), free_port()
    # every port explicit: the session's ray.init() cluster (and any other Ray here) holds the defaults,
    # e.g. the dashboard agent's 52365, and a clash leaves the job API with "No available agent"
    ports = {opt: free_port() for opt in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                          "runtime-env-agent-port", "metrics-export-port",
                                          "ray-client-server-port", "node-manager-port", "object-manager-port")}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         *(f"--{opt}={p}" for opt, p in ports.items()),
         "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
        env=env, cwd=str(tmp_path), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "home": home}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
        _kill_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.integration
def test_job_submit_runs_the_loop_with_token_auth(token_cluster, tmp_path):
    dash = token_cluster["dashboard"]
    # token auth is on: the dashboard's job API refuses a request without the token
    r = _wait_http(f"{dash}/api/jobs/")
    assert r.status_code == 401, r.text[:200]

    serve_port = free_port()
    root = tmp_path / "root"
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={dash}", f"--working-dir={REPO}", "--",
           "python", "jobs/pipeline.py", "--preset", "tiny", "--root", str(root), "--port", str(serve_port)]
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(cmd, env=token_cluster["env"], capture_output=True, text=True, timeout=600)
        log = out.stdout + out.stderr
        # the dashboard answers before the node's job agent is up; Ray asks the client to retry
        if "No available agent" not in log or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "alerts: x0" in log, log[-3000:]
    assert "bad request -> HTTP 422" in log

    # the endpoint the job deployed keeps serving after the job ended
    r = requests.get(f"http://127.0.0.1:{serve_port}/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["model_version"] == 1
    assert (root / "registry" / "raysys-student").is_dir()

    # a client without the token is refused
    no_token = dict(token_cluster["env"])
    no_token.pop("RAY_AUTH_MODE")
    no_token["HOME"] = str(tmp_path)
    denied = subprocess.run([str(BIN / "ray"), "job", "list", f"--address={dash}"], env=no_token,
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
