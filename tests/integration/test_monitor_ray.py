"""Tier 3: the named, detached MonitorActor on the session's local Ray cluster."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from raysys.config import DataConfig, MonitorConfig
from raysys.data import DriftSpec, Preprocessor, SyntheticTask
from raysys.monitor import ReferenceProfile, get_or_create_monitor

pytestmark = pytest.mark.integration


def _arrays(task, schema, n, seed, drift=None):
    ident = Preprocessor(schema, [0.0] * len(schema.numeric), [1.0] * len(schema.numeric))
    return ident.transform_table(task.sample(n, seed, drift))


def _send(handle, x_num, x_cat, y, version, batch_size=50):
    # sent without waiting, as a serving replica does (calls from one caller run in order on the actor);
    # the refs are returned only so the test can surface an exception raised inside `record`
    refs = []
    for lo in range(0, len(y), batch_size):
        hi = min(lo + batch_size, len(y))
        refs.append(handle.record.remote({"x_num": x_num[lo:hi], "x_cat": x_cat[lo:hi], "pred": y[lo:hi],
                                          "latency_ms": list(np.linspace(1.0, 20.0, hi - lo)),
                                          "model_version": version}))
    return refs


def test_monitor_actor_flags_the_shifted_feature(ray_cluster):
    import ray

    task = SyntheticTask(DataConfig(num_numeric=4, num_categorical=2, num_categories=4, num_classes=3, seed=5))
    schema = task.schema()
    x_ref, c_ref, y_ref = _arrays(task, schema, 5000, 1)
    profile = ReferenceProfile.from_arrays(schema, x_ref, c_ref, num_bins=10, pred=y_ref)
    cfg = MonitorConfig(window_size=1000, min_rows=200, psi_threshold=0.2)
    name = f"raysys_monitor_test_{uuid.uuid4().hex[:8]}"
    kwargs = dict(profile=profile.to_dict(), schema=schema.model_dump(), monitor_cfg=cfg.model_dump(),
                  model_version=1)
    handle = get_or_create_monitor(name=name, namespace="raysys_test", **kwargs)
    try:
        again = get_or_create_monitor(name=name, namespace="raysys_test", **kwargs)
        assert again._actor_id == handle._actor_id
        assert ray.get(handle.ping.remote(), timeout=60)

        x, c, y = _arrays(task, schema, 1000, 11)
        refs = _send(handle, x, c, y, version=1)
        rep = ray.get(handle.report.remote(), timeout=60)
        ray.get(refs, timeout=60)  # record (metrics included) raised nothing
        assert rep["rows_seen"] == 1000 and rep["window_rows"] == 1000
        assert rep["alerts"] == [], rep["features"]
        assert rep["metrics_enabled"] is True  # ray.util.metrics made inside the actor
        assert rep["latency_ms"]["count"] == 1000 and 1.0 <= rep["latency_ms"]["p50"] <= 20.0
        assert rep["requests_per_s"] > 0 and rep["predictions_by_version"] == {"1": 1000}

        # a second handle (as another replica would get) sees the same state
        assert ray.get(again.report.remote(), timeout=60)["rows_seen"] == 1000

        ray.get(handle.reset.remote(), timeout=60)
        x, c, y = _arrays(task, schema, 1000, 12, DriftSpec(covariate={"x1": 1.0}))
        _send(handle, x, c, y, version=1)
        rep = ray.get(handle.report.remote(), timeout=60)
        assert rep["alerts"] == ["x1"], rep["features"]
        assert rep["features"]["x1"]["psi"] > 0.2 and rep["features"]["x1"]["drifted"]
        assert all(not f["drifted"] for n, f in rep["features"].items() if n != "x1")
    finally:
        ray.kill(handle, no_restart=True)
    # the detached actor is gone (ray.kill is asynchronous): nothing leaks into later tests
    deadline = time.monotonic() + 30
    while True:
        try:
            ray.get_actor(name, namespace="raysys_test")
        except ValueError:
            break
        assert time.monotonic() < deadline, f"actor {name} still alive 30 s after ray.kill"
        time.sleep(0.2)
