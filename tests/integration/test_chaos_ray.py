"""Tier 3: chaos under load across nodes, in the benchmark's short mode (benchmarks/chaos.py --short): a head
and two worker nodes of ray.cluster_utils.Cluster serve the shipped endpoint under a steady open-loop load
while the harness kills a replica, the HAProxy process, Serve's controller, the monitor actor, a training
rank mid-epoch, and removes a worker node holding a training rank, a replica and the monitor; then a few
seconds of random kills. Every request is answered where a retry is safe, nothing is lost, and each part is
back with its state.

The benchmark runs as its own process (as a user runs it), its cluster beside the session's; the test reads
its JSON line."""

from __future__ import annotations

import pytest
from helpers.scripts import run_benchmark

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_chaos_scenarios_under_load_lose_nothing(tmp_path, endpoint_api_key):
    out = run_benchmark("chaos.py", "--short", "--rate", "20", "--root", str(tmp_path), timeout_s=840)
    by = {s["scenario"]: s for s in out["scenarios"]}
    assert set(by) == {"replica", "haproxy", "controller", "monitor", "train_worker", "node", "random"}, by
    for name, s in by.items():
        assert s.get("error") is None, (name, s)
        assert s["recovery_s"] is not None and s["recovery_s"] > 0, (name, s)
    # every request answered 200 in the end (a safe retry where the first try found the ingress down)
    assert out["requests_failed"] == 0, [(s["scenario"], s["failed_by_status"]) for s in out["scenarios"]]
    assert out["requests_sent"] >= 20 * 30
    assert out["data_lost"] == 0 and out["registry_byte_identical"], out
    # the monitor came back with its reference profile and a window (restored from its snapshot)
    for name in ("monitor", "node"):
        mon = by[name]["monitor"]
        assert mon["restored"] and mon["reference_kept"] and mon["window_rows_after_restore"] > 0, (name, mon)
    # training resumed from its last checkpoint each time (no checkpoint lost) and finished
    for name in ("train_worker", "node"):
        tr = by[name]["training"]
        assert tr["checkpoints_lost"] == 0 and tr["error"] is None, (name, tr)
        assert tr["resumed_at_epoch"] == tr["last_checkpoint_epoch_before_kill"] + 1, (name, tr)
    assert by["node"]["training"]["finished"], by["node"]["training"]
    # the node removed held what the scenario says it held
    assert all(by["node"]["placed_on_removed_node"].values()), by["node"]["placed_on_removed_node"]
