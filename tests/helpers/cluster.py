"""A real `ray start --head` cluster with token auth, as a user's terminal starts one: its own process group,
temp dir and HOME (so its token never touches the developer's), every port explicit (the session's
ray.init() cluster holds Ray's defaults, e.g. the dashboard agent's 52365: a clash leaves the job API with
"No available agent"), the shipped HAProxy ingress on private ports. Stopped by killing that group."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serve.ingress import free_port, ingress_env

BIN = Path(sys.executable).parent
PORT_OPTIONS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")


def kill_leftovers(root: str) -> list[int]:
    """Kill what the cluster left outside its process group: Serve's HAProxy is re-parented to init and
    outlives a stopped cluster. Only processes whose working directory lies in this cluster's own temp dir
    (the job's working_dir) are touched."""
    killed, root = [], root.rstrip("/")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cwd = os.readlink(d / "cwd")
            # the cluster's own dir too: a cluster started with cwd=ray_tmp leaves HAProxy running right there
            inside = cwd == root or cwd.startswith(root + "/")
        except OSError:
            continue
        if inside:
            try:
                os.kill(int(d.name), signal.SIGKILL)
                killed.append(int(d.name))
            except ProcessLookupError:
                pass
    return killed


def _stop(head: subprocess.Popen, ray_tmp: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
    kill_leftovers(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


@contextmanager
def token_cluster(tmp_path: Path, *, prefix: str, cwd: str | None = None) -> Iterator[dict]:
    """Yields {"env", "home", "gcs", "dashboard"}: `env` is the cluster's own environment (token auth on),
    the token lies in `<home>/.ray/auth_token` where a new local cluster (`make demo`) stores it."""
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # Ray's unix socket paths must stay short
    env = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env.update(ingress_env(private_ports=True))
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=60)
    port, dash = free_port(), free_port()
    ports = {opt: free_port() for opt in PORT_OPTIONS}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         *(f"--{opt}={p}" for opt, p in ports.items()),
         "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
        env=env, cwd=cwd or ray_tmp, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield {"env": env, "home": home, "gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        _stop(head, ray_tmp)
