"""The cluster the chaos benchmark breaks: a head and two worker nodes of `ray.cluster_utils.Cluster` on this
machine (each its own raylet, object store and worker processes), with custom resources that place things:

    head  replica_slot            Serve's controller, the HAProxy ingress (proxy_location HeadOnly), a replica
    w1    replica_slot, train_slot, monitor_node (the monitor)   <- the node the node-loss scenario removes
    w2    train_slot, job_node      (a retrain job's driver, placed by monitor.retrain_resources)

A replacement node (`add_worker`) carries what w1 carried, as an autoscaler would bring one. The endpoint is
the shipped one (serve.app, HAProxy + direct ingress, API key) deployed through Serve's REST API like
`raysys serve deploy`, over a registry with a small untrained model (tests/helpers/serving.make_registry),
its monitor snapshotting every second under the rig's root."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

APP = "chaos"
MONITOR = "chaos_monitor"
W1_RESOURCES = {"replica_slot": 1, "train_slot": 1, "monitor_node": 1}


@contextmanager
def stdout_to_stderr():
    """Send everything written to file descriptor 1 (Ray's driver prints, e.g. a raylet's "(raylet) Task ...
    failed" line at shutdown) to stderr meanwhile, so that the benchmark's JSON stays its last stdout line."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def poll(fn, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as e:  # the thing polled for may be down right now: that is what we wait out
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last!r}")


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes under `root` (the registry must come out
    byte-identical)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".lease" not in p.name:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (from /proc; no psutil here)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ChaosRig:
    def __init__(self, root: Path, *, num_replicas: int = 2, workers: bool = True, rows_per_file: int | None = None,
                 train_slots: int = 1, spread: bool = False, monitor: dict | None = None):
        """`workers=False`: the head alone, holding every slot (benchmarks/soak.py). `rows_per_file`: store the
        monitor's traffic as Parquet under the root (monitor.traffic_uri), this many rows a file.
        `train_slots`: training ranks each worker node takes. `spread`: the replicas are placed by Serve's
        `max_replicas_per_node=1` (serve.max_replicas_per_node), not by `replica_slot`. `monitor`: more
        `monitor:` settings for the endpoint (e.g. on_drift: retrain)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.num_replicas, self.workers, self.rows_per_file = num_replicas, workers, rows_per_file
        self.train_slots, self.spread, self.monitor_extra = train_slots, spread, dict(monitor or {})
        self.cluster = None

    # ----- the cluster -----
    def __enter__(self) -> ChaosRig:
        import ray
        from ray.cluster_utils import Cluster

        from serve.apikey import API_TOKEN_ENV, API_TOKEN_FILE_ENV, client_api_key, ensure_api_key
        from serve.ingress import apply_ingress_env, free_port

        os.environ.pop("RAY_ADDRESS", None)
        # three nodes start on one machine: a busy box can take longer than Ray's 30 s for a GCS to bind
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        if not (os.environ.get(API_TOKEN_ENV) or os.environ.get(API_TOKEN_FILE_ENV)):
            ensure_api_key(self.root / "api_key")
        self.api_key = client_api_key()
        apply_ingress_env()
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.metrics_port = free_port()  # the head's Prometheus endpoint (what a scrape config names)
        head = {"replica_slot": 1} if self.workers else {"replica_slot": self.num_replicas, "monitor_node": 1}
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=2 if self.workers else 4, resources=head, include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=int(self.dashboard.rsplit(":", 1)[1]), metrics_export_port=self.metrics_port,
            dashboard_agent_listen_port=free_port()))
        if self.workers:
            self.w1 = self.add_node(resources={**W1_RESOURCES, "train_slot": self.train_slots})
            self.w2 = self.add_node(resources={"train_slot": self.train_slots, "job_node": 1})
        # every "auto" lookup in this process (Ray's state API, a library's own ray.init) must find THIS
        # cluster: with another Ray on the machine, Ray picks the most recently started one
        os.environ["RAY_ADDRESS"] = self.cluster.address
        ray.init(address=self.cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_ADDRESS": self.cluster.address}})
        return self

    def __exit__(self, *exc) -> None:
        import ray

        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        if self.cluster is not None:
            self.cluster.shutdown()
        Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)  # Cluster wrote it; it names a dead cluster now

    def add_node(self, resources: dict):
        """A worker node of 2 CPUs. Each node's dashboard agent gets its own port: on one machine they would
        all take Ray's default 52365 (so would the session's cluster beside a test's), and the Jobs API, which
        submits through the head's agent, answers "No available agent" when the head's lost that race."""
        from serve.ingress import free_port

        return self.cluster.add_node(num_cpus=2, resources=resources, dashboard_agent_listen_port=free_port())

    def add_worker(self):
        """A node like w1 (as an autoscaler brings one after a node loss)."""
        return self.add_node(dict(W1_RESOURCES))

    # ----- the endpoint -----
    def deploy(self) -> str:
        import ray
        from helpers.serving import MODEL, make_registry
        from ray import serve

        from raysys.config import preset
        from raysys.data.schema import schema_to_dict
        from raysys.monitor import get_or_create_monitor
        from serve.contract import app_config
        from serve.ingress import free_port
        from serve.rollout import ServeAdmin, deploy_app

        self.reg, self.schema, self.rows = make_registry(self.root)
        cfg = preset("tiny").with_root(self.root)
        cfg.registry_uri, cfg.model_name = self.reg.uri, MODEL
        self.http = free_port()
        cfg.serve = cfg.serve.model_copy(update=dict(app_name=APP, route_prefix=f"/{APP}", port=self.http,
                                                     num_replicas=self.num_replicas,
                                                     max_replicas_per_node=1 if self.spread else None))
        mon = dict(snapshot_uri=str(self.root / "monitor-snapshots"), snapshot_interval_s=1.0)
        if self.rows_per_file:
            mon.update(traffic_uri=str(self.root / "traffic"), traffic_rows_per_file=self.rows_per_file)
        cfg.monitor = cfg.monitor.model_validate({**cfg.monitor.model_dump(), **mon, **self.monitor_extra})
        self.monitor_cfg = cfg.monitor
        app = app_config(cfg)
        app["args"]["monitor_name"] = MONITOR
        if not self.spread:
            app["deployments"][0]["ray_actor_options"] = {"resources": {"replica_slot": 1}}
        # the monitor the replicas would create, created first so that it lives on w1 (the node with
        # `monitor_node`; after w1's loss, on its replacement), with the very arguments the replicas pass
        loaded = self.reg.load(MODEL, "production")
        self.monitor = get_or_create_monitor(
            MONITOR, "raysys", profile=loaded.reference_profile, schema=schema_to_dict(loaded.schema),
            monitor_cfg=cfg.monitor.model_dump(), model_version=loaded.version,
            actor_options={"resources": {"monitor_node": 1}})
        ray.get(self.monitor.ping.remote(), timeout=60)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.http})
        deploy_app(ServeAdmin(self.dashboard), app)
        self.url = f"http://127.0.0.1:{self.http}/{APP}"
        self.registry_digest = tree_digest(Path(self.reg.root))
        return self.url

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}

    # ----- what runs where -----
    def actors(self, prefix: str) -> list:
        from ray.util.state import list_actors

        # the address named: the harness must never see (and so never kill) another cluster's actors
        return [a for a in list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
                if a.class_name.startswith(prefix)]

    def replicas(self) -> list:
        return self.actors(f"ServeReplica:{APP}:")

    def running_replicas(self) -> int:
        from ray import serve

        st = serve.status().applications.get(APP)
        if st is None or st.status != "RUNNING":
            return 0
        return sum(d.replica_states.get("RUNNING", 0) for d in st.deployments.values())

    def haproxy_pids(self) -> list[int]:
        """The HAProxy processes of this cluster: the children of its HAProxyManager actor."""
        return [p for a in self.actors("HAProxyManager") for p in children(a.pid)
                if Path(f"/proc/{p}/comm").read_text().strip() == "haproxy"]

    def scrape(self) -> dict[str, list[str]]:
        """The `ray_raysys_*` series the head node exports to Prometheus now, each with its label names."""
        import re

        import requests

        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        out: dict[str, set] = {}
        for m in re.finditer(r"^(ray_raysys_[a-zA-Z0-9_]+)(?:\{([^}]*)\})? ", text, re.M):
            labels = {kv.split("=", 1)[0] for kv in (m.group(2) or "").split(",") if "=" in kv}
            out.setdefault(m.group(1), set()).update(labels)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def monitor_report(self, timeout_s: float = 10) -> dict:
        import ray

        return ray.get(self.monitor.report.remote(), timeout=timeout_s)
