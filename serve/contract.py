"""The deployment contract, Ray-free: the names, the application args and the `user_config` the endpoint
accepts, the deployment options that come from ServeConfig, and the Serve application config they make.

Both sides read it: `serve.app:build_app` (which the replicas run) and the rollout admin (which edits a
deployed application's `user_config`), so a value the admin writes is validated exactly as a replica will.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from raysys.config import MonitorConfig, ServeConfig

DEPLOYMENT_NAME = "StudentEndpoint"
IMPORT_PATH = "serve.app:build_app"
DEFAULT_MODEL_NAME = "raysys-student"
DEFAULT_MONITOR_NAME = "raysys_monitor"
DEFAULT_MONITOR_NAMESPACE = "raysys"

# rollout_generation: bumped by every `serve.rollout` change (its compare-and-swap); replicas ignore it
USER_CONFIG_KEYS = ("model_ref", "model_version", "candidate_ref", "canary_percent", "shadow", "canary_deadline",
                    "max_batch_size", "batch_wait_timeout_s", "rollout_generation")
APP_ARG_KEYS = ("registry_uri", "model_name", "model_ref", "serve_cfg", "monitor_cfg", "monitor", "monitor_name",
                "monitor_namespace", "torch_threads")


def check_ref(where: str, ref: Any) -> str | int:
    """An alias name or a version number (>= 1); ValueError naming `where` otherwise."""
    if isinstance(ref, bool) or not isinstance(ref, (str, int)) or (isinstance(ref, str) and not ref.strip()):
        raise ValueError(f"{where}: must be an alias name ('production', 'latest') or a version number, got {ref!r}")
    if isinstance(ref, int) and ref < 1:
        raise ValueError(f"{where}: versions start at 1, got {ref}")
    return ref


def _number(where: str, v: Any, *, minimum: float, maximum: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not minimum <= v <= maximum:
        bound = f"from {minimum:g} to {maximum:g}" if math.isfinite(maximum) else f">= {minimum:g}"
        raise ValueError(f"{where}: must be a number {bound}, got {v!r}")
    return float(v)


def _stable_ref(user_config: dict[str, Any]) -> dict[str, Any]:
    if "model_ref" in user_config and "model_version" in user_config:
        raise ValueError("user_config: give model_ref or model_version, not both")
    if "model_ref" in user_config:
        return {"model_ref": check_ref("user_config.model_ref", user_config["model_ref"])}
    if "model_version" in user_config:
        v = user_config["model_version"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"user_config.model_version: must be a version number >= 1, got {v!r}")
        return {"model_ref": v}
    return {}


def _canary(user_config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "candidate_ref" in user_config:
        ref = user_config["candidate_ref"]
        out["candidate_ref"] = None if ref is None else check_ref("user_config.candidate_ref", ref)
    if "canary_percent" in user_config:
        out["canary_percent"] = _number("user_config.canary_percent", user_config["canary_percent"], minimum=0,
                                        maximum=100)
    if "shadow" in user_config:
        if not isinstance(user_config["shadow"], bool):
            raise ValueError(f"user_config.shadow: must be true or false, got {user_config['shadow']!r}")
        out["shadow"] = user_config["shadow"]
    if "canary_deadline" in user_config:  # epoch seconds; None: the canary runs until promoted or rolled back
        d = user_config["canary_deadline"]
        out["canary_deadline"] = None if d is None else _number("user_config.canary_deadline", d, minimum=0)
    if out.get("canary_percent") and out.get("candidate_ref", "unset") is None:
        raise ValueError("user_config.canary_percent: a canary needs user_config.candidate_ref (alias or version)")
    return out


def _batching(user_config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "max_batch_size" in user_config:
        v = user_config["max_batch_size"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"user_config.max_batch_size: must be an integer >= 1, got {v!r}")
        out["max_batch_size"] = v
    if "batch_wait_timeout_s" in user_config:
        out["batch_wait_timeout_s"] = _number("user_config.batch_wait_timeout_s", user_config["batch_wait_timeout_s"],
                                              minimum=0)
    return out


def parse_user_config(user_config: Any) -> dict[str, Any]:
    """Validate a deployment `user_config`: {"model_ref": alias|version} or {"model_version": N} (the stable
    version), optional "candidate_ref" (alias|version|None) + "canary_percent" (0..100: the share of requests
    the candidate scores) + "shadow" (bool: the candidate scores a copy, the stable version answers) +
    "canary_deadline" (epoch seconds after which the candidate takes no traffic), "max_batch_size" and
    "batch_wait_timeout_s". Returns {"model_ref": ..., ...} (only
    the keys given). Raises ValueError naming the key."""
    if user_config is None:
        return {}
    if not isinstance(user_config, dict):
        raise ValueError(f"user_config: must be a mapping such as {{'model_ref': 'production'}}, "
                         f"got {type(user_config).__name__}")
    unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"user_config.{unknown[0]}: unknown key; allowed keys are {list(USER_CONFIG_KEYS)}")
    gen = user_config.get("rollout_generation", 0)
    if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
        raise ValueError(f"user_config.rollout_generation: must be an integer >= 0 (raysys serve canary/promote/"
                         f"rollback set it), got {gen!r}")
    return {**_stable_ref(user_config), **_canary(user_config), **_batching(user_config)}


def resolve_registry_uri(uri: str | Path) -> str:
    """A URI (`s3://...`) unchanged; a local path made absolute against THIS process's cwd.

    Resolved once, in the process that builds the application (the `serve run` shell, the `raysys` CLI,
    or for `serve deploy` the cluster's build task, whose cwd is where `ray start` ran or the runtime_env
    working_dir), so every replica reads the same directory wherever its own cwd is.
    """
    uri = str(uri)
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def _validated(where: str, model: Any, value: Any) -> Any:
    try:
        return model.model_validate(value or {})
    except Exception as e:
        raise ValueError(f"{where}: {e}") from None


def parse_app_args(args: dict[str, Any] | None) -> dict[str, Any]:
    """`build_app` args -> `StudentEndpoint` constructor kwargs, validated (errors name the key).

    Keys: registry_uri (required), model_name, model_ref, serve_cfg (ServeConfig fields), monitor_cfg
    (MonitorConfig fields), monitor (bool), monitor_name, monitor_namespace, torch_threads.
    """
    args = dict(args or {})
    unknown = sorted(set(args) - set(APP_ARG_KEYS))
    if unknown:
        raise ValueError(f"args.{unknown[0]}: unknown key; allowed keys are {list(APP_ARG_KEYS)}")
    if not args.get("registry_uri"):
        raise ValueError("args.registry_uri: required (a registry directory such as runs/registry, or a "
                         "pyarrow.fs URI such as s3://bucket/registry)")
    serve_cfg = _validated("args.serve_cfg", ServeConfig, args.get("serve_cfg"))
    monitor_cfg = _validated("args.monitor_cfg", MonitorConfig, args.get("monitor_cfg"))
    monitor = args.get("monitor", True)
    if not isinstance(monitor, bool):
        raise ValueError(f"args.monitor: must be true or false, got {monitor!r}")
    threads = args.get("torch_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"args.torch_threads: must be an integer >= 1, got {threads!r}")
    return {
        "registry_uri": resolve_registry_uri(args["registry_uri"]),
        "model_name": str(args.get("model_name") or DEFAULT_MODEL_NAME),
        "model_ref": check_ref("args.model_ref", args.get("model_ref", "production")),
        "serve_cfg": serve_cfg.model_dump(),
        "monitor_cfg": monitor_cfg.model_dump(),
        "monitor": monitor,
        "monitor_name": str(args.get("monitor_name") or DEFAULT_MONITOR_NAME),
        "monitor_namespace": str(args.get("monitor_namespace") or DEFAULT_MONITOR_NAMESPACE),
        "torch_threads": threads,
    }


def replica_options(scfg: ServeConfig) -> dict[str, Any]:
    """`num_replicas`, or `autoscaling_config` when serve.autoscaling is set; `max_replicas_per_node` when set."""
    out = ({"autoscaling_config": scfg.autoscaling.model_dump()} if scfg.autoscaling is not None
           else {"num_replicas": scfg.num_replicas})
    if scfg.max_replicas_per_node is not None:
        out["max_replicas_per_node"] = scfg.max_replicas_per_node
    return out


def deployment_options(scfg: ServeConfig) -> dict[str, Any]:
    """The StudentEndpoint deployment options that come from ServeConfig (beside num_replicas)."""
    return {
        # a replica must admit enough concurrent requests to fill a batch while the previous one runs
        "max_ongoing_requests": scfg.max_ongoing_requests or max(8, 2 * scfg.max_batch_size),
        # beyond this queue a request gets 503 + Retry-After at once rather than waiting without bound
        "max_queued_requests": scfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": scfg.retry_after_s},
        "logging_config": {"enable_access_log": scfg.access_log},
        **replica_actor_options(scfg),
    }


def replica_actor_options(scfg: ServeConfig) -> dict[str, Any]:
    """The deployment's ray_actor_options from ServeConfig: its GPUs (serve.num_gpus) and its process environment
    (`replica_env`); {} when neither is set."""
    actor: dict[str, Any] = {}
    if scfg.num_gpus:
        actor["num_gpus"] = scfg.num_gpus
    if env := replica_env(scfg):
        actor["runtime_env"] = {"env_vars": env}
    return {"ray_actor_options": actor} if actor else {}


def check_replica_gpus(scfg: ServeConfig, cluster: dict[str, float]) -> None:
    """ValueError naming serve.num_gpus when the cluster's resources (`ray.cluster_resources()`) cannot hold every
    replica's GPUs: Serve would otherwise leave them pending forever."""
    if not scfg.num_gpus:
        return
    replicas = scfg.autoscaling.min_replicas if scfg.autoscaling is not None else scfg.num_replicas
    need, have = scfg.num_gpus * replicas, float(cluster.get("GPU", 0.0))
    if need > have:
        raise ValueError(f"serve.num_gpus: {replicas} replica(s) x {scfg.num_gpus:g} GPU need {need:g} GPUs, but this "
                         f"Ray cluster has {have:g}; set serve.num_gpus: 0 to score on CPUs (the default; a small "
                         "student is usually faster there) or join a cluster with GPU nodes")


