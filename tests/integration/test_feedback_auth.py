"""Tier 3 (issue 20): feedback no stranger can poison, and auth that fits the risk, on the session's local Ray
over real HTTP (the shipped HAProxy + direct ingress, which listen beyond loopback).

- `/v1/feedback` without the key is a 401; for an id the endpoint never answered it is refused (404) and
  counted once (`accuracy.refused_unknown_ids`); a lone-surrogate id is a 422; a real prediction's id is
  accepted, even when the prediction still sits in the other replica's buffer; the monitor keeps recording.
- An endpoint with no key refuses to start (the deployment fails with the setting and the fix named) unless
  `serve.network: private`.
"""

from __future__ import annotations

import uuid

import pytest
import requests
from helpers.serving import MODEL, kill_monitor, make_registry, poll, serve_http_port

pytestmark = pytest.mark.integration

NO_KEY = {"Authorization": None}  # sends no key (tests/conftest.py endpoint_api_key adds the session key otherwise)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("feedback"))


@pytest.fixture(scope="module")
def http_port(request, ray_cluster):
    return serve_http_port(request)


@pytest.fixture(scope="module")
def two_replicas(registry, http_port):
    """Two replicas with the session's key (RAYSYS_API_TOKEN_FILE in the local Ray's environment), monitored."""
    from ray import serve

    from serve.app import build_app

    reg, _, rows = registry
    name = f"feedback-{uuid.uuid4().hex[:6]}"
    monitor = f"raysys_monitor_{name}"
    serve.run(build_app({"registry_uri": reg.uri, "model_name": MODEL, "monitor_name": monitor,
                         "serve_cfg": {"num_replicas": 2}, "monitor_cfg": {"window_size": 100, "min_rows": 10}}),
              name=name, route_prefix=f"/{name}")
    try:
        yield f"http://127.0.0.1:{http_port}/{name}", rows
    finally:
        serve.delete(name)
        kill_monitor(monitor)


def _report(s: requests.Session, url: str) -> dict | None:
    r = s.get(f"{url}/v1/monitor", timeout=30)
    return r.json() if r.status_code == 200 else None


def _replica_monitor_stats(s: requests.Session, url: str) -> dict[str, dict]:
    seen: dict[str, dict] = {}

    def both():
        h = s.get(f"{url}/healthz", headers=NO_KEY, timeout=30).json()  # /healthz never needs the key
        seen[h["replica"]] = h["monitor"]
        return len(seen) >= 2

    poll(both, interval_s=0.02, what="both replicas answering /healthz")
    return seen


def _predict(s: requests.Session, url: str, rows: list[dict], prefix: str, n: int) -> tuple[list[str], list[int]]:
    ids, preds = [], []
    for k in range(n):
        rid = f"{prefix}-{uuid.uuid4().hex[:8]}-{k}"
        r = s.post(f"{url}/v1/predict", json={"instances": [rows[k]], "request_id": rid}, timeout=30)
        assert r.status_code == 200, r.text
        ids.append(rid)
        preds.append(r.json()["predictions"][0])
    return ids, preds


