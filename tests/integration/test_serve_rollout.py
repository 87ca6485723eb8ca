"""Tier 3: production serving over real HTTP on the session's Ray (HAProxy + direct ingress, the shipped
default): every status code of the API; a canary -> promote -> rollback cycle through the `raysys serve`
CLI under concurrent load with zero failed requests; one of two replicas SIGKILLed under load, with the
ingress retrying so that no request it could retry fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from helpers.serving import MODEL, Load, make_registry, poll, serve_http_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("rollout"))


@pytest.fixture(scope="module")
def http_port(request, ray_cluster):
    return serve_http_port(request)


def _deploy(reg, name: str, serve_cfg: dict | None = None, env: dict | None = None) -> None:
    """The endpoint as build_app makes it (deployment options from ServeConfig), monitor off, optionally
    with extra environment variables in the replicas."""
    from ray import serve

    from raysys.config import ServeConfig
    from serve.contract import deployment_options, parse_app_args, replica_options
    from serve.endpoint import StudentEndpoint

    kwargs = parse_app_args({"registry_uri": reg.uri, "model_name": MODEL, "monitor": False,
                             "serve_cfg": serve_cfg or {}})
    scfg = ServeConfig.model_validate(kwargs["serve_cfg"])
    options = {**replica_options(scfg), **deployment_options(scfg)}
    if env:
        actor = options.setdefault("ray_actor_options", {}).setdefault("runtime_env", {})
        actor["env_vars"] = {**actor.get("env_vars", {}), "OMP_NUM_THREADS": "1", **env}
    serve.run(StudentEndpoint.options(**options).bind(**kwargs), name=name, route_prefix=f"/{name}")
    # RUNNING in Serve before HAProxy routes to it: on a loaded box its reload lags (a plain-text 404 meanwhile)
    from ray.serve.context import _get_global_client

    url = f"http://127.0.0.1:{_get_global_client().http_config.port}/{name}"
    poll(lambda: requests.get(f"{url}/healthz", timeout=30).status_code == 200, what="HAProxy routing to the app")


def _app(http_port: int, prefix: str):
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    return name, f"http://127.0.0.1:{http_port}/{name}"


def test_every_status_code_over_http(registry, http_port, tmp_path):
    """200 (row and column form, Bearer and X-API-Key), 401, 413 (rows, bytes), 422 naming the field,
    404/405, /readyz, /healthz and /docs without the key; no input gives a 500 or a stack trace."""
    from ray import serve

    from serve.web import API_TOKEN_FILE_ENV

    reg, schema, rows = registry
    key_file = tmp_path / "api-key"
    key_file.write_text("k3y-from-a-file\n")
    name, url = _app(http_port, "status")
    _deploy(reg, name, {"max_instances_per_request": 8, "num_replicas": 1}, env={API_TOKEN_FILE_ENV: str(key_file)})
    bearer = {"Authorization": "Bearer k3y-from-a-file"}
    try:
        with requests.Session() as s:
            r = s.post(f"{url}/v1/predict", json={"instances": rows[:3]}, headers=bearer, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model_version"] == 1 and len(body["request_id"]) == 32 and len(body["predictions"]) == 3
            # X-API-Key works too; a client request_id comes back unchanged
            r2 = s.post(f"{url}/v1/predict", json={"instances": rows[:3], "request_id": "req-42"},
                        headers={"X-API-Key": "k3y-from-a-file"}, timeout=30)
            assert r2.status_code == 200 and r2.json()["request_id"] == "req-42", r2.text
            # the column form scores the same rows to the same probabilities
            names = [f.name for f in schema.features]
            cols = {"columns": names, "data": [[row[n] for n in names] for row in rows[:3]]}
            r3 = s.post(f"{url}/v1/predict", json=cols, headers=bearer, timeout=30)
            assert r3.status_code == 200, r3.text
            assert r3.json()["probabilities"] == body["probabilities"]

            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
                r = s.post(f"{url}/v1/predict", json={"instances": rows[:1]}, headers=headers, timeout=30)
                assert r.status_code == 401 and r.json()["detail"]["field"] == "authorization", r.text
                assert "k3y" not in r.text
            # too many rows (limit 8), in either form; a body far over the byte cap
            r = s.post(f"{url}/v1/predict", json={"instances": rows[:9]}, headers=bearer, timeout=30)
            assert r.status_code == 413 and r.json()["detail"]["field"] == "instances", r.text
            big = {"columns": names, "data": [[row[n] for n in names] for row in rows[:9]]}
            r = s.post(f"{url}/v1/predict", json=big, headers=bearer, timeout=30)
            assert r.status_code == 413 and r.json()["detail"]["field"] == "data", r.text
            r = s.post(f"{url}/v1/predict", data=b" " * 1_000_000, headers=bearer, timeout=30)
            assert r.status_code == 413 and r.json()["detail"]["field"] == "body", r.text
            # 422 naming the field, column form included
            bad_cols = {"columns": names, "data": [["oops"] + [rows[0][n] for n in names[1:]]]}
            cases = [
                (bad_cols, f"data[0].{names[0]}"),
                ({"columns": names + names[:1], "data": []}, "columns"),
                ({"columns": names, "data": [[1.0]]}, "data[0]"),
                ({"columns": names}, "data"),
                ({"instances": rows[:1], "columns": names}, "instances"),
                ({"instances": rows[:1], "request_id": ""}, "request_id"),
            ]
            for payload, field in cases:
                r = s.post(f"{url}/v1/predict", json=payload, headers=bearer, timeout=30)
                assert r.status_code == 422 and r.json()["detail"]["field"] == field, (payload, r.text)
            # whatever the bytes, a 4xx with a JSON body: never a 500, never a stack trace
            for raw in (b"\xff\xfe", b"[" * 10_000, b'{"instances": [' + b"1," * 500 + b"1]}", b"null",
                        b'{"instances": [{"x0": {"$gt": 1}}]}', b'{"columns": [1], "data": [[1]]}'):
                r = s.post(f"{url}/v1/predict", data=raw, headers=bearer, timeout=30)
                assert 400 <= r.status_code < 500, (raw[:40], r.status_code, r.text[:300])
                assert "Traceback" not in r.text and "detail" in r.json()
            assert s.get(f"{url}/v1/predict", headers=bearer, timeout=30).status_code == 405
            assert s.get(f"{url}/v1/nothing-here", headers=bearer, timeout=30).status_code == 404
            # probes and docs need no key
            ready = s.get(f"{url}/readyz", timeout=30)
            assert ready.status_code == 200 and ready.json()["model_version"] == 1, ready.text
            assert s.get(f"{url}/healthz", timeout=30).status_code == 200
            assert s.get(f"{url}/docs", timeout=30).status_code == 200
            assert "/v1/predict" in s.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    finally:
        serve.delete(name)


def test_a_request_past_its_timeout_gets_504(registry, http_port):
    from ray import serve

    reg, _, rows = registry
    name, url = _app(http_port, "timeout")
    # a one-row batch waits up to 2 s for company, far past the 50 ms request timeout
    _deploy(reg, name, {"request_timeout_s": 0.05, "batch_wait_timeout_s": 2.0,
                        "num_replicas": 1})
    try:
        t0 = time.monotonic()
        r = requests.post(f"{url}/v1/predict", json={"instances": rows[:1]}, timeout=30)
        assert r.status_code == 504, r.text
        assert "request_timeout_s" in r.json()["detail"]["message"]
        assert time.monotonic() - t0 < 2.0 + 10  # answered, not hung until the client gave up
        # a full batch skips the wait and is answered in time
        full = requests.post(f"{url}/v1/predict", json={"instances": rows[:64]}, timeout=30)
        assert full.status_code == 200, full.text
    finally:
        serve.delete(name)


def test_overload_gets_503_with_retry_after(registry, http_port):
    from ray import serve

    reg, _, rows = registry
    name, url = _app(http_port, "overload")
    # one request at a time, one waiting; each one-row request sits 1 s in its batch
    _deploy(reg, name, {"max_ongoing_requests": 1, "max_queued_requests": 1, "batch_wait_timeout_s": 1.0,
                        "retry_after_s": 2, "request_timeout_s": 30,
                        "num_replicas": 1})
    try:
        assert requests.post(f"{url}/v1/predict", json={"instances": rows[:1]}, timeout=30).status_code == 200

        def post(i):
            return requests.post(f"{url}/v1/predict", json={"instances": [rows[i]]}, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
        codes = [r.status_code for r in responses]
        assert 200 in codes and 503 in codes, codes
        assert set(codes) <= {200, 503}, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers.get("retry-after") == "2", dict(r.headers)
    finally:
        serve.delete(name)


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="token")  # the session cluster has token auth on (Ray's default)
    out = subprocess.run([str(BIN / "raysys"), "serve", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out


def test_canary_promote_rollback_under_load_fails_no_request(registry, http_port, tmp_path):
    """`raysys serve canary | promote | rollback` through the Serve REST API while 4 clients send requests
    back to back: every response is a 200, the load never drops below 20 requests/s, and each step is
    visible in the versions that answer."""
    from ray import serve

    from raysys.config import preset
    from serve.app import deploy
    from serve.rollout import cluster_dashboard_url

    reg, _, rows = registry
    cfg = preset("tiny").with_root(tmp_path)
    cfg.registry_uri, cfg.model_name = reg.uri, MODEL
    cfg.serve.port = http_port
    cfg.serve.app_name = f"rollout-{uuid.uuid4().hex[:6]}"
    cfg.serve.route_prefix = f"/{cfg.serve.app_name}"
    url = deploy(cfg, monitor=False)
    dash = cluster_dashboard_url()
    assert dash, "the session cluster runs a dashboard (Serve's REST API)"
    common = ["--app", cfg.serve.app_name, "--address", dash]
    try:
        with Load(url, rows, workers=4) as load:
            load.wait_for(40)
            out = _cli("canary", "--version", "2", "--percent", "50", "--no-gate", *common)
            assert out.returncode == 0, out.stdout + out.stderr
            t = time.monotonic()
            poll(lambda: {v for _, _, v in load.since(t)} >= {1, 2}, what="both versions answering")

            out = _cli("promote", *common)
            assert out.returncode == 0, out.stdout + out.stderr
            assert reg.get_alias(MODEL, "production") == 2
            t = time.monotonic() + 1.0  # responses in flight when the CLI returned may be v1
            load.wait_for(40)
            poll(lambda: len(load.since(t)) >= 20, what="responses after promote")
            assert {v for _, _, v in load.since(t)} == {2}

            out = _cli("rollback", *common)
            assert out.returncode == 0, out.stdout + out.stderr
            assert reg.get_alias(MODEL, "production") == 1
            t = time.monotonic() + 1.0
            poll(lambda: len(load.since(t)) >= 20, what="responses after rollback")
            assert {v for _, _, v in load.since(t)} == {1}
        summary = load.summary()
        print(f"\n[rollout] {json.dumps(summary)}; worst 2 s window {load.worst_rate():.0f} req/s")
        assert summary["statuses"] == {200: summary["requests"]}, summary
        assert load.worst_rate() >= 20, summary

        # bad rollouts are refused with exit 2 and the reason, and change nothing
        out = _cli("promote", *common)
        assert out.returncode == 2 and "no canary to promote" in out.stdout, out.stdout + out.stderr
        out = _cli("canary", "--version", "99", "--percent", "10", *common)
        assert out.returncode == 2 and "99" in out.stdout, out.stdout + out.stderr
        out = _cli("canary", "--version", "2", "--percent", "150", *common)
        assert out.returncode == 2 and "--percent" in out.stdout, out.stdout + out.stderr
        assert requests.get(f"{url}/healthz", timeout=30).json()["model_version"] == 1
    finally:
        serve.delete(cfg.serve.app_name)


def _replica_pids(app_name: str) -> set[int]:
    import psutil

    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        if f"ServeReplica:{app_name}:" in " ".join(proc.info["cmdline"] or []):
            pids.add(proc.pid)
    return pids


def _haproxy_config(port: int) -> str:
    """The config file of the live HAProxy (the newest process started with `-f`) that listens on `port`."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = proc.info["cmdline"] or []
        if cmd and Path(cmd[0]).name == "haproxy" and "-f" in cmd:
            text = Path(cmd[cmd.index("-f") + 1]).read_text()
            if f":{port}" in text:
                procs.append((proc.info["create_time"], text))
    assert procs, f"no HAProxy process serving port {port}"
    return max(procs)[1]


