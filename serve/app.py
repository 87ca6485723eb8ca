"""The Ray Serve application: `build_app` (the `serve run` / `serve deploy` import path
`serve.app:build_app`, see serve/config.yaml) and `deploy` (used by the pipeline and `raysys serve`)."""

from __future__ import annotations

import logging
import time

from ray import serve

from raysys.config import PipelineConfig, ServeConfig
from serve.contract import app_config, check_replica_gpus, deployment_options, parse_app_args, replica_options
from serve.endpoint import StudentEndpoint
from serve.ingress import serve_start
from serve.rollout import ServeAdmin, cluster_dashboard_url, deploy_app

log = logging.getLogger("ray.serve")


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run serve.app:build_app registry_uri=...` and for config files
    (`import_path: serve.app:build_app` with `args:`). See `serve.contract.parse_app_args` for the keys."""
    kwargs = parse_app_args(args)
    scfg = ServeConfig.model_validate(kwargs["serve_cfg"])
    options = {**replica_options(scfg), **deployment_options(scfg)}
    return StudentEndpoint.options(**options).bind(**kwargs)


def _serve_http_address() -> tuple[str, int]:
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return http.host, int(http.port)


def deploy(cfg: PipelineConfig, *, blocking: bool = False, model_ref: str | int = "production",
           monitor: bool = True) -> str:
    """Start Serve (HTTP on cfg.serve.host:port) and run the endpoint for cfg.model_name from
    cfg.registry_uri as application cfg.serve.app_name at cfg.serve.route_prefix. Returns the base URL
    (`http://host:port/prefix`). `blocking=True` waits until Ctrl-C after deploying.

    Serve's HTTP options are fixed when Serve first starts on a cluster: if it is already running on
    another address, that address is kept (with a warning) and returned.
    """
    import ray

    serve_start(cfg.serve.host, cfg.serve.port)  # joins (or starts) Ray
    check_replica_gpus(cfg.serve, ray.cluster_resources())  # before Serve would leave replicas pending for GPUs
    host, port = _serve_http_address()
    if (host, port) != (cfg.serve.host, cfg.serve.port):
        log.warning("raysys: Serve already runs on %s:%d; serve.host/serve.port (%s:%d) are ignored", host, port,
                    cfg.serve.host, cfg.serve.port)
    application = app_config(cfg, model_ref=model_ref, monitor=monitor)
    dashboard = cluster_dashboard_url()
    if dashboard:
        # declarative, as `serve deploy` does: later `raysys serve canary/promote/rollback` update it in place
        deploy_app(ServeAdmin(dashboard), application)
    else:
        log.warning("raysys: this Ray cluster has no dashboard, so the endpoint is deployed from Python "
                    "(serve.run) and `raysys serve canary/promote/rollback` cannot update it in place")
        serve.run(build_app(application["args"]), name=application["name"],
                  route_prefix=application["route_prefix"])
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{url_host}:{port}{cfg.serve.route_prefix.rstrip('/')}"
    log.info("raysys: %s serving %s at %s", cfg.serve.app_name, cfg.model_name, url)
    if blocking:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return url