def replica_env(scfg: ServeConfig) -> dict[str, str]:
    """Environment variables each replica's process must start with, from ServeConfig: glibc reads
    MALLOC_ARENA_MAX once, when the process starts, so it goes in a runtime_env (Ray sets it before the replica's
    process runs). `deployment_options` puts it in the deployment's ray_actor_options (apps built in Python);
    `app_config` in the application's runtime_env as well, which Serve merges into every deployment's env_vars
    even where a config file gives the deployment ray_actor_options of its own (which replace the former)."""
    return {} if scfg.malloc_arena_max is None else {"MALLOC_ARENA_MAX": str(scfg.malloc_arena_max)}


def app_config(cfg: Any, *, model_ref: str | int = "production", monitor: bool = True) -> dict[str, Any]:
    """The Serve application config (a `serve deploy` YAML's `applications:` entry) for a PipelineConfig: the
    same application `serve/config.yaml` describes, with the registry path made absolute."""
    app = {
        "name": cfg.serve.app_name,
        "route_prefix": cfg.serve.route_prefix,
        "import_path": IMPORT_PATH,
        "args": {"registry_uri": resolve_registry_uri(cfg.registry_uri), "model_name": cfg.model_name,
                 "model_ref": model_ref, "serve_cfg": cfg.serve.model_dump(), "monitor_cfg": cfg.monitor.model_dump(),
                 "monitor": monitor},
        "deployments": [{"name": DEPLOYMENT_NAME, **replica_options(cfg.serve),
                         "user_config": {"model_ref": model_ref, "candidate_ref": None, "canary_percent": 0}}],
    }
    if env := replica_env(cfg.serve):
        app["runtime_env"] = {"env_vars": env}
    return app
