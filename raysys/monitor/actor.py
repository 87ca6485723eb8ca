"""The monitor as a Ray actor: one named, detached `MonitorActor` per deployment that the serving replicas
send `record(batch)` to, fire-and-forget. The actor is the plain `Monitor` (`raysys.monitor.core`) plus the
`raysys_*` dashboard metrics (`raysys.monitor.metrics`)."""

from __future__ import annotations

import ray

from raysys.config import MonitorConfig
from raysys.monitor.core import Monitor
from raysys.monitor.metrics import dashboard_metrics

# num_cpus=0: the monitor must never take a CPU that training or serving needs; max_restarts=-1: a
# crashed monitor comes back (restored from its snapshot when monitor.snapshot_uri is set); max_task_retries=-1:
# the replicas' fire-and-forget `record` calls made while it restarts wait for it instead of failing, so only the
# rows since its last snapshot are lost (benchmarks/chaos.py, monitor scenario: 162 rows of ~4 s lost without it)
MONITOR_ACTOR_OPTIONS = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}
MonitorActor = ray.remote(**MONITOR_ACTOR_OPTIONS)(Monitor)


def get_or_create_monitor(name: str = "raysys_monitor", namespace: str = "raysys", *,
                          actor_options: dict | None = None, **init_kwargs):
    """The named, detached monitor actor: created on first call, the same handle afterwards.

    `init_kwargs` (profile, schema, monitor_cfg, model_version) are used only when the actor is
    created; call `handle.set_profile.remote(...)` to point an existing monitor at a new model version.
    Detached: it outlives the job that made it; end it with `ray.kill(handle)`. `actor_options`: more Ray actor
    options for its creation (e.g. a `scheduling_strategy` that places it on a node).
    """
    init_kwargs.setdefault("snapshot_key", f"{namespace}-{name}")
    init_kwargs.setdefault("metrics", dashboard_metrics)
    options = monitor_actor_options(actor_options, init_kwargs.get("monitor_cfg"))
    return MonitorActor.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
                                **options).remote(**init_kwargs)


def monitor_actor_options(actor_options: dict | None, monitor_cfg: dict | None) -> dict:
    """MONITOR_ACTOR_OPTIONS, then `actor_options`, with monitor.malloc_arena_max in the runtime_env's env_vars
    (glibc reads it when the actor's process starts; a value the caller's env_vars set wins)."""
    options = {**MONITOR_ACTOR_OPTIONS, **(actor_options or {})}
    arenas = MonitorConfig.model_validate(monitor_cfg or {}).malloc_arena_max
    if arenas is not None:
        runtime_env = dict(options.get("runtime_env") or {})
        runtime_env["env_vars"] = {"MALLOC_ARENA_MAX": str(arenas), **(runtime_env.get("env_vars") or {})}
        options["runtime_env"] = runtime_env
    return options
