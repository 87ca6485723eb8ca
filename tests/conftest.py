"""Shared fixtures. The tests come in three tiers, one folder each, run in this order:

    unit/         no Ray, no process group (tier 1)
    dist/         2-rank gloo process groups (torch.multiprocessing), no Ray (tier 2)
    integration/  one local Ray cluster for the whole session (`ray_cluster`), started with more logical CPUs
                  than cores so Tune's trial drivers and Ray Train's workers fit beside each other (tier 3)

Helpers the tests share live in `helpers/` (this folder is on sys.path through this conftest)."""

from __future__ import annotations

import os
from unittest import mock

import pytest
from hypothesis import settings

from raysys.config import preset
from serve.ingress import free_port

# Ray waits 30 s for a new head's GCS to bind its port; on a loaded 2-core box (a chaos script's three nodes
# starting beside the session's cluster) it took longer, and the cluster failed to start ("Timed out waiting for
# file .../gcs_server_port_..."). Every Ray started here and in the scripts the tests run inherits this.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")

# every hypothesis test: no example database (no .hypothesis/ in the checkout, which `ray job submit
# --working-dir` would upload) and no per-example deadline (the box is shared and busy)
settings.register_profile("raysys", database=None, deadline=None)
settings.load_profile("raysys")


@pytest.fixture(scope="session")
def endpoint_api_key(tmp_path_factory) -> str:
    """The session's endpoint API key. The shipped ingress (HAProxy, direct ingress) listens beyond loopback,
    so an endpoint without a key refuses to start: as `raysys demo` does, the key is put in os.environ as
    RAYSYS_API_TOKEN_FILE (a 0600 file) before any Ray starts here, so the session's local Ray and every
    `ray start` cluster a test starts (tests/helpers/cluster.py copies os.environ) hand it to their replicas,
    and raysys's own clients (serve.apikey.client_api_key) send it. The tests' own `requests` calls to an
    endpoint route (a path with /v1/) send it too, as `Authorization: Bearer <key>`, unless they pass an
    Authorization or X-API-Key header of their own (headers={"Authorization": None}: none at all)."""
    import requests

    from serve.apikey import client_api_key, ensure_api_key

    ensure_api_key(tmp_path_factory.mktemp("apikey") / "api_key")  # a key already in the environment wins
    key = client_api_key()
    request = requests.Session.request

    def with_key(self, method, url, *args, headers=None, **kwargs):
        given = {k.lower() for k in {**self.headers, **(headers or {})}}
        if "/v1/" in str(url) and not given & {"authorization", "x-api-key"}:
            headers = {**(headers or {}), "Authorization": f"Bearer {key}"}
        return request(self, method, url, *args, headers=headers, **kwargs)

    requests.Session.request = with_key
    yield key
    requests.Session.request = request


@pytest.fixture(scope="session")
def ray_cluster(endpoint_api_key):
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
    # one torch thread a Ray process on this 2-core box, inherited from the environment ray.init starts the
    # cluster with (not a job runtime_env: a job with one starts a fresh worker process for each actor instead of
    # taking one of Ray's prestarted ones); the tests' own subprocesses (CLI drivers, jobs) keep the default
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
        ctx = ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=free_port())
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
