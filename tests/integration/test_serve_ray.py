"""Tier 3: the Serve application on the session's local Ray cluster, over real HTTP.

A small untrained-but-real TabularMLP is registered twice (v1 = production, v2) in a temp registry, with a
reference profile so the monitor runs. The app is deployed on the session's Serve HTTP port (Serve's HTTP
options are cluster-wide: the first test to start Serve picks the port; `serve_port` from conftest when
there is one, else a free port, never 8000). Apps are removed with `serve.delete` (the session fixture
shuts Serve down at the end) and the test's monitor actors with `ray.kill`.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests
import yaml
from helpers import REPO
from helpers.serving import (
    MODEL,
    kill_monitor,
    make_registry,
    poll,
    register_failing_version,
    routed_to_candidate,
    serve_http_port,
)

from raysys.config import preset

pytestmark = pytest.mark.integration

MONITOR_NAMESPACE = "raysys"
CONFIG_YAML = REPO / "serve" / "config.yaml"
_poll = poll


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def http_port(request, ray_cluster):
    return serve_http_port(request)


@pytest.fixture(scope="module")
def endpoint(registry, http_port):
    """The app deployed imperatively (`serve.run(build_app(...))`), as the brief's tests do."""
    from ray import serve

    from serve.app import build_app

    reg, _, _ = registry
    name = f"serve-test-{uuid.uuid4().hex[:6]}"
    monitor = f"raysys_monitor_{name}"
    t0 = time.perf_counter()
    serve.run(build_app({"registry_uri": reg.uri, "model_name": MODEL, "monitor_name": monitor,
                         "serve_cfg": {"max_instances_per_request": 50},
                         "monitor_cfg": {"window_size": 100, "min_rows": 10}}),
              name=name, route_prefix=f"/{name}")
    print(f"\n[serve] deployed {name} in {time.perf_counter() - t0:.1f}s")
    try:
        yield f"http://127.0.0.1:{http_port}/{name}"
    finally:
        serve.delete(name)
        kill_monitor(monitor)


