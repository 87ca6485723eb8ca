"""The monitor as a Ray actor: one named, detached `MonitorActor` per deployment that the serving replicas
send `record(batch)` to, fire-and-forget. The actor is the plain `Monitor` (`raysys.monitor.core`) plus the
`raysys_*` dashboard metrics (`raysys.monitor.metrics`)."""

from __future__ import annotations

import ray

from raysys.monitor.core import Monitor
from raysys.monitor.metrics import dashboard_metrics

# num_cpus=0: the monitor must never take a CPU that training or serving needs; max_restarts=-1: a
# crashed monitor comes back (restored from its snapshot when monitor.snapshot_uri is set)
MonitorActor = ray.remote(num_cpus=0, max_restarts=-1)(Monitor)


def get_or_create_monitor(name: str = "raysys_monitor", namespace: str = "raysys", **init_kwargs):
    """The named, detached monitor actor: created on first call, the same handle afterwards.

    `init_kwargs` (profile, schema, monitor_cfg, model_version) are used only when the actor is
    created; call `handle.set_profile.remote(...)` to point an existing monitor at a new model version.
    Detached: it outlives the job that made it; end it with `ray.kill(handle)`.
    """
    init_kwargs.setdefault("snapshot_key", f"{namespace}-{name}")
    init_kwargs.setdefault("metrics", dashboard_metrics)
    return MonitorActor.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
                                max_restarts=-1, num_cpus=0).remote(**init_kwargs)
