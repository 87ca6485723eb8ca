"""The chaos/soak benchmarks' load generator against a local HTTP server that misbehaves on purpose: which
answers it retries (no answer, 502/503/504, an ingress's plain-text 404) and which it does not (raysys's own
JSON 404), how it counts them, and the soak's memory slope."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import REPO

pytest.importorskip("aiohttp")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import _chaos_load
    import soak

    return _chaos_load, soak


class Script(BaseHTTPRequestHandler):
    """Answers /v1/predict by the request's row: {"mode": "flaky"} fails twice (503, then a plain 404) and then
    answers; "ingress500" once with HAProxy's plain 500; "json404" / "app500" are raysys's own JSON errors;
    anything else a 200. Feedback is taken with 202."""

    seen: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/v1/feedback"):
            Script.seen.setdefault("feedback", []).extend(body["feedback"])
            return self._send(202, b"{}", "application/json")
        mode = body["instances"][0]["mode"]
        n = Script.seen[(mode, body.get("request_id"))] = Script.seen.get((mode, body.get("request_id")), 0) + 1
        if mode == "flaky" and n == 1:
            return self._send(503, b"busy", "text/plain")
        if mode == "flaky" and n == 2:
            return self._send(404, b"Path '/x' not found.", "text/plain")
        if mode == "json404":
            return self._send(404, b'{"detail": "nope"}', "application/json")
        if mode == "ingress500" and n == 1:  # Ray's HAProxy errorfile: no server available
            return self._send(500, b"Internal Server Error", "text/plain")
        if mode == "app500":
            return self._send(500, b'{"detail": {"model_version": 2}}', "application/json")
        return self._send(200, json.dumps({"predictions": ["a"]}).encode(), "application/json")


def test_open_load_retries_what_is_safe_and_counts_the_rest(bench):
    load_mod, _ = bench
    Script.seen = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Script)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        rows = [{"mode": "ok"}, {"mode": "flaky"}, {"mode": "json404"}, {"mode": "ingress500"}, {"mode": "app500"}]
        with load_mod.OpenLoad(url, rows, rate=30, retry_wait_s=0.01, feedback_every_s=0.2) as load:
            time.sleep(1.5)
        time.sleep(0.3)
    finally:
        server.shutdown()
    recs = load.records
    modes = ["ok", "flaky", "json404", "ingress500", "app500"]
    by_mode = {m: [r for i, r in enumerate(sorted(recs, key=lambda r: r.sent)) if i % len(modes) == k]
               for k, m in enumerate(modes)}
    assert all(r.status == 200 and r.tries == 1 for r in by_mode["ok"])
    assert all(r.status == 200 and r.tries == 3 and r.not_ready == 1 for r in by_mode["flaky"])
    assert all(r.status == 404 and r.tries == 1 for r in by_mode["json404"])  # raysys's own answer: not retried
    assert all(r.status == 200 and r.tries == 2 and r.not_ready == 1 for r in by_mode["ingress500"])
    assert all(r.status == 500 and r.tries == 1 for r in by_mode["app500"])  # a version failed: not retried
    s = load_mod.OpenLoad.summary(recs)
    assert s["failed_by_status"] == {"404": len(by_mode["json404"]), "500": len(by_mode["app500"])}
    assert s["retried"] == s["ingress_not_ready"] == len(by_mode["flaky"]) + len(by_mode["ingress500"])
    # the answered requests were labelled with their predicted class, through /v1/feedback
    assert Script.seen["feedback"] and all(f["label"] == "a" for f in Script.seen["feedback"])
    assert set(load.feedback) == {"202"}


def test_soak_slope_is_mb_per_minute(bench):
    _, soak = bench
    pts = [(t, 100 + 0.5 * t) for t in range(0, 120, 5)]  # 0.5 MB/s = 30 MB/min
    assert soak._slope(pts) == pytest.approx(30.0)
    assert soak._slope([(0, 1.0), (1, 1.0), (2, 1.0)]) == 0.0
    assert soak._slope(pts[:2]) is None
