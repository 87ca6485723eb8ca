"""Tier 3 (Ray integration): every test here runs with the session's endpoint API key in effect
(`endpoint_api_key` in tests/conftest.py), whether it uses the session's local Ray or starts its own."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _endpoint_key_everywhere(endpoint_api_key) -> str:
    return endpoint_api_key


@pytest.fixture(autouse=True)
def _leak_log(request):
    """Diagnostics (RAYSYS_LEAK_LOG=path): after each test, the session cluster's live actors by class and
    Serve apps, one JSON line a test."""
    yield
    path = os.environ.get("RAYSYS_LEAK_LOG")
    if not path:
        return
    import ray

    if not ray.is_initialized():
        return
    from collections import Counter

    from ray.util.state import list_actors

    actors = Counter(a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000))
    try:
        from ray import serve

        apps = sorted(serve.status().applications)
    except Exception as e:  # noqa: BLE001
        apps = [repr(e)]
    with open(path, "a") as f:
        f.write(json.dumps({"test": request.node.nodeid, "actors": actors, "apps": apps,
                            "cpu_free": ray.available_resources().get("CPU", 0.0),
                            "cpu_total": ray.cluster_resources().get("CPU", 0.0),
                            "load": os.getloadavg()[0]}) + "\n")
