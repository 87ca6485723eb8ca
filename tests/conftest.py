"""Shared fixtures. Tier 1: no Ray. Tier 2: 2-rank gloo (torch.multiprocessing). Tier 3: one local Ray
cluster for the whole session (`ray_cluster`), started with more logical CPUs than cores so Tune's trial
drivers and Ray Train's workers can run beside each other on a 2-core box."""

from __future__ import annotations

import os
import socket

import pytest

from raysys.config import preset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # never join a cluster someone else started: these tests own theirs and stop it by shutting down
    os.environ.pop("RAY_ADDRESS", None)
    # address="local": a fresh cluster even when /tmp/ray/ray_current_cluster names another (or a dead) one
    # the shipped Serve ingress (HAProxy + direct ingress), on private HAProxy ports
    from serve.ingress import apply_ingress_env

    apply_ingress_env()
    # tests only: a deleted app's direct-ingress replicas wait 30 s by default before exiting (so that HAProxy
    # stops routing to them first); every Serve test deletes its app, so 30 s each adds up
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    # the dashboard carries Serve's REST API, through which raysys deploys and rolls out
    ctx = ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=free_port(), runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ctx
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny preset rooted in a fresh temp dir (data, runs and registry all under it)."""
    return preset("tiny").with_root(tmp_path)


@pytest.fixture(scope="session")
def serve_port(ray_cluster):
    """Serve's HTTP proxy, started once per session on a free port (Serve keeps the first http_options
    it was started with, so every Serve test in the session must use this port)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port
