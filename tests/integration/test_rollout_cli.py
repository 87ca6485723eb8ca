"""Tier 3: `raysys serve status | canary | promote | rollback` from a second terminal, as a new user runs them
against `make demo`'s cluster: a token-auth cluster whose token Ray stored in ~/.ray/auth_token, and a shell
with no RAY_* variable at all. They must find the token themselves.

The cluster is a real `ray start` cluster in its own process group, temp dir and HOME (so its token never
touches the developer's), stopped by killing that group (tests/helpers/cluster.py).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from helpers.cluster import BIN
from helpers.cluster import token_cluster as start_token_cluster
from helpers.serving import MODEL, make_registry, poll

from serve.ingress import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def demo_cluster(tmp_path):
    with start_token_cluster(tmp_path, prefix="rsc-") as cluster:
        yield cluster


def _second_terminal(home: Path, *args: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    """`raysys ...` in a fresh shell: HOME set, not one RAY_* variable (unless `extra` adds one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), **(extra or {}))
    return subprocess.run([str(BIN / "raysys"), *args], env=env, capture_output=True, text=True, timeout=400,
                          cwd=str(home))


def test_rollout_commands_find_the_demo_clusters_token(demo_cluster, tmp_path):
    home, dash = demo_cluster["home"], demo_cluster["dashboard"]
    reg, _, rows = make_registry(tmp_path)
    app, http = f"cli-{uuid.uuid4().hex[:6]}", free_port()
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"registry_uri": reg.uri, "model_name": MODEL,
                                        "serve": {"port": http, "app_name": app, "route_prefix": f"/{app}"}}))
    deadline = time.monotonic() + 120
    while True:  # the dashboard of a cluster that just started answers after a few seconds
        try:
            requests.get(f"{dash}/api/version", timeout=5)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "the cluster's dashboard never came up"
            time.sleep(1)
    # no --root: it would move the registry under the root (the config names the test's registry)
    out = _second_terminal(home, "serve", "deploy", "--preset", "tiny", "--config", str(cfg_file),
                           "--address", demo_cluster["gcs"], "--detach")
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"http://127.0.0.1:{http}/{app}"
    poll(lambda: requests.post(f"{url}/v1/predict", json={"instances": rows[:1]}, timeout=30).status_code == 200,
         what="the deployed endpoint")

    # without the token (token auth explicitly off in this shell) the cluster refuses: the check below can fail
    refused = _second_terminal(home, "serve", "status", "--app", app, "--address", dash,
                               extra={"RAY_AUTH_MODE": "disabled"})
    assert refused.returncode != 0 and "oken" in refused.stdout + refused.stderr, refused.stdout + refused.stderr

    common = ["--app", app, "--address", dash]
    steps = [("status",), ("canary", "--version", "2", "--percent", "50", "--no-gate"), ("status",), ("promote",),
             ("rollback",), ("status",)]
    for step in steps:
        out = _second_terminal(home, "serve", *step, *common)
        assert out.returncode == 0, (step, out.stdout + out.stderr)
        assert "Token authentication" not in out.stdout + out.stderr
        if step[0] == "canary":
            assert "canary 2 at 50%" in out.stdout, out.stdout
    assert "RUNNING" in out.stdout and "stable v1" in out.stdout, out.stdout  # promoted to 2, rolled back to 1
    assert reg.get_alias(MODEL, "production") == 1 and reg.alias_history(MODEL, "production") == [1]
    assert requests.post(f"{url}/v1/predict", json={"instances": rows[:1]}, timeout=30).json()["model_version"] == 1
