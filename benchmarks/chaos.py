"""Chaos under load across nodes: what raysys survives, as figures anyone can rerun.

A head and two worker nodes (`ray.cluster_utils.Cluster`, benchmarks/_chaos_rig.py) serve the shipped
endpoint (2 replicas behind HAProxy, the monitor snapshotting every second) under a steady open-loop load
(`--rate` requests/s, retried where a retry is safe, benchmarks/_chaos_load.py) while, one at a time, the
harness kills: a model replica, the HAProxy process, Serve's controller, the monitor actor, a training rank
mid-epoch, and a whole worker node holding a training rank, a replica and the monitor (a replacement node
joins, as an autoscaler's would); then `--random-s` seconds of random kills every `--every-s`.

For each scenario: requests sent / failed (by final status) / retried / cut after their headers, time to
recovery, and state lost (the monitor's reference, window and counters after its restart; training's epochs
redone and checkpoints lost). At the end the registry must be byte-identical.

    python benchmarks/chaos.py                 # ~5 min on a 2-core machine
    python benchmarks/chaos.py --short         # the test mode (tests/integration/test_chaos_ray.py)

The last stdout line is one JSON object: requests_sent, requests_failed, data_lost, scenarios.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _chaos_scenarios as sc  # noqa: E402
from _chaos_load import OpenLoad  # noqa: E402
from _chaos_rig import ChaosRig, stdout_to_stderr, tree_digest  # noqa: E402


def run(root: Path, *, rate: float, random_s: float, every_s: float, epochs: int, step_delay_s: float,
        settle_s: float, log=print) -> dict:
    scenarios = []
    with ChaosRig(root) as rig:
        url = rig.deploy()
        log(f"chaos: endpoint {url} on {len(rig.cluster.list_all_nodes())} nodes; load {rate}/s")
        # one training run for both training scenarios: a rank killed in epoch 1, its node removed in epoch 2
        training = sc.Training(rig, "chaos-teacher", epochs=epochs, step_delay_s=step_delay_s)
        with OpenLoad(url, rig.rows, headers=rig.headers(), rate=rate) as load:
            time.sleep(settle_s)
            steps = [("replica", lambda: sc.kill_replica(rig, on_node=rig.w1.node_id)),
                     ("haproxy", lambda: sc.kill_haproxy(rig)),
                     ("controller", lambda: sc.kill_controller(rig)),
                     ("monitor", lambda: sc.kill_monitor(rig)),
                     ("train_worker", lambda: sc.kill_train_worker(rig, training)),
                     ("node", lambda: sc.remove_node(rig, training))]
            if random_s > 0:
                steps.append(("random", lambda: sc.random_kills(rig, duration_s=random_s, every_s=every_s)))
            for name, fn in steps:
                t0, rows0 = time.monotonic(), _rows_seen(rig)
                log(f"chaos: {name} ...")
                try:
                    out = fn()
                except Exception as e:  # a scenario that does not recover is a result, not a crash of the run
                    out = {"recovery_s": None, "error": f"{type(e).__name__}: {e}"}
                time.sleep(settle_s)
                got = OpenLoad.summary(load.between(t0))
                out = {"scenario": name, **got, **out}
                out["monitor_rows_missing"] = _rows_missing(rig, rows0, load.between(t0))
                out["data_lost"] = _lost(out)
                scenarios.append(out)
                log(f"chaos: {name}: {json.dumps(out)}")
        total = OpenLoad.summary(load.records)
        registry_same = tree_digest(Path(rig.reg.root)) == rig.registry_digest
    data_lost = sum(s["data_lost"] for s in scenarios) + (0 if registry_same else 1)
    return {"benchmark": "chaos", "nodes": 3, "rate_per_s": rate, **total, "skipped_ticks": load.skipped,
            "data_lost": data_lost, "registry_byte_identical": registry_same,
            "scenario_count": len(scenarios), "scenarios": scenarios}


def _rows_seen(rig: ChaosRig) -> int | None:
    try:
        return rig.monitor_report(timeout_s=10)["rows_seen"]
    except Exception:
        return None


def _rows_missing(rig: ChaosRig, rows0: int | None, records) -> int | None:
    """Rows answered 200 in the scenario's window that the monitor never counted (replica buffers and
    monitor state since its last snapshot die with them). Approximate by the flush interval at both ends."""
    rows1 = _rows_seen(rig)
    if rows0 is None or rows1 is None:
        return None
    return max(0, sum(r.status == 200 for r in records) - (rows1 - rows0))


def _lost(s: dict) -> int:
    """Models, checkpoints or training runs lost in a scenario (the monitor's missing rows are reported apart:
    they are monitoring samples, not user data)."""
    lost = 0
    tr = s.get("training")
    if tr is not None:
        lost += tr["checkpoints_lost"] + (1 if tr["finished"] is False else 0)  # None: still running
    mon = s.get("monitor")
    if mon is not None and not (mon["restored"] and mon["reference_kept"]):
        lost += 1
    return lost


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="test mode: 4-epoch training, 12 s of random kills")
    p.add_argument("--rate", type=float, default=25.0, help="requests per second of the steady load")
    p.add_argument("--random-s", type=float, default=None, help="seconds of random kills (default 60; short 12)")
    p.add_argument("--every-s", type=float, default=5.0, help="seconds between random kills")
    p.add_argument("--epochs", type=int, default=None, help="teacher epochs (>= 4: a kill in epoch 1 and a later one; default 6)")
    p.add_argument("--root", default=None, help="working directory (default: a temp dir, removed at the end)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    random_s = a.random_s if a.random_s is not None else (12.0 if a.short else 60.0)
    epochs = a.epochs or (4 if a.short else 6)
    if epochs < 4:
        p.error("--epochs: at least 4 (a rank is killed in epoch 1, its node removed in a later epoch)")
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix="raysys-chaos-"))
    try:
        with stdout_to_stderr():
            # 0.2 s per step: ~5 s epochs, so that the node scenario, which starts a few seconds after the
            # rank's kill, still finds an epoch before the last to break (0.05 s epochs of ~1 s were all over
            # by then on a quiet machine, and the scenario timed out waiting for one)
            out = run(root, rate=a.rate, random_s=random_s, every_s=a.every_s, epochs=epochs,
                      step_delay_s=0.2, settle_s=2.0, log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        if not a.root:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))
    return 0 if out["requests_failed"] == 0 and out["data_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
