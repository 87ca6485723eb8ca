"""Tier 3: the soak benchmark's test mode (benchmarks/soak.py, 30 s): the shipped endpoint under a steady load
with delayed labels and a drift from 40% of the run: no request fails, the monitor sees the drift and keeps its
window and stored traffic bounded, no monitoring row is dropped, and every raysys process's memory is sampled.
(The p99 and memory-slope goals are the benchmark's figures, not asserted here: tests never time things.)"""

from __future__ import annotations

import pytest
from helpers.observability import alert_rules, panel_queries, used_labels
from helpers.scripts import run_benchmark

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_soak_holds_without_errors_or_unbounded_buffers(tmp_path, endpoint_api_key):
    out = run_benchmark("soak.py", "--duration-s", "30", "--bucket-s", "10", "--rate", "30", "--root",
                        str(tmp_path), timeout_s=540)
    assert out["requests_sent"] >= 30 * 25 and out["requests_failed"] == 0, out
    assert set(out["feedback_answers"]) == {"202"}, out["feedback_answers"]
    mon = out["monitor"]
    assert mon["bounded"] and mon["window_rows"] <= mon["window_size"], mon
    assert mon["drift_detected"] and mon["rows_seen"] >= out["requests_sent"] * 0.9, mon
    assert mon["labels_total"] >= out["requests_sent"] * 0.5, mon  # the answered ids came back labelled
    assert out["dropped"]["replica_rows_dropped"] == 0 and out["dropped"]["replicas_seen"] == 2, out["dropped"]
    roles = {k.split(":")[0] for k in out["memory"]}
    assert {"replica", "monitor", "controller", "haproxy"} <= roles, roles
    # each role sampled through the run (a process that replaced another, e.g. HAProxy after a reload, has fewer)
    for role in ("replica", "monitor", "controller", "haproxy"):
        assert max(m["samples"] for k, m in out["memory"].items() if k.startswith(role + ":")) >= 3, out["memory"]
    # each replica's memory by layer, read inside it through a Serve handle, and what malloc_trim gave back
    layers = out["replica_memory_layers"]
    assert len(layers) == 2, layers
    for rep in layers.values():
        assert rep["probes"] >= 1 and rep["rss_mb"]["last"] > rep["malloc_in_use_mb"]["last"] > 0, rep
        assert rep["py_blocks"]["last"] > 0 and rep["trimmed_mb_at_end"] is not None, rep
        # serve.malloc_arena_max (default 2) reached the replica's process through its runtime_env
        assert rep["malloc_arena_max"] == "2", rep
    # what Prometheus scrapes from the head after this traffic: the names and labels the shipped alert rules and
    # Grafana panels use (deploy/prometheus, deploy/grafana) exist as exported (the `ray_` prefix, counters'
    # `_total`, histograms' `_bucket` + `le`)
    live = {name: set(labels) for name, labels in out["metrics_series"].items()}
    assert {"ray_raysys_requests_total", "ray_raysys_predictions_total", "ray_raysys_request_latency_ms_bucket",
            "ray_raysys_drift_psi", "ray_raysys_drift_feature_drifted", "ray_raysys_alerts_total",
            "ray_raysys_accuracy_realised"} <= set(live), sorted(live)
    queries = [r["expr"] for r in alert_rules()] + [q for q, _ in panel_queries()]
    checked = 0
    for expr in queries:
        for series, labels in used_labels(expr).items():
            if series in live:  # recorded in this run (no errors, training or retrain job here)
                assert labels <= live[series], (expr, series, sorted(labels - live[series]))
                checked += 1
    assert checked >= 10, checked