def test_predict_returns_probabilities_and_version(endpoint, registry):
    _, schema, rows = registry
    with requests.Session() as s:
        r = s.post(f"{endpoint}/v1/predict", json={"instances": rows[:4]}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == 1 and body["model_name"] == MODEL
        assert body["classes"] == schema.classes
        assert len(body["predictions"]) == 4 and len(body["probabilities"]) == 4
        for pred, probs in zip(body["predictions"], body["probabilities"]):
            assert abs(sum(probs) - 1.0) < 1e-6 and all(0.0 <= p <= 1.0 for p in probs)
            assert pred == schema.classes[max(range(len(probs)), key=probs.__getitem__)]
        # end-to-end latency of a one-row request (informational: tests never assert on time)
        lat = []
        for row in rows[:20]:
            t0 = time.perf_counter()
            assert s.post(f"{endpoint}/v1/predict", json={"instances": [row]}, timeout=30).status_code == 200
            lat.append((time.perf_counter() - t0) * 1000)
        lat.sort()
        print(f"\n[serve] one-row request, sequential client: p50 {lat[len(lat) // 2]:.1f} ms, max {lat[-1]:.1f} ms")


def _with(rows, i, **kv):
    return json.dumps({"instances": [dict(rows[i], **kv)]})


def test_bad_inputs_are_4xx_naming_the_field(endpoint, registry):
    _, _, rows = registry
    r0 = rows[0]
    nan_body = _with(rows, 0, x1=0.5).replace('"x1": 0.5', '"x1": NaN')
    assert "NaN" in nan_body
    cases = [
        ("{", "body"),
        ("[1, 2]", "body"),
        ("", "body"),
        ("{}", "instances"),
        (json.dumps({"instances": [r0], "extra": 1}), "extra"),
        (json.dumps({"instances": []}), "instances"),
        (json.dumps({"instances": [{k: v for k, v in r0.items() if k != "x2"}]}), "instances[0].x2"),
        (_with(rows, 0, bogus=1.0), "instances[0].bogus"),
        (_with(rows, 0, x3="high"), "instances[0].x3"),
        (_with(rows, 0, x0=None), "instances[0].x0"),
        (_with(rows, 0, c1="zz"), "instances[0].c1"),
        (nan_body, "instances[0].x1"),
        (_with(rows, 0, x2=10**400), "instances[0].x2"),
        (_with(rows, 0, x2=1e39), "instances[0].x2"),
    ]
    with requests.Session() as s:
        for body, field in cases:
            r = s.post(f"{endpoint}/v1/predict", data=body, headers={"content-type": "application/json"},
                       timeout=30)
            assert r.status_code == 422, (body[:80], r.status_code, r.text)
            assert r.json() == {"detail": {"field": field, "message": r.json()["detail"]["message"]}}, r.text
        # max_instances_per_request is 50 for this app
        r = s.post(f"{endpoint}/v1/predict", json={"instances": rows[:51]}, timeout=30)
        assert r.status_code == 413 and r.json()["detail"]["field"] == "instances", r.text
        # a body far over the byte cap is refused before it is parsed
        r = s.post(f"{endpoint}/v1/predict", data=b" " * 2_000_000, timeout=30)
        assert r.status_code == 413 and r.json()["detail"]["field"] == "body", r.text
        assert s.get(f"{endpoint}/v1/predict", timeout=30).status_code == 405
        # the endpoint is still healthy after all that
        assert s.post(f"{endpoint}/v1/predict", json={"instances": [r0]}, timeout=30).status_code == 200


def test_healthz_and_model_info(endpoint, registry):
    reg, schema, _ = registry
    h = requests.get(f"{endpoint}/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model_version"] == 1
    m = requests.get(f"{endpoint}/v1/model", timeout=30)
    assert m.status_code == 200, m.text
    info = m.json()
    assert (info["name"], info["version"], info["model_ref"]) == (MODEL, 1, "production")
    assert info["metrics"] == {"accuracy": 0.1} and info["lineage"]["note"] == "untrained, seed 1"
    assert info["schema"]["classes"] == schema.classes and info["features"] == [f.name for f in schema.features]
    assert info["registry_uri"] == reg.uri and info["max_instances_per_request"] == 50


def test_monitor_report_grows_with_traffic(endpoint, registry):
    _, _, rows = registry
    r = requests.get(f"{endpoint}/v1/monitor", timeout=30)
    assert r.status_code == 200, r.text
    before = r.json()["rows_seen"]
    with requests.Session() as s:
        for i in range(0, 40, 8):
            assert s.post(f"{endpoint}/v1/predict", json={"instances": rows[i:i + 8]}, timeout=30).status_code == 200

    def grown():
        rep = requests.get(f"{endpoint}/v1/monitor", timeout=30).json()
        return rep if rep["rows_seen"] >= before + 40 else None

    rep = _poll(grown, what="the monitor to see 40 more rows")  # fire-and-forget: it lags a little
    assert rep["model_version"] == "1" and rep["requests_seen"] >= 5
    assert set(rep["features"]) == {"x0", "x1", "x2", "x3", "c0", "c1"}
    assert rep["latency_ms"]["count"] >= 5 and rep["latency_ms"]["p50"] > 0
    health = requests.get(f"{endpoint}/healthz", timeout=30).json()
    assert health["monitor"]["connected"] and health["monitor"]["rows_dropped"] == 0


def test_monitor_down_never_fails_a_request(registry, http_port):
    """With the monitor actor killed, predictions still succeed and /v1/monitor answers 503 (never a 500 or
    a hang); after a back-off the replica re-creates the actor and the report comes back."""
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.monitor_link import MONITOR_RETRY_S

    reg, _, rows = registry
    name = f"serve-nomon-{uuid.uuid4().hex[:6]}"
    monitor = f"raysys_monitor_{name}"
    # one replica: the module's app holds two of the session's 4 CPUs; needing the last two as well would wait
    # on any CPU another test's process has not handed back yet
    serve.run(build_app({"registry_uri": reg.uri, "model_name": MODEL, "monitor_name": monitor,
                         "serve_cfg": {"num_replicas": 1}}), name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{http_port}/{name}"
    try:
        assert requests.post(f"{url}/v1/predict", json={"instances": rows[:2]}, timeout=30).status_code == 200
        # the replica creates the actor asynchronously: wait until it answers before killing it
        _poll(lambda: requests.get(f"{url}/v1/monitor", timeout=30).status_code == 200, what="the monitor")
        ray.kill(ray.get_actor(monitor, namespace=MONITOR_NAMESPACE), no_restart=True)
        t0 = time.monotonic()
        with requests.Session() as s:
            while time.monotonic() - t0 < MONITOR_RETRY_S / 2:
                assert s.post(f"{url}/v1/predict", json={"instances": rows[:2]}, timeout=30).status_code == 200
                time.sleep(0.05)
            assert s.get(f"{url}/v1/monitor", timeout=30).status_code in (200, 503)

            def healed():
                assert s.post(f"{url}/v1/predict", json={"instances": rows[:2]}, timeout=30).status_code == 200
                return s.get(f"{url}/v1/monitor", timeout=30).status_code == 200

            # after its back-off the replica makes a fresh monitor actor under the same name
            _poll(healed, interval_s=0.5, what="the replica to re-create the monitor")
    finally:
        serve.delete(name)
        kill_monitor(monitor)


def test_api_token_and_monitoring_off(registry, http_port):
    """RAYSYS_API_TOKEN in the replica's environment: /v1/* need the bearer token, /healthz does not.
    With monitoring off, /v1/monitor is a JSON 503."""
    from ray import serve

    from serve.contract import parse_app_args
    from serve.endpoint import StudentEndpoint
    from serve.web import API_TOKEN_ENV

    reg, _, rows = registry
    name = f"serve-auth-{uuid.uuid4().hex[:6]}"
    kwargs = parse_app_args({"registry_uri": reg.uri, "model_name": MODEL, "monitor": False})
    app = StudentEndpoint.options(
        ray_actor_options={"runtime_env": {"env_vars": {API_TOKEN_ENV: "s3cret", "OMP_NUM_THREADS": "1"}}}
    ).bind(**kwargs)
    serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{http_port}/{name}"
    ok = {"Authorization": "Bearer s3cret"}
    try:
        with requests.Session() as s:
            r = s.post(f"{url}/v1/predict", json={"instances": rows[:1]}, timeout=30)
            assert r.status_code == 401 and r.json()["detail"]["field"] == "authorization", r.text
            assert r.headers.get("www-authenticate") == "Bearer"
            bad = s.post(f"{url}/v1/predict", json={"instances": rows[:1]}, timeout=30,
                         headers={"Authorization": "Bearer wrong"})
            assert bad.status_code == 401
            assert s.post(f"{url}/v1/predict", json={"instances": rows[:1]}, timeout=30, headers=ok).status_code == 200
            assert s.get(f"{url}/v1/model", timeout=30).status_code == 401
            assert s.get(f"{url}/v1/model", timeout=30, headers=ok).status_code == 200
            assert s.get(f"{url}/healthz", timeout=30).status_code == 200
            r = s.get(f"{url}/v1/monitor", timeout=30, headers=ok)
            assert r.status_code == 503 and "monitoring is off" in r.json()["detail"]["message"], r.text
    finally:
        serve.delete(name)


def _replica_health(url, n: int) -> dict[str, dict]:
    """/healthz of each of the app's `n` replicas, by replica id (requests land on either replica)."""
    seen: dict[str, dict] = {}

    def all_seen():
        h = requests.get(f"{url}/healthz", timeout=30).json()
        seen[h["replica"]] = h
        return len(seen) >= n

    _poll(all_seen, interval_s=0.02, what=f"{n} replicas answering /healthz")
    return seen


def _predicted_version(url, row) -> int:
    r = requests.post(f"{url}/v1/predict", json={"instances": [row]}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def test_serve_deploy_config_rolls_versions_in_place(registry, http_port):
    """The `serve deploy serve/config.yaml` path: the config file's application, applied declaratively;
    changing only user_config swaps the weights in the SAME replica (no restart); a bad ref keeps serving."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    reg, _, rows = registry
    name = f"serve-cfg-{uuid.uuid4().hex[:6]}"
    monitor = f"raysys_monitor_{name}"
    raw = yaml.safe_load(CONFIG_YAML.read_text())
    raw["http_options"]["port"] = http_port  # cluster-wide and already set: must not clash
    app_cfg = raw["applications"][0]
    app_cfg.update(name=name, route_prefix=f"/{name}")
    app_cfg["args"].update(registry_uri=reg.uri, model_name=MODEL, monitor_name=monitor)
    app_cfg["deployments"][0]["user_config"] = {"model_ref": 1}
    client = _get_global_client()
    url = f"http://127.0.0.1:{http_port}/{name}"

    def apply(user_config):
        app_cfg["deployments"][0]["user_config"] = user_config
        client.deploy_apps(ServeDeploySchema.model_validate(raw), _blocking=False)

    def running():
        st = serve.status().applications.get(name)
        return st is not None and st.status == "RUNNING"

    try:
        apply({"model_ref": 1})
        _poll(running, what=f"app {name} RUNNING")
        assert _predicted_version(url, rows[0]) == 1
        n = raw["applications"][0]["deployments"][0]["num_replicas"]
        replicas = set(_replica_health(url, n))

        def everywhere(check):
            """`check(health)` holds on every replica (a rollout reaches the replicas one by one)."""
            health = _replica_health(url, n)
            assert set(health) == replicas, "reconfigure must not restart a replica"
            return all(check(h) for h in health.values())

        t0 = time.perf_counter()
        apply({"model_ref": 2})
        _poll(lambda: everywhere(lambda h: h["model_version"] == 2), what="model_version 2 on every replica")
        print(f"\n[serve] in-place rollout v1 -> v2 on all replicas after {time.perf_counter() - t0:.1f}s")
        assert everywhere(lambda h: h["model_ref"] == 2 and h["last_reconfigure_error"] is None)
        assert _predicted_version(url, rows[0]) == 2
        assert requests.get(f"{url}/v1/model", timeout=30).json()["metrics"] == {"accuracy": 0.2}

        apply({"model_ref": 99})  # no such version: keep serving v2, report the error
        _poll(lambda: everywhere(lambda h: h["last_reconfigure_error"]), what="the failed reconfigure reported")
        assert everywhere(lambda h: h["model_version"] == 2)
        assert _predicted_version(url, rows[0]) == 2

        apply({"model_version": 1})  # rollback
        _poll(lambda: everywhere(lambda h: h["model_version"] == 1 and h["last_reconfigure_error"] is None),
              what="rollback to v1 on every replica")
        assert _predicted_version(url, rows[0]) == 1
    finally:
        serve.delete(name)
        kill_monitor(monitor)


def test_deploy_helper_returns_the_url(registry, http_port, tmp_path):
    """`deploy(cfg)`, as the pipeline and `raysys serve` call it."""
    from ray import serve

    from serve.app import deploy

    reg, _, rows = registry
    cfg = preset("tiny").with_root(tmp_path)
    cfg.registry_uri = reg.uri
    cfg.model_name = MODEL
    cfg.serve.port = http_port
    cfg.serve.app_name = f"serve-deploy-{uuid.uuid4().hex[:6]}"
    cfg.serve.route_prefix = f"/{cfg.serve.app_name}"
    url = deploy(cfg, monitor=False)
    try:
        assert url == f"http://127.0.0.1:{http_port}/{cfg.serve.app_name}"
        r = requests.post(f"{url}/v1/predict", json={"instances": rows[:2]}, timeout=30)
        assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
    finally:
        serve.delete(cfg.serve.app_name)


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(registry, http_port):
    """Under concurrent load the replica scores requests together (one forward pass per batch), and every
    response still carries the probabilities of its own rows. (A replica's HTTP server hands it requests
    one at a time, so a 'lone request' shortcut taken before yielding to the event loop never batched.)"""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from ray import serve

    from serve.app import build_app
    from serve.parsing import validate_request
    from serve.scoring import Scorer

    reg, _, rows = registry
    name = f"serve-batch-{uuid.uuid4().hex[:6]}"
    serve.run(build_app({"registry_uri": reg.uri, "model_name": MODEL, "monitor": False,
                         "serve_cfg": {"num_replicas": 1}}), name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{http_port}/{name}"
    scorer = Scorer.from_loaded(reg.load(MODEL, "production"))
    try:
        def worker(k: int) -> list[tuple[int, int, list]]:
            out = []
            with requests.Session() as s:
                for i in range(k, 600, 24):  # 24 clients, 25 requests each, one distinct row per request
                    r = s.post(f"{url}/v1/predict", json={"instances": [rows[i]]}, timeout=60)
                    out.append((i, r.status_code, r.json().get("probabilities")))
            return out

        with ThreadPoolExecutor(24) as pool:
            results = [x for part in pool.map(worker, range(24)) for x in part]
        assert len(results) == 600 and {code for _, code, _ in results} == {200}
        for i, _, probs in results:
            req = validate_request({"instances": [rows[i]]}, scorer.schema, scorer.preprocessor, max_instances=1)
            np.testing.assert_allclose(probs, scorer.predict_proba(req.x_num, req.x_cat), rtol=1e-5, atol=1e-7)
        batching = requests.get(f"{url}/healthz", timeout=30).json()["batching"]
        assert batching["requests"] >= 600
        # 24 clients on one replica: while one batch is scored the others' requests queue up for the next
        assert batching["max_requests_per_batch"] > 1 and 2 * batching["batches"] <= batching["requests"], batching
    finally:
        serve.delete(name)


# ----- a failing canary, and text that is not UTF-8 (issue 20) -----

CANARY_PERCENT = 50


@pytest.fixture(scope="module")
def failing_canary(http_port, tmp_path_factory):
    """An app serving v1 with a canary at 50% of a version that fails at forward for most rows (its spec's
    categorical cardinalities do not fit the schema), monitored with traffic Parquet on, one replica."""
    from ray import serve

    from raysys.config import ServeConfig
    from serve.contract import deployment_options, parse_app_args, replica_options
    from serve.endpoint import StudentEndpoint

    root = tmp_path_factory.mktemp("failing-canary")
    reg, _, rows = make_registry(root)
    bad = register_failing_version(reg)
    name = f"serve-iso-{uuid.uuid4().hex[:6]}"
    monitor = f"raysys_monitor_{name}"
    kwargs = parse_app_args({"registry_uri": reg.uri, "model_name": MODEL, "monitor_name": monitor,
                             "serve_cfg": {"num_replicas": 1},
                             "monitor_cfg": {"traffic_uri": str(root / "traffic")}})
    scfg = ServeConfig.model_validate(kwargs["serve_cfg"])
    options = {**replica_options(scfg), **deployment_options(scfg),
               "user_config": {"model_ref": "production", "candidate_ref": bad, "canary_percent": CANARY_PERCENT}}
    serve.run(StudentEndpoint.options(**options).bind(**kwargs), name=name, route_prefix=f"/{name}")
    try:
        yield f"http://127.0.0.1:{http_port}/{name}", bad, rows
    finally:
        serve.delete(name)
        kill_monitor(monitor)


def _report(url: str) -> dict | None:
    r = requests.get(f"{url}/v1/monitor", timeout=30)
    return r.json() if r.status_code == 200 else None


def test_a_failing_canary_fails_only_its_own_requests_booked_to_itself(failing_canary):
    """8 concurrent clients: every request routed to stable is a 200 from v1; those routed to the candidate
    are its 200s or 500s naming it; the monitor books the 500s to the candidate, none to stable."""
    from concurrent.futures import ThreadPoolExecutor

    url, bad, rows = failing_canary
    ids = [f"iso-{uuid.uuid4().hex[:8]}-{k}" for k in range(240)]

    def post(k: int):
        r = requests.post(f"{url}/v1/predict", json={"instances": [rows[k % len(rows)]], "request_id": ids[k]},
                          timeout=60)
        return ids[k], r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(len(ids))))
    stable = [(st, b) for rid, st, b in results if not routed_to_candidate(rid, CANARY_PERCENT)]
    cand = [(st, b) for rid, st, b in results if routed_to_candidate(rid, CANARY_PERCENT)]
    assert len(stable) > 60 and len(cand) > 60
    assert all(st == 200 and b["model_version"] == 1 for st, b in stable), [x for x in stable if x[0] != 200][:3]
    failed = [b for st, b in cand if st != 200]
    for st, b in cand:
        assert (st == 200 and b["model_version"] == bad) or (st == 500 and b["detail"]["model_version"] == bad), b
    assert len(failed) > len(cand) // 2, "the candidate fails most rows (category index >= 1)"
    assert all(f"v{bad}" in b["detail"]["message"] for b in failed)

    def booked():
        rep = _report(url)
        if rep and rep["errors_by_version"].get(str(bad)) == len(failed) and \
                rep["predictions_by_version"].get("1") == len(stable):
            return rep
        return None

    rep = poll(booked, what=f"{len(failed)} errors booked to v{bad}")
    assert rep["errors_by_version"].get("1", 0) == 0
    assert rep["server_errors_by_version"] == {str(bad): len(failed)}
    assert rep["predictions_by_version"].get(str(bad), 0) == len(cand) - len(failed)
    assert rep["latency_by_version"]["1"]["count"] == len(stable)


def test_text_that_is_not_utf8_is_a_422_during_a_canary_and_the_monitor_keeps_recording(failing_canary):
    url, _, rows = failing_canary
    row = json.dumps(rows[0])
    names = list(rows[0])
    headers = {"content-type": "application/json"}
    cases = [
        ("/v1/predict", f'{{"instances": [{row}], "request_id": "id-\\ud800"}}', "request_id"),
        ("/v1/predict", f'{{"columns": {json.dumps(names[:-1] + ["BAD"])}, "data": [[1, 2, 3, 4, "a", "b"]]}}'
         .replace("BAD", "\\ud800"), f"columns[{len(names) - 1}]"),
        ("/v1/feedback", '{"feedback": [{"request_id": "x\\udfff", "label": 0}]}', "feedback[0].request_id"),
        ("/v1/feedback", '{"request_id": "\\ud800", "label": 0}', "request_id"),
    ]
    before = poll(lambda: _report(url), what="the monitor report")
    with requests.Session() as s:
        for path, body, field in cases:
            for _ in range(3):
                r = s.post(f"{url}{path}", data=body.encode(), headers=headers, timeout=30)
                assert r.status_code == 422 and r.json()["detail"]["field"] == field, (body, r.text)
        # the next valid requests (routed to stable) are recorded: the monitor link did not stop
        ok = [rid for rid in (f"utf-{uuid.uuid4().hex[:6]}-{k}" for k in range(60))
              if not routed_to_candidate(rid, CANARY_PERCENT)][:10]
        for rid in ok:
            r = s.post(f"{url}/v1/predict", json={"instances": rows[:2], "request_id": rid}, timeout=30)
            assert r.status_code == 200, r.text
    rep = poll(lambda: (lambda r: r if r and r["rows_seen"] >= before["rows_seen"] + 20 else None)(_report(url)),
               what="20 more rows seen")
    assert rep["errors_by_version"].get("1", 0) - before["errors_by_version"].get("1", 0) == 6  # the predict 422s
    assert rep["server_errors_by_version"].get("1", 0) == before["server_errors_by_version"].get("1", 0)
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["monitor"]["rows_dropped"] == 0 and health["monitor"]["last_error"] is None, health
