"""Tier 3: `ray start --head` with token authentication, then `ray job submit -- python jobs/pipeline.py`.

The cluster is a real `ray start` cluster in its own process group, temp dir and HOME (so its token and
address file never touch the developer's), stopped by killing that group; the job runs the tiny preset
end to end, including the Serve endpoint and the drift report.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import requests
from helpers import REPO
from helpers.cluster import BIN
from helpers.cluster import token_cluster as start_token_cluster

from serve.ingress import free_port


def _wait_http(url: str, timeout_s: float = 90) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return requests.get(url, timeout=5)
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def token_cluster(tmp_path):
    with start_token_cluster(tmp_path, prefix="rsj-", cwd=str(tmp_path)) as cluster:
        yield cluster


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
        # the dashboard answers before the node's job agent is up (Ray asks the client to retry), and a busy
        # dashboard may drop the working-dir upload: both are retried, as a user would
        transient = "No available agent" in log or "ServerDisconnectedError" in log
        if not transient or time.monotonic() > deadline:
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
