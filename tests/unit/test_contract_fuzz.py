"""Contract fuzzing (tier 1, no Ray, no network): schemathesis generates requests from the endpoint's own
OpenAPI document and sends them to the FastAPI app in-process (ASGI), every route, with the API key on.

Checks, on every generated case: not_a_server_error (no 5xx), response_schema_conformance (each answer has a
declared status and shape) and negative_data_rejection (a body that breaks the document gets a 4xx: the
document is no wider than the parser). Positive and negative cases for the routes with a body. The model is a
real (untrained) student over a schema with nullable features; the monitor is a plain `Monitor` behind a
fake actor handle, so /v1/feedback and /v1/monitor answer as on a cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest
import schemathesis
from helpers.endpoint import bare_endpoint
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

from raysys.data import Preprocessor
from raysys.data.schema import DatasetSchema, FeatureSpec
from raysys.monitor import Monitor, ReferenceProfile
from serve.routes import build_http_app
from serve.scoring import Scorer

KEY = "fuzz-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
WRONG_KEY = {"Authorization": "Bearer not-the-key", "X-API-Key": "not-the-key"}
CHECKS = [not_a_server_error, negative_data_rejection, response_schema_conformance]
# examples asked per (operation, mode) with the key, and per /v1/* operation with a wrong key; hypothesis stops
# early where an operation has fewer distinct cases (/healthz has one), so the total is counted, not assumed
EXAMPLES_BODY, EXAMPLES_GET, EXAMPLES_WRONG_KEY = 250, 60, 40
MIN_CASES = 1000


def _schema() -> DatasetSchema:
    return DatasetSchema(label="y", classes=["no", "yes", "maybe"], features=[
        FeatureSpec(name="x0", kind="numeric"), FeatureSpec(name="x1", kind="numeric", nullable=True),
        FeatureSpec(name="x2", kind="numeric"),
        FeatureSpec(name="c0", kind="categorical", categories=["a", "b", "c"]),
        FeatureSpec(name="c1", kind="categorical", categories=["u", "v"], nullable=True)])


def _endpoint(monkeypatch):
    """A StudentEndpoint without Ray or a registry (tests/helpers/endpoint.py) over a schema with nullable
    features, its monitor link over a plain Monitor."""
    schema = _schema()
    rng = np.random.default_rng(0)
    pre = Preprocessor(schema, [0.5, -2.0, 100.0], [1.5, 0.25, 40.0], fill={"x1": -2.0, "c1": "u"})
    x_num = rng.normal(size=(200, 3)) * pre.std + pre.mean
    x_cat = np.stack([rng.integers(0, 3, 200), rng.integers(0, 2, 200)], 1)
    prof = ReferenceProfile.from_arrays(schema, x_num, x_cat, num_bins=5, pred=rng.integers(0, 3, 200))
    mon = Monitor(prof.to_dict(), schema.model_dump(), {"window_size": 100, "min_rows": 10}, model_version=1)
    return bare_endpoint(monkeypatch, schema, pre, mon, KEY, registry_uri="memory://fuzz"), mon


@pytest.fixture()
def api(monkeypatch):
    ep, mon = _endpoint(monkeypatch)
    app = build_http_app(ep)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # a body with too many rows is refused with 413 (a 4xx the parser means), not one of schemathesis' defaults
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema, ep, mon


def test_the_document_declares_bodies_responses_and_security(api):
    schema, ep, _ = api
    doc = schema.raw_schema
    paths = doc["paths"]
    assert set(paths) == {"/v1/predict", "/v1/feedback", "/v1/model", "/v1/monitor", "/healthz", "/readyz"}
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}
    for path, ops in paths.items():
        for op in ops.values():
            assert path.startswith("/v1/") == ("security" in op), path
            assert set(op["responses"]) - {"200", "202"} or path in ("/healthz",), path
    comp = doc["components"]["schemas"]
    row = comp["PredictRow"]
    assert row["additionalProperties"] is False and row["required"] == ["x0", "x1", "x2", "c0", "c1"]
    assert row["properties"]["x0"]["type"] == "number" and row["properties"]["c0"]["enum"] == ["a", "b", "c"]
    assert {"type": "null"} in row["properties"]["x1"]["anyOf"] and {"type": "null"} in row["properties"]["c1"]["anyOf"]
    # the range a value may take: mean +- 1e6 std of the served version's preprocessor, rounded outwards
    lo, hi = row["properties"]["x2"]["minimum"], row["properties"]["x2"]["maximum"]
    assert lo < 100 - 40e6 and hi > 100 + 40e6 and hi < 100 + 40.01e6
    assert comp["PredictInstances"]["properties"]["instances"]["maxItems"] == 50
    assert paths["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"}
    assert set(paths["/v1/feedback"]["post"]["responses"]) == {"202", "401", "404", "413", "422", "500", "503"}


def test_the_document_follows_the_key_and_the_served_versions(monkeypatch):
    """No key configured: no security, no 401. A rollout (the versions replaced) remakes the numeric ranges,
    the widest of the stable and candidate versions (a request may be routed to either)."""
    from serve.endpoint import Versions

    ep, _ = _endpoint(monkeypatch)
    ep._api_token = None
    app = build_http_app(ep)
    doc = app.openapi()
    assert "securitySchemes" not in doc["components"]
    assert all("security" not in op and "401" not in op["responses"] for ops in doc["paths"].values()
               for op in ops.values())
    stable = ep.versions.stable
    wide = Preprocessor(stable.schema, [0.5, -2.0, 100.0], [1.5, 0.25, 80.0], fill={"x1": -2.0, "c1": "u"})
    candidate = Scorer(name="student", version=2, model=stable.model, schema=stable.schema, preprocessor=wide)
    assert app.openapi() is doc  # cached while the versions stay
    ep.versions = Versions(stable, candidate, 10.0)
    x2 = app.openapi()["components"]["schemas"]["PredictRow"]["properties"]["x2"]
    assert x2["maximum"] > 100 + 80e6 and x2["minimum"] < 100 - 80e6


def test_the_parser_refuses_just_past_the_declared_range(api):
    """The declared bound is rounded outwards: the float64 just past it is refused (it would be accepted
    if the bound were the exact mean + 1e6 std, since the parser compares float32-rounded values)."""
    schema, ep, _ = api
    row = schema.raw_schema["components"]["schemas"]["PredictRow"]["properties"]
    body = {"x0": 0.5, "x1": None, "x2": 100.0, "c0": "a", "c1": None}
    app = build_http_app(ep)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        for name in ("x0", "x2"):
            for edge, step in (("maximum", np.inf), ("minimum", -np.inf)):
                past = float(np.nextafter(row[name][edge], step))
                r = client.post("/v1/predict", headers=AUTH, json={"instances": [dict(body, **{name: past})]})
                assert r.status_code == 422 and r.json()["detail"]["field"] == f"instances[0].{name}", (name, edge)
        assert client.post("/v1/predict", headers=AUTH, json={"instances": [body]}).status_code == 200


def _fuzz(op, mode, examples: int, headers: dict, count: dict) -> None:
    """`examples` generated cases of `op` in `mode`, sent with `headers`, each answer checked (the first
    failure fails the test, shrunk by hypothesis)."""

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(headers=headers)
        key = f"{op.label} {mode.value}{'' if headers is AUTH else ' wrong-key'} {response.status_code}"
        count[key] = count.get(key, 0) + 1
        case.validate_response(response, checks=CHECKS)

    run()


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(api):
    """Every route, positive and negative bodies, with the key and (for /v1/*) with a wrong one: >= 1,000
    generated cases, deterministic (derandomized, no example database)."""
    schema, _, _ = api
    count: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if op.body else [GenerationMode.POSITIVE]
        for mode in modes:
            _fuzz(op, mode, EXAMPLES_BODY if op.body else EXAMPLES_GET, AUTH, count)
        if op.path.startswith("/v1/"):
            _fuzz(op, GenerationMode.POSITIVE, EXAMPLES_WRONG_KEY, WRONG_KEY, count)
    total = sum(count.values())
    print(json.dumps({"cases": total, "by_operation_and_status": count}, sort_keys=True))
    assert total >= MIN_CASES, count
    # every route was reached, and the answers cover the paths that matter: scored, refused, joined, locked out
    statuses = {int(k.rsplit(" ", 1)[1]) for k in count}
    assert {200, 202, 401, 404, 422} <= statuses, count
    assert all(int(k.rsplit(" ", 1)[1]) == 401 for k in count if "wrong-key" in k), count
    assert not any(int(k.rsplit(" ", 1)[1]) >= 500 for k in count), count
