"""The endpoint's OpenAPI document, generated from the served model's DatasetSchema: the request bodies of
/v1/predict (both forms, each feature a typed property) and /v1/feedback (one label or a batch), every
response with its JSON shape, and the API-key security schemes.

The routes themselves read raw bodies (`serve.parsing`, and a pure-ASGI fast path for /v1/predict): parsing
stays off pydantic, and this document only DESCRIBES what the parser accepts. It must stay true to it:
`tests/unit/test_contract_fuzz.py` runs schemathesis against the app (a body that breaks this document must
get a 4xx, every answer must match its declared shape). Where the parser refuses more than JSON Schema can
say (a value too far from the training data, a request id that is only whitespace), the declared range is the
wider one and the description says what else is refused: a declared-valid body may still get a 422, never
the other way round.
"""

from __future__ import annotations

import math
from typing import Any

from raysys.data.schema import DatasetSchema, FeatureSpec
from serve.parsing import MAX_ABS_Z, MAX_FEEDBACK_ITEMS, MAX_REQUEST_ID_CHARS

# the declared numeric range is mean +- MAX_ABS_Z std, widened by this fraction: the parser checks the
# float32-rounded value, so a float64 just past the exact bound may round back inside it; 1e-5 is ~100
# float32 ulps, so anything past the declared bound is refused whatever the rounding
RANGE_SLACK = 1e-5
SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "`Authorization: Bearer <key>` (the replica's RAYSYS_API_TOKEN)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                     "description": "`X-API-Key: <key>` (the replica's RAYSYS_API_TOKEN)"},
}
SECURITY = [{"bearerAuth": []}, {"apiKeyHeader": []}]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def numeric_bounds(preprocessors: list[Any], num_numeric: int) -> list[tuple[float, float]]:
    """Per numeric feature, the widest [low, high] any of `preprocessors` (the versions a request may be
    routed to) accepts: mean +- MAX_ABS_Z training standard deviations (plus RANGE_SLACK)."""
    bounds = []
    for j in range(num_numeric):
        lo, hi = math.inf, -math.inf
        for pre in preprocessors:
            mean, std = float(pre.mean[j]), float(pre.std[j])
            reach = MAX_ABS_Z * abs(std) * (1 + RANGE_SLACK)
            lo, hi = min(lo, mean - reach), max(hi, mean + reach)
        bounds.append((lo, hi))
    return bounds


def feature_schema(f: FeatureSpec, bounds: tuple[float, float] | None) -> dict[str, Any]:
    if f.kind == "categorical":
        out: dict[str, Any] = {"type": "string", "enum": list(f.categories or [])}
        if f.nullable:
            out = {"anyOf": [out, {"type": "null"}], "description": "null: imputed as in training"}
        return out
    out = {"type": "number", "description": "a finite number within float32 range"}
    if bounds is not None:
        out.update(minimum=bounds[0], maximum=bounds[1],
                   description=f"a finite number within float32 range, at most {MAX_ABS_Z:.0e} training standard "
                               "deviations from the training mean (the bounds, rounded outwards)")
    if f.nullable:
        out = {"anyOf": [out, {"type": "null"}], "description": "null: imputed as in training"}
    return out


REQUEST_ID = {
    "description": f"the client's id for the request (echoed back; what /v1/feedback joins on): at most "
                   f"{MAX_REQUEST_ID_CHARS} characters of UTF-8 text, not only whitespace, or an integer whose "
                   "decimal form is that short",
    "anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_REQUEST_ID_CHARS, "pattern": r"\S"},
              {"type": "integer"}],
}
ERROR = {
    "type": "object", "required": ["detail"],
    "properties": {"detail": {
        "type": "object", "required": ["field", "message"],
        "properties": {"field": {"type": ["string", "null"], "description": "the offending field, e.g. "
                                                                             "instances[2].x3 (null: the request)"},
                       "message": {"type": "string"},
                       "model_version": {"type": "integer", "description": "500 only: the version that failed"}}}},
}