def _haproxy_replicas_up(port: int, app_name: str) -> int:
    """How many of `app_name`'s replicas the live HAProxy on `port` routes to (servers UP in its backend),
    from HAProxy's own `show stat` on its admin socket."""
    import csv
    import re
    import socket

    sock_path = re.search(r"^\s*stats socket (\S+)", _haproxy_config(port), re.M).group(1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(sock_path)
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = list(csv.DictReader(data.decode().lstrip("# ").splitlines()))
    return sum(1 for r in rows if r["pxname"] == f"http-{app_name}" and r["svname"].startswith("SERVE_REPLICA_")
               and r["status"] == "UP")


def test_a_replica_killed_under_load_fails_no_retryable_request(registry, http_port):
    """SIGKILL one of two replicas while 4 clients send requests: the ingress (HAProxy) retries on the live
    replica every request the dead one dropped before answering, Serve starts a replacement, and the only
    failures possible are responses cut mid-body (counted; not retryable once their headers left) and
    Ray's HAProxy reload race (counted, bounded)."""
    from ray import serve

    reg, _, rows = registry
    name, url = _app(http_port, "kill")
    _deploy(reg, name, {"num_replicas": 2})
    try:
        # HAProxy can only retry a request it has whole: without `option http-buffer-request` it forwards the
        # headers of a POST before its body arrives (Python's http.client sends them in two writes) and then
        # gives up on retrying it (a 502, sent as a plain 500, or a closed connection)
        config = _haproxy_config(http_port)
        assert "\n    option http-buffer-request\n" in config.split("\ndefaults\n")[1].split("\nfrontend ")[0]
        assert "retry-on conn-failure empty-response junk-response" in config
        poll(lambda: len(_replica_pids(name)) == 2, what="two replica processes")
        # and HAProxy routes to both: a replica process can be up before HAProxy's reload adds it, and killing
        # the one replica HAProxy knows tests nothing about failing over
        poll(lambda: _haproxy_replicas_up(http_port, name) == 2, what="HAProxy to route to both replicas")
        before = _replica_pids(name)
        with Load(url, rows, workers=4) as load:
            load.wait_for(100)
            victim = sorted(before)[0]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()

            def replaced():
                st = serve.status().applications[name].deployments["StudentEndpoint"]
                pids = _replica_pids(name)
                return st.replica_states.get("RUNNING", 0) == 2 and len(pids) == 2 and victim not in pids

            poll(replaced, interval_s=0.5, what="Serve to replace the killed replica")
            recovered_s = time.monotonic() - killed_at
            load.wait_for(100)  # and the new replica takes traffic
        summary = load.summary()
        failed = summary["requests"] - summary["statuses"].get(200, 0)
        cut = summary["statuses"].get("cut", 0)
        print(f"\n[kill] replica {victim} killed; replaced after {recovered_s:.1f}s; {failed} failed of "
              f"{summary['requests']}, {cut} of them cut mid-response ({json.dumps(summary)})")
        # every request the ingress could retry (no response byte had reached the client) succeeded: none failed
        # with a closed connection and no response, none got HAProxy's own error page (its 502/503/504, which
        # Serve's HAProxy config sends as a plain-text 500).
        # A response whose headers had already left the dead replica cannot be retried by any proxy: at most the
        # requests in flight on it (one per client) are cut mid-body (HAProxy's log: `SD--`).
        # A known Ray 2.60 HAProxy-mode race: right after the replacement replica becomes RUNNING, HAProxy's
        # reload can briefly lack the app's backend and answer with its own 404 "Path not found". Counted and
        # bounded, not hidden; raysys cannot retry what HAProxy answers itself.
        reload_404 = summary["statuses"].get(404, 0)
        assert failed == cut + reload_404, (summary, load.errors)
        assert cut <= 4, summary
        assert reload_404 <= 0.02 * summary["requests"], summary
        assert len(_replica_pids(name) - before) == 1
    finally:
        serve.delete(name)


def test_two_concurrent_canaries_one_wins(registry, http_port, tmp_path):
    """Two `canary` calls on one real Serve app at once: the first holds the application's rollout lease
    while its PUT is in flight (held open here until the second has finished, so the two overlap on every
    run); the second, a separate `raysys serve canary` process, exits 2 saying another rollout is in
    progress. The app then serves exactly the winner's user_config (its canary answers, the loser's
    percent appears nowhere)."""
    import threading

    from ray import serve

    from raysys.config import preset
    from serve import rollout
    from serve.app import deploy
    from serve.contract import DEPLOYMENT_NAME

    reg, _, rows = registry
    cfg = preset("tiny").with_root(tmp_path)
    cfg.registry_uri, cfg.model_name = reg.uri, MODEL
    cfg.serve.port = http_port
    cfg.serve.app_name = f"cas-{uuid.uuid4().hex[:6]}"
    cfg.serve.route_prefix = f"/{cfg.serve.app_name}"
    url = deploy(cfg, monitor=False)
    dash = rollout.cluster_dashboard_url()
    in_put, second_done = threading.Event(), threading.Event()

    class HeldAdmin(rollout.ServeAdmin):
        def apply(self, config):
            in_put.set()
            assert second_done.wait(120), "the second canary never finished"
            super().apply(config)

    result: dict = {}

    def first():
        try:
            result["user"] = rollout.canary(HeldAdmin(dash), cfg.serve.app_name, 2, 100)
        except Exception as e:  # reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=first)
    try:
        t.start()
        assert in_put.wait(120), result
        try:
            out = _cli("canary", "--version", "2", "--percent", "30", "--no-gate", "--app", cfg.serve.app_name,
                       "--address", dash)
        finally:
            second_done.set()
        t.join(300)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "another rollout" in out.stdout and "in progress" in out.stdout, out.stdout
        assert "error" not in result and result["user"]["canary_percent"] == 100, result
        deployed = rollout.current_rollout(rollout.ServeAdmin(dash), cfg.serve.app_name)[2]
        assert deployed == result["user"] and deployed["rollout_generation"] == 2  # deploy 1, canary 2
        app = serve.status().applications[cfg.serve.app_name]
        assert app.status == "RUNNING" and DEPLOYMENT_NAME in app.deployments
        with Load(url, rows, workers=2) as load:
            load.wait_for(20)
            start = time.monotonic() + 0.5
            poll(lambda: len(load.since(start)) >= 10, what="responses after the canary")
            assert {v for _, _, v in load.since(start)} == {2}  # the winner's 100% canary, nothing else
        out = _cli("rollback", "--app", cfg.serve.app_name, "--address", dash)  # the lease was given back
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        second_done.set()
        t.join(60)
        serve.delete(cfg.serve.app_name)
