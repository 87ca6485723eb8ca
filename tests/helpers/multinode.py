"""Run as a script by tests/integration/test_multinode_ray.py: the stack on a head and two worker nodes of
`ray.cluster_utils.Cluster` (benchmarks/_chaos_rig.ChaosRig: w1 holds the monitor, w1 and w2 two training
slots each; the head holds Serve's controller and the HAProxy ingress), then a third node that sees another
filesystem at the storage path. Prints one JSON object last:

- `training`: the tiny teacher with DDP on 4 ranks placed by `train_slot` (two per worker node): each epoch's
  `rank_nodes` and its losses;
- `serving`: two replicas placed by `serve.max_replicas_per_node=1`, their nodes, and the statuses of
  requests through the ingress; the monitor actor's node and the rows it counted;
- `storage`: a node started in its own mount namespace with an empty tmpfs over the run root (a worker
  whose "shared" path is its own local disk), and what `raysys.jobs.train_teacher` said on that cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from _chaos_rig import MONITOR, ChaosRig, poll, stdout_to_stderr  # noqa: E402


def _training(rig: ChaosRig, root: Path) -> dict:
    from raysys.config import preset
    from raysys.data import Preprocessor, ensure_dataset
    from raysys.train import train_teacher
    from raysys.workflow.reach import check_nodes_reach

    cfg = preset("tiny").with_root(root)
    cfg.train = cfg.train.model_copy(update=dict(strategy="ddp", num_workers=4, num_epochs=2, cpus_per_worker=0.25,
                                                 resources_per_worker={"train_slot": 1}))
    schema = ensure_dataset(cfg.data)
    pre = Preprocessor.fit_split(schema, cfg.data.root)
    check_nodes_reach({"run_dir": cfg.run_dir}, {"data.root": cfg.data.root})  # every node shares this disk
    res = train_teacher(cfg, schema, pre, run_name="multinode")
    return {"epochs": [{k: m[k] for k in ("epoch", "train_loss", "val_loss", "val_accuracy", "rank_nodes",
                                          "world_size")} for m in res.metrics]}


def _serving(rig: ChaosRig) -> dict:
    import requests
    from ray.util.state import list_actors

    url = rig.deploy()
    poll(lambda: rig.running_replicas() == rig.num_replicas, 120, "both replicas")
    statuses, ids = [], []
    with requests.Session() as s:
        poll(lambda: s.get(f"{url}/healthz", timeout=10).status_code == 200, 60, "the ingress routing to the app")
        for k in range(40):
            r = s.post(f"{url}/v1/predict", json={"instances": [rig.rows[k % len(rig.rows)]]},
                       headers=rig.headers(), timeout=30)
            statuses.append(r.status_code)
            ids.append(r.headers.get("x-request-id"))
    rows = poll(lambda: (n := rig.monitor_report()["rows_seen"]) >= 40 and n, 60, "the monitor counting the rows")
    monitor = [a for a in list_actors(address=rig.dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
               if a.name == MONITOR]
    return {"replica_nodes": sorted(a.node_id for a in rig.replicas()), "statuses": statuses,
            "monitor_node": monitor[0].node_id if monitor else None, "monitor_rows_seen": rows}


def _storage(rig: ChaosRig, root: Path) -> dict:
    """A node whose view of `root` is an empty tmpfs (its own mount namespace), then the train job."""
    from ray._private.services import get_node_ip_address

    root.mkdir(parents=True, exist_ok=True)
    gcs = rig.cluster.address
    node = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs raysys-not-shared "{root}" && exec "{Path(sys.executable).parent / "ray"}" start '
         f'--address={gcs} --num-cpus=1 --block --disable-usage-stats --node-ip-address={get_node_ip_address()}'],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import ray

        poll(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 4, 90, "the fourth node")
        env = dict(os.environ, RAY_ADDRESS=gcs)
        job = subprocess.run([sys.executable, "-m", "raysys.jobs.train_teacher", "--preset", "tiny", "--root",
                              str(root)], env=env, capture_output=True, text=True, timeout=300)
        return {"exit_code": job.returncode, "stderr_tail": job.stderr[-2000:],
                "checkpoints": sorted(str(p.relative_to(root)) for p in root.rglob("checkpoint_*"))}
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def main(root: Path) -> dict:
    t0 = time.monotonic()
    out: dict = {}
    with stdout_to_stderr(), ChaosRig(root, num_replicas=2, rows_per_file=50, train_slots=2, spread=True) as rig:
        out["nodes"] = {"head": rig.cluster.head_node.node_id, "w1": rig.w1.node_id, "w2": rig.w2.node_id}
        out["training"] = _training(rig, root / "train")
        out["serving"] = _serving(rig)
        out["storage"] = _storage(rig, root / "unshared")
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
