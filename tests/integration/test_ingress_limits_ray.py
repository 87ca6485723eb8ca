"""Tier 3 (issue 21, ingress limits), on the session's local Ray behind the shipped HAProxy ingress over real
HTTP: one replica of the endpoint, monitored.

- Slowloris: a few hundred sockets trickle request-header bytes to HAProxy's port while a normal client posts
  /v1/predict. Every normal request succeeds, and HAProxy closes every slow socket (a 408, or a reset) within
  its `timeout http-request` (raysys sets it, `serve.ingress`; Ray sets none) plus a margin, though each keeps
  sending: neither `timeout client` (30 s, reset by every byte) nor anything else would close them.
- Flood: /v1/monitor and /v1/feedback hammered concurrently while /v1/predict requests go on: every prediction
  succeeds, the replica never works on more monitor/feedback requests than serve.max_ongoing_monitor_requests,
  and the ones past it get 503 + Retry-After at once.

Tests never time things: the latencies are reported, not asserted; what is asserted is success, and that the
slow sockets are closed within a bounded wait. Every loop is bounded in count and time; every socket is closed.
"""

from __future__ import annotations

import resource
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers.serving import MODEL, kill_monitor, make_registry, poll, serve_http_port

pytestmark = pytest.mark.integration

NUM_SLOW_SOCKETS = 200
TRICKLE_EVERY_S = 1.0  # far below `timeout client` (30 s): only `timeout http-request` can close the sockets
CLOSE_MARGIN_S = 10.0  # on top of the http-request timeout: a loaded 2-core box, HAProxy's timer granularity
MONITOR_LIMIT = 2  # serve.max_ongoing_monitor_requests of the test app: small, so that a modest flood passes it
NO_KEY = {"Authorization": None}


def _http_request_timeout_s() -> int:
    """HAProxy's `timeout http-request` in the environment the session's Ray started with (apply_ingress_env
    put it in os.environ); skips when there is no HAProxy or no such line."""
    import os

    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        pytest.skip("no HAProxy ingress in this session (RAYSYS_SERVE_INGRESS=proxy)")
    for line in os.environ.get("RAY_SERVE_HAPROXY_RETRY_ON", "").split("\n"):
        words = line.split()
        if words[:2] == ["timeout", "http-request"]:
            return int(words[2].rstrip("s"))
    pytest.skip("RAY_SERVE_HAPROXY_RETRY_ON set by the user without raysys's `timeout http-request` line")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, request, ray_cluster):
    from ray import serve

    from serve.app import build_app

    reg, _, rows = make_registry(tmp_path_factory.mktemp("ingress_limits"))
    port = serve_http_port(request)
    name = f"limits-{uuid.uuid4().hex[:6]}"
    monitor = f"raysys_monitor_{name}"
    serve.run(build_app({"registry_uri": reg.uri, "model_name": MODEL, "monitor_name": monitor,
                         "serve_cfg": {"num_replicas": 1, "max_ongoing_monitor_requests": MONITOR_LIMIT},
                         "monitor_cfg": {"window_size": 100, "min_rows": 10}}),
              name=name, route_prefix=f"/{name}")
    try:
        yield {"port": port, "url": f"http://127.0.0.1:{port}/{name}", "prefix": f"/{name}", "rows": rows}
    finally:
        serve.delete(name)
        kill_monitor(monitor)


