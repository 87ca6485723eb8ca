"""Run as a script by tests/integration/test_multinode_ray.py: the stack on a head and two worker nodes of
`ray.cluster_utils.Cluster` (benchmarks/_chaos_rig.ChaosRig: w1 holds the monitor, w1 and w2 two training
slots each; the head holds Serve's controller and the HAProxy ingress), then a third node that sees another
filesystem at the storage path. Prints one JSON object last:

- `training`: the tiny teacher with DDP on 4 ranks placed by `train_slot` (two per worker node): each epoch's
  `rank_nodes` and its losses;
- `serving`: two replicas placed by `serve.max_replicas_per_node=1`, their nodes, and the statuses of
  requests through the ingress; the monitor actor's node and the rows it counted;
- `retrain`: the closed loop from worker nodes: drifted traffic makes the monitor (on w1) raise a window alert
  that submits `jobs/retrain.py` with `monitor.retrain_resources` = {job_node: 1} (w2 only); the job joins the
  labels sent after the alert, trains a teacher (Ray Train) and students (Tune), canaries the candidate in the
  endpoint under a trickle of requests and promotes it: the job's status and node, and the version served after;
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


DRIFTED_ROWS = 1000


def monitor_settings(root: Path) -> dict:
    """The endpoint's monitor: window tests over the last 300 rows that retrain on drift, the job's
    driver placed on w2 (`job_node`)."""
    import yaml

    from helpers.serving import MODEL
    from helpers.worlds import RETRAIN_CONFIG

    root.mkdir(parents=True, exist_ok=True)
    (root / "retrain.yaml").write_text(yaml.safe_dump(RETRAIN_CONFIG))
    return {"window_size": 300, "min_rows": 100, "alpha": 0.001, "min_labels": 100,
            "on_drift": "retrain", "retrain_cooldown_s": 3600, "traffic_flush_interval_s": 1.0,
            # the canary's trickle must not rotate the labelled rows out before the job has read them
            "traffic_max_files": 400,
            "retrain_resources": {"job_node": 1},
            "retrain_args": ["--preset", "tiny", "--config", str(root / "retrain.yaml"), "--root",
                             str(root / "retrain"), "--registry-uri", str(root / "registry"), "--model-name",
                             MODEL, "--min-labelled-rows", str(DRIFTED_ROWS - 50),
                             "--label-wait-s", "180", "--canary-percent", "50", "--canary-s", "3",
                             "--canary-min-rows", "10"]}


def _retrain(rig: ChaosRig) -> dict:
    import threading

    import requests
    from ray.job_submission import JobSubmissionClient

    from helpers.serving import MODEL, predict_rows, send_feedback
    from helpers.worlds import SMALL_TASK, sample_rows
    from raysys.data import DriftSpec
    from raysys.data.synthetic import SyntheticTask

    task = SyntheticTask(SMALL_TASK)  # the task the rig's registry was sampled from
    rows, labels = sample_rows(task, task.schema(), DRIFTED_ROWS, [11, 6], DriftSpec(covariate={"x1": 2.0}))
    labels = [{0: 1, 1: 0}.get(v, v) for v in labels]  # and the rule changed: the candidate must learn it
    with requests.Session() as s:
        s.headers.update(rig.headers())
        ids, _ = predict_rows(s, rig.url, rows, "drift", size=50)
        rep = poll(lambda: (r := rig.monitor_report()) and (r["retrain"]["jobs"] or r["retrain"]["last_error"]) and r,
                   120, "the monitor's retrain submission")
        out = {"alerts": [e["kind"] for e in rep["alert_events"]], "submit_error": rep["retrain"]["last_error"],
               "job_id": rep["retrain"]["jobs"][0]["job_id"] if rep["retrain"]["jobs"] else None}
        if out["job_id"] is None:
            return out
        send_feedback(s, rig.url, ids, labels, size=50)  # the labels come after the alert; the job waits for them
        jobs, stop, answers = JobSubmissionClient(rig.dashboard), threading.Event(), []

        def trickle() -> None:  # requests for the canary to judge, on a session of its own
            with requests.Session() as t:
                t.headers.update(rig.headers())
                while not stop.is_set():
                    try:
                        r = t.post(f"{rig.url}/v1/predict", json={"instances": [rows[len(answers) % len(rows)]]},
                                   timeout=30)
                        answers.append(r.status_code)
                    except requests.RequestException as e:
                        answers.append(type(e).__name__)
                    stop.wait(0.05)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            status = poll(lambda: (st := str(jobs.get_job_status(out["job_id"])).split(".")[-1]) in
                          ("SUCCEEDED", "FAILED", "STOPPED") and st, 420, "the retrain job", interval_s=2)
        finally:
            stop.set()
            thread.join(timeout=60)
        production = rig.reg.get_alias(MODEL, "production")
        served = poll(lambda: (v := s.get(f"{rig.url}/healthz", timeout=10).json()["model_version"]) == production
                      and v, 120, "the endpoint serving production")
        logs = jobs.get_job_logs(out["job_id"])
        decision = next((json.loads(x) for x in reversed(logs.splitlines()) if x.startswith("{")), {})
        out.update(status=status, driver_node=jobs.get_job_info(out["job_id"]).driver_node_id,
                   decision={k: decision.get(k) for k in ("promoted", "why", "holdout", "canary")},
                   production_version=production, served_version=served, requests_during_job=len(answers),
                   failed_during_job=[a for a in answers if a != 200],
                   logs_tail="" if status == "SUCCEEDED" else logs[-4000:])
        return out


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
    with stdout_to_stderr(), ChaosRig(root, num_replicas=2, rows_per_file=50, train_slots=2, spread=True,
                                      monitor=monitor_settings(root)) as rig:
        out["nodes"] = {"head": rig.cluster.head_node.node_id, "w1": rig.w1.node_id, "w2": rig.w2.node_id}
        out["training"] = _training(rig, root / "train")
        out["serving"] = _serving(rig)
        out["retrain"] = _retrain(rig)
        out["storage"] = _storage(rig, root / "unshared")
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