def predict_schemas(schema: DatasetSchema, bounds: list[tuple[float, float]] | None,
                    max_instances: int) -> dict[str, Any]:
    """The component schemas of a /v1/predict request (`PredictRequest`) and answer (`Prediction`)."""
    bounds = bounds or [None] * len(schema.numeric)
    by_name = dict(zip((f.name for f in schema.numeric), bounds))
    features = {f.name: feature_schema(f, by_name.get(f.name)) for f in schema.features}
    names = [f.name for f in schema.features]
    n = len(names)
    rows = {"type": "array", "minItems": 1, "maxItems": max_instances,
            "description": f"at most {max_instances} rows (serve.max_instances_per_request; more is a 413)"}
    value = {"anyOf": list(features.values())}
    return {
        "PredictRow": {"type": "object", "properties": features, "required": names, "additionalProperties": False,
                       "description": "one row: every feature of the model's schema, no other key"},
        "PredictInstances": {
            "type": "object", "required": ["instances"], "additionalProperties": False,
            "properties": {"instances": {**rows, "items": _ref("PredictRow")}, "request_id": REQUEST_ID}},
        "PredictColumns": {
            "type": "object", "required": ["columns", "data"], "additionalProperties": False,
            "description": "column form: each row of `data` holds one value per name of `columns`, in that order",
            "properties": {
                "columns": {"type": "array", "minItems": n, "maxItems": n, "uniqueItems": True,
                            "items": {"type": "string", "enum": names},
                            "description": "every feature name once, in any order"},
                "data": {**rows, "items": {"type": "array", "minItems": n, "maxItems": n, "items": value}},
                "request_id": REQUEST_ID}},
        "PredictRequest": {"oneOf": [_ref("PredictInstances"), _ref("PredictColumns")]},
        "Prediction": {
            "type": "object",
            "required": ["predictions", "probabilities", "classes", "model_version", "model_name", "request_id"],
            "properties": {"predictions": {"type": "array", "items": {"type": "string", "enum": schema.classes}},
                           "probabilities": {"type": "array", "items": {
                               "type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                               "minItems": len(schema.classes), "maxItems": len(schema.classes)}},
                           "classes": {"type": "array", "items": {"type": "string"}},
                           "model_version": {"type": "integer"}, "model_name": {"type": "string"},
                           "request_id": {"type": "string"}}},
    }


def feedback_schemas(classes: list[str]) -> dict[str, Any]:
    """The component schemas of a /v1/feedback request (`FeedbackRequest`) and its 202 (`FeedbackAccepted`)."""
    one = {"anyOf": [{"type": "string", "enum": list(classes)},
                     {"type": "integer", "minimum": 0, "maximum": len(classes) - 1}]}
    label = {"anyOf": [one, {"type": "array", "minItems": 1, "items": one}],
             "description": "a class name or index; a list of them (one per row) for a request of several rows"}
    return {
        "FeedbackItem": {"type": "object", "required": ["request_id", "label"], "additionalProperties": False,
                         "properties": {"request_id": REQUEST_ID, "label": label}},
        "FeedbackBatch": {"type": "object", "required": ["feedback"], "additionalProperties": False,
                          "properties": {"feedback": {"type": "array", "minItems": 1, "maxItems": MAX_FEEDBACK_ITEMS,
                                                      "items": _ref("FeedbackItem")}}},
        "FeedbackRequest": {"oneOf": [_ref("FeedbackItem"), _ref("FeedbackBatch")]},
        "FeedbackAccepted": {
            "type": "object", "required": ["accepted", "refused"],
            "properties": {"accepted": {"type": "integer", "minimum": 1},
                           "refused": {"type": "array", "items": {
                               "type": "object", "required": ["index", "request_id", "reason", "message"],
                               "properties": {"index": {"type": "integer", "minimum": 0},
                                              "request_id": {"type": "string"},
                                              "reason": {"type": "string",
                                                         "enum": ["unknown_request_id", "invalid_label"]},
                                              "message": {"type": ["string", "null"]}}}}}},
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


OBJECT = {"type": "object"}


def _responses(auth: bool) -> dict[str, dict[str, Any]]:
    """Per (method, path): its declared responses."""
    unauthorized = {"401": {**_error("missing or wrong API key"),
                            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}} if auth else {}
    internal = {"500": _error("unexpected error (logged by the replica)")}
    return {
        ("post", "/v1/predict"): {
            "200": _json(_ref("Prediction"), "the predicted class and probabilities of each row"),
            **unauthorized,
            "413": _error("too many rows (serve.max_instances_per_request) or a body over the byte limit"),
            "422": _error("a body the model's schema refuses; `field` names the offending value"),
            "500": _error("the model version the request was routed to (a canary) failed to score it"),
            "503": {"description": "the replica's queue is full (Ray Serve's back-pressure; retry after "
                                   "Retry-After)"},
            "504": _error("not answered within serve.request_timeout_s"),
        },
        ("post", "/v1/feedback"): {
            "202": _json(_ref("FeedbackAccepted"), "at least one label joined its prediction"),
            **unauthorized,
            "404": _error("every request id is unknown: never answered here, already labelled, or too old"),
            "413": _error(f"more than {MAX_FEEDBACK_ITEMS} items, or a body over the byte limit"),
            "422": _error("an invalid body or label; `field` names it"),
            "503": _error("monitoring is off, or the monitor is unreachable"),
            **internal,
        },
        ("get", "/v1/model"): {
            "200": _json({"type": "object", "required": ["name", "version", "schema"]},
                         "the served version: name, version, schema, metrics, lineage, spec, canary"),
            **unauthorized, **internal,
        },
        ("get", "/v1/monitor"): {
            "200": _json(OBJECT, "the monitor actor's report"),
            **unauthorized,
            "503": _error("monitoring is off, or the monitor is unreachable"),
            **internal,
        },
        ("get", "/healthz"): {
            "200": _json({"type": "object", "required": ["status", "model_version"],
                          "properties": {"status": {"const": "ok"}, "model_version": {"type": "integer"}}},
                         "alive; the version being served"),
        },
        ("get", "/readyz"): {
            "200": _json({"type": "object", "required": ["status"], "properties": {"status": {"const": "ready"}}},
                         "a model is loaded"),
            "503": _json({"type": "object", "required": ["status"],
                          "properties": {"status": {"const": "not ready"}}}, "no model loaded"),
        },
    }


BODIES = {("post", "/v1/predict"): "PredictRequest", ("post", "/v1/feedback"): "FeedbackRequest"}


def api_document(base: dict[str, Any], schema: DatasetSchema, *, max_instances: int, auth: bool,
                 bounds: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    """FastAPI's generated document (`base`: paths, summaries) with the request bodies, responses and security
    of every route put in; `bounds`: `numeric_bounds` of the versions being served (None: numbers unbounded)."""
    doc = {**base, "paths": {p: {m: dict(op) for m, op in ops.items()} for p, ops in base.get("paths", {}).items()}}
    components = dict(doc.get("components") or {})
    components["schemas"] = {**components.get("schemas", {}), "Error": ERROR,
                             **predict_schemas(schema, bounds, max_instances), **feedback_schemas(schema.classes)}
    if auth:
        components["securitySchemes"] = SECURITY_SCHEMES
    doc["components"] = components
    for (method, path), responses in _responses(auth).items():
        op = doc["paths"].get(path, {}).get(method)
        if op is None:
            continue
        op["responses"] = responses
        if (method, path) in BODIES:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": _ref(BODIES[(method, path)])}}}
        if auth and path.startswith("/v1/"):
            op["security"] = SECURITY
    return doc