class Predictor:
    """One thread posting one-row predictions back to back (one keep-alive session) until stopped or `max_requests`
    were sent; records each status (None: no response) and latency."""

    def __init__(self, url: str, rows: list[dict], max_requests: int = 10_000):
        self.url, self.rows, self.max_requests = url, rows, max_requests
        self.statuses: list[int | None] = []
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as s:
            for k in range(self.max_requests):
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                try:
                    # the client's own timeout bounds every request: a hung one fails the test
                    r = s.post(f"{self.url}/v1/predict", json={"instances": [self.rows[k % len(self.rows)]]},
                               timeout=30)
                    self.statuses.append(r.status_code)
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code}: {r.text[:200]}")
                except requests.RequestException as e:
                    self.statuses.append(None)
                    self.errors.append(f"{type(e).__name__}: {e}")
                self.latencies_ms.append((time.perf_counter() - t0) * 1000)

    def __enter__(self) -> Predictor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None
        return {"requests": len(self.statuses), "non_200": len([s for s in self.statuses if s != 200]),
                "p50_ms": lat[len(lat) // 2] if lat else None, "p99_ms": p99, "errors": self.errors[:5]}


def _open_slow_sockets(port: int, path: str, n: int) -> list[socket.socket]:
    socks = []
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(head)  # the request line and a few headers, never the blank line that ends them
        s.setblocking(False)
        socks.append(s)
    return socks


def _trickle_until_closed(socks: list[socket.socket], opened: list[float], deadline: float) -> dict[int, tuple]:
    """Send each open socket one more header line every TRICKLE_EVERY_S until the server closes it (EOF, reset)
    or `deadline`. Returns {index: (seconds from its opening to its close, first bytes the server sent)}."""
    closed: dict[int, tuple[float, bytes]] = {}
    got: dict[int, bytes] = {}
    k = 0
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                while True:  # drain what the server sent (a 408 before it closes)
                    data = s.recv(4096)
                    if not data:
                        raise ConnectionResetError("EOF")
                    got[i] = got.get(i, b"") + data
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = (time.monotonic() - opened[i], got.get(i, b""))
                continue
            try:
                s.send(f"X-Slow-{k}: {'a' * 8}\r\n".encode())
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = (time.monotonic() - opened[i], got.get(i, b""))
        k += 1
        time.sleep(min(TRICKLE_EVERY_S, max(0.0, deadline - time.monotonic())))
    return closed


def test_slowloris_sockets_are_cut_at_the_http_request_timeout_and_predictions_go_on(endpoint):
    timeout_s = _http_request_timeout_s()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(NUM_SLOW_SOCKETS, soft // 4)  # leave file descriptors to everything else in this process
    with requests.Session() as s:  # the endpoint answers before the attack
        r = s.post(f"{endpoint['url']}/v1/predict", json={"instances": endpoint["rows"][:1]}, timeout=30)
        assert r.status_code == 200, r.text
    socks: list[socket.socket] = []
    try:
        with Predictor(endpoint["url"], endpoint["rows"]) as normal:
            t0 = time.monotonic()
            socks = _open_slow_sockets(endpoint["port"], f"{endpoint['prefix']}/v1/predict", n)
            opened = [t0] * len(socks)  # before the first was opened: the close times are upper bounds
            closed = _trickle_until_closed(socks, opened, deadline=time.monotonic() + timeout_s + CLOSE_MARGIN_S)
            poll(lambda: len(normal.statuses) >= 20, timeout_s=60, interval_s=0.1, what="normal predictions")
        summary = normal.summary()
        print(f"slowloris: {n} sockets, http-request timeout {timeout_s}s, closed {len(closed)}; "
              f"close after s (min/max): {min((c[0] for c in closed.values()), default=None)}/"
              f"{max((c[0] for c in closed.values()), default=None)}; normal client {summary}")
        # every normal request succeeded, slowloris or not
        assert summary["requests"] >= 20 and summary["non_200"] == 0, summary
        # every slow socket was closed by the server within the timeout + margin, though it kept sending
        still_open = len(socks) - len(closed)
        assert still_open == 0, f"{still_open} of {len(socks)} slow sockets still open after {timeout_s + CLOSE_MARGIN_S}s"
        answered = [c[1] for c in closed.values() if c[1]]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answered), {a[:40] for a in answered}
    finally:
        for s in socks:
            s.close()


FLOOD_WORKERS = 12
FLOOD_REQUESTS_PER_WORKER = 15
FLOOD_PAUSE_AFTER_503_S = 0.2  # a little less eager than Retry-After asks: the flood goes on for seconds


def _flood_worker(url: str, i: int, deadline: float) -> list[tuple[str, int | None, str | None]]:
    """/v1/monitor and /v1/feedback requests in turn (feedback for an unknown id: the endpoint asks the monitor
    twice, a flush interval apart, before its 404, so each one holds its slot for over a second), at most
    FLOOD_REQUESTS_PER_WORKER of them and none after `deadline`. Returns (route, status, Retry-After) each."""
    out: list[tuple[str, int | None, str | None]] = []
    with requests.Session() as s:
        for k in range(FLOOD_REQUESTS_PER_WORKER):
            if time.monotonic() > deadline:
                break
            route = "monitor" if (i + k) % 2 else "feedback"
            try:
                if route == "monitor":
                    r = s.get(f"{url}/v1/monitor", timeout=30)
                else:
                    r = s.post(f"{url}/v1/feedback", json={"request_id": f"flood-{i}-{k}", "label": 0}, timeout=30)
            except requests.RequestException as e:
                out.append(("error", None, f"{type(e).__name__}: {e}"))
                continue
            out.append((route, r.status_code, r.headers.get("retry-after")))
            if r.status_code == 503:
                time.sleep(FLOOD_PAUSE_AFTER_503_S)
    return out


def test_a_monitor_and_feedback_flood_is_bounded_and_predictions_go_on(endpoint):
    url = endpoint["url"]
    with requests.Session() as s:
        r = s.post(f"{url}/v1/predict", json={"instances": endpoint["rows"][:5]}, timeout=30)
        assert r.status_code == 200, r.text
        poll(lambda: s.get(f"{url}/v1/monitor", timeout=30).status_code == 200, timeout_s=60,
             what="the monitor actor answering")
    deadline = time.monotonic() + 8
    with Predictor(url, endpoint["rows"]) as normal:
        with ThreadPoolExecutor(max_workers=FLOOD_WORKERS) as pool:
            flood = [f for part in pool.map(lambda i: _flood_worker(url, i, deadline), range(FLOOD_WORKERS))
                     for f in part]
        poll(lambda: len(normal.statuses) >= 20, timeout_s=60, interval_s=0.1, what="normal predictions")
    summary = normal.summary()
    statuses: dict[tuple[str, int | None], int] = {}
    for route, status, _ in flood:
        statuses[(route, status)] = statuses.get((route, status), 0) + 1
    print(f"flood: {statuses}; normal client {summary}")
    assert summary["requests"] >= 20 and summary["non_200"] == 0, summary
    errors = [f for f in flood if f[0] == "error"]
    assert not errors, errors[:5]
    # each answer is the route's own (200 report, 404 unknown id) or the bound's 503, which carries Retry-After
    allowed = {("monitor", 200), ("feedback", 404), ("monitor", 503), ("feedback", 503)}
    assert set(statuses) <= allowed, statuses
    refused = [f for f in flood if f[1] == 503]
    assert refused, f"{FLOOD_WORKERS} concurrent clients never passed a bound of {MONITOR_LIMIT}: {statuses}"
    assert all(f[2] == "1" for f in refused), refused[:5]
    # the replica counted the same: never more than the bound in flight, and nothing left holding a slot
    with requests.Session() as s:
        health = s.get(f"{url}/healthz", headers=NO_KEY, timeout=30).json()
    limits = health["monitor_requests"]
    assert limits["limit"] == MONITOR_LIMIT and limits["peak"] == MONITOR_LIMIT, limits
    assert limits["refused"] >= len(refused) and limits["in_flight"] == 0, limits