def test_feedback_needs_the_key_refuses_strangers_and_the_monitor_keeps_recording(two_replicas):
    url, rows = two_replicas
    with requests.Session() as s:
        ids, preds = _predict(s, url, rows, "warm", 10)
        before = poll(lambda: (lambda r: r if r and r["rows_seen"] >= 10 else None)(_report(s, url)),
                      what="the monitor's first rows")
        refused0 = before["accuracy"]["refused_unknown_ids"]
        # no key: 401, nothing recorded
        r = s.post(f"{url}/v1/feedback", json={"request_id": ids[0], "label": 0}, headers=NO_KEY, timeout=30)
        assert r.status_code == 401 and r.json()["detail"]["field"] == "authorization", r.text
        # an id this endpoint never answered: refused, named, counted once
        r = s.post(f"{url}/v1/feedback", json={"request_id": f"stranger-{uuid.uuid4().hex}", "label": 0}, timeout=30)
        assert r.status_code == 404 and r.json()["detail"]["field"] == "request_id", r.text
        # a lone surrogate (sent as the JSON escape): 422 naming the field, before the monitor sees it
        r = s.post(f"{url}/v1/feedback", data=b'{"request_id": "\\ud800", "label": 0}',
                   headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 422 and r.json()["detail"]["field"] == "request_id", r.text
        # fresh predictions, labelled at once: some still wait in the other replica's buffer (shipped once a
        # second), and the endpoint asks again for those before refusing anything
        fresh, fresh_preds = _predict(s, url, rows[10:], "fresh", 8)
        items = [{"request_id": rid, "label": p} for rid, p in zip(ids + fresh, preds + fresh_preds)]
        items.append({"request_id": "never-answered", "label": 0})
        r = s.post(f"{url}/v1/feedback", json={"feedback": items}, timeout=30)
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == 18 and [x["index"] for x in r.json()["refused"]] == [18], r.text
        assert r.json()["refused"][0]["reason"] == "unknown_request_id"
        # the same labels again: their predictions are consumed, so every id is refused now
        r = s.post(f"{url}/v1/feedback", json={"feedback": items[:2]}, timeout=30)
        assert r.status_code == 404 and r.json()["detail"]["field"] == "feedback[0].request_id", r.text
        # the monitor kept recording: more rows seen, nothing dropped on either replica
        _predict(s, url, rows[20:], "after", 5)
        rep = poll(lambda: (lambda r: r if r and r["rows_seen"] >= 23 else None)(_report(s, url)),
                   what="the rows sent after the feedback")
        acc = rep["accuracy"]
        assert acc["refused_unknown_ids"] - refused0 == 4 and acc["labels_total"] == 18, acc
        assert acc["invalid_labels"] == 0 and acc["unmatched_labels"] == 0, acc
        stats = _replica_monitor_stats(s, url)
        assert all(st["rows_dropped"] == 0 and st["last_error"] is None for st in stats.values()), stats


def test_an_endpoint_without_a_key_refuses_to_start_unless_the_network_is_private(registry, http_port):
    from ray import serve

    from serve.contract import parse_app_args
    from serve.endpoint import StudentEndpoint
    from serve.ingress import ingress_mode

    if ingress_mode() != "haproxy":
        pytest.skip("the session's Serve listens on loopback only (RAYSYS_SERVE_INGRESS=proxy)")
    reg, _, rows = registry
    no_key = {"runtime_env": {"env_vars": {"RAYSYS_API_TOKEN": "", "RAYSYS_API_TOKEN_FILE": ""}}}
    name = f"nokey-{uuid.uuid4().hex[:6]}"
    kwargs = parse_app_args({"registry_uri": reg.uri, "model_name": MODEL, "monitor": False,
                             "serve_cfg": {"num_replicas": 1}})
    try:
        with pytest.raises(RuntimeError, match="failed"):
            serve.run(StudentEndpoint.options(num_replicas=1, ray_actor_options=no_key).bind(**kwargs), name=name,
                      route_prefix=f"/{name}")
        why = serve.status().applications[name].deployments["StudentEndpoint"].message  # the replica's error
        assert "serve.network='public' and no API key" in why and "RAYSYS_API_TOKEN_FILE" in why, why
    finally:
        serve.delete(name)
    # explicitly private: it starts, and answers without a key
    kwargs = parse_app_args({"registry_uri": reg.uri, "model_name": MODEL, "monitor": False,
                             "serve_cfg": {"num_replicas": 1, "network": "private"}})
    serve.run(StudentEndpoint.options(num_replicas=1, ray_actor_options=no_key).bind(**kwargs), name=name,
              route_prefix=f"/{name}")
    try:
        r = requests.post(f"http://127.0.0.1:{http_port}/{name}/v1/predict", json={"instances": rows[:1]},
                          headers=NO_KEY, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        serve.delete(name)
