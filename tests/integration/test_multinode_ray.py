"""Tier 3: the stack on several nodes (tests/helpers/multinode.py, its own `ray.cluster_utils.Cluster` of a head
and two worker nodes, run as its own process beside the session's cluster): training ranks on both worker
nodes and the same losses as the same run on one node (the session's), replicas spread by
`serve.max_replicas_per_node` answering through the ingress, the monitor on a worker node, a drift alert's
retrain job run on a worker node from submission to promotion, and the clear error when a node cannot reach
the storage it was given."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.scripts import run_script

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "multinode.py"


@pytest.mark.timeout(1200)
def test_the_stack_on_three_nodes(ray_cluster, tmp_path):
    from raysys.config import preset
    from raysys.data import Preprocessor, ensure_dataset
    from raysys.train import train_teacher

    out = run_script(SCRIPT, str(tmp_path / "multi"), timeout_s=1140, expect_exit=0)
    nodes = out["nodes"]
    workers = {nodes["w1"], nodes["w2"]}

    # 4 DDP ranks, two on each worker node (train_slot), none on the head; every epoch names them
    epochs = out["training"]["epochs"]
    assert len(epochs) == 2 and all(e["world_size"] == 4 for e in epochs)
    for e in epochs:
        assert len(e["rank_nodes"]) == 4 and set(e["rank_nodes"]) == workers, (e["rank_nodes"], nodes)
        assert sorted(e["rank_nodes"].count(n) for n in workers) == [2, 2]
    # the same run on one node (the session's cluster) reaches the same losses
    cfg = preset("tiny").with_root(tmp_path / "one")
    cfg.train = cfg.train.model_copy(update=dict(strategy="ddp", num_workers=4, num_epochs=2, cpus_per_worker=0.25))
    schema = ensure_dataset(cfg.data)
    one = train_teacher(cfg, schema, Preprocessor.fit_split(schema, cfg.data.root), run_name="one-node")
    assert len(set(one.metrics[-1]["rank_nodes"])) == 1
    for multi, single in zip(epochs, one.metrics):
        for k in ("train_loss", "val_loss"):
            assert abs(multi[k] - single[k]) <= 0.02 * single[k], (k, multi[k], single[k])

    # two replicas on two different nodes (max_replicas_per_node=1), every request answered through the ingress
    sv = out["serving"]
    assert len(sv["replica_nodes"]) == 2 and len(set(sv["replica_nodes"])) == 2, sv
    assert sv["statuses"] == [200] * 40, sv["statuses"]
    # the monitor lives on w1 (not the head) and counted every row the replicas on both nodes sent it
    assert sv["monitor_node"] == nodes["w1"] and sv["monitor_rows_seen"] >= 40, sv

    # the closed loop from worker nodes: the monitor on w1 raised a window alert and submitted the retrain job,
    # whose driver ran on w2 (monitor.retrain_resources); it trained, canaried and promoted with every request
    # answered meanwhile, and the endpoint now serves the promoted version
    rt = out["retrain"]
    assert "window" in rt["alerts"] and rt["job_id"], rt
    assert rt["status"] == "SUCCEEDED", rt["logs_tail"]
    assert rt["driver_node"] == nodes["w2"], (rt["driver_node"], nodes)
    assert rt["decision"]["promoted"], rt["decision"]
    assert rt["production_version"] > 2 and rt["served_version"] == rt["production_version"], rt
    assert rt["requests_during_job"] > 0 and rt["failed_during_job"] == [], rt

    # a node whose "shared" path is its own disk: the job stops before training with the field, node and fix
    st = out["storage"]
    assert st["exit_code"] == 2, st
    assert "run_dir" in st["stderr_tail"] and "is not reachable from node" in st["stderr_tail"], st["stderr_tail"]
    assert "shared filesystem" in st["stderr_tail"] and "Traceback" not in st["stderr_tail"], st["stderr_tail"]
    assert st["checkpoints"] == [], st  # nothing trained
