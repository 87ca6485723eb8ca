"""The endpoint's HTTP API: a FastAPI app built per replica around its `StudentEndpoint`, and the pure-ASGI
fast path for the hot route. Routes reach the endpoint through their closure, never a module global.

HTTP API (under the application's route prefix):

    POST /v1/predict   {"instances": [{"<feature>": value, ...}, ...]} (or {"columns": [...], "data": [[...]]}),
                       optional "request_id" (at most 128 characters; an unguessable one is made when absent, and
                       returned)
                       -> {"predictions": [class], "probabilities": [[p]], "classes": [...],
                           "model_version": N, "model_name": "...", "request_id": "..."}
                       422 {"detail": {"field": "instances[0].x3", "message": "..."}} for a bad input,
                       413 for too many rows (serve.max_instances_per_request) or an oversized body,
                       401 when an API key is configured and missing/wrong, 504 past serve.request_timeout_s,
                       500 {"detail": {..., "model_version": N}} when version N (a canary) failed to score it;
                       a request id, feature name or value that is not UTF-8 text (lone surrogate) is a 422.
    POST /v1/feedback  {"request_id": "...", "label": "<class>"} (or {"feedback": [{...}, ...]}): delayed labels,
                       joined by the monitor to the logged predictions; always needs the key when one is set.
                       -> 202 {"accepted": n, "refused": [{"index", "request_id", "reason", "message"}]} when any
                       was accepted; 404 naming request_id when every id is unknown (never answered by this
                       endpoint, already labelled, or too old: refused and counted, accuracy.refused_unknown_ids);
                       422 naming the field for an invalid label; 503 when monitoring is off, or (with
                       Retry-After) when serve.max_ongoing_monitor_requests /v1/feedback + /v1/monitor requests
                       are already in progress on the replica
    GET  /v1/model     name, version, schema, metrics, lineage, model spec, the canary if any
    GET  /v1/monitor   the monitor actor's full report (503 when monitoring is off or the actor is unreachable;
                       503 + Retry-After past serve.max_ongoing_monitor_requests, as for /v1/feedback)
    GET  /healthz      liveness and the version being served (never needs the key)
    GET  /readyz       a model is loaded (never needs the key; load balancers probe it)
    GET  /openapi.json, /docs   the OpenAPI document of all the above, from the served model's schema (serve.openapi)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from serve.openapi import api_document, numeric_bounds
from serve.parsing import MAX_FEEDBACK_ITEMS, parse_feedback_body
from serve.web import BODY_BYTES_SLACK, guarded, json_response, read_body_capped, to_jsonable

FEEDBACK_MAX_BODY_BYTES = MAX_FEEDBACK_ITEMS * 512 + BODY_BYTES_SLACK


class AsgiRequest:
    """What the predict handler reads of a request (headers, body stream), straight from ASGI."""

    def __init__(self, scope, receive):
        self._receive = receive
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

    async def stream(self):
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return


class PredictFastPath:
    """Pure-ASGI shortcut for `POST /v1/predict`, the one hot route: straight to the endpoint's handler,
    skipping FastAPI's middleware and routing stack (about a third of a replica's CPU per request in a
    py-spy profile). Every other route, /docs included, goes through FastAPI as usual; the FastAPI route
    for /v1/predict stays for OpenAPI and calls the same handler."""

    def __init__(self, app, endpoint: Any):
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            path, root = scope["path"], scope.get("root_path") or ""
            if root and path.startswith(root):
                path = path[len(root):]
            if path == "/v1/predict":
                response = await self.endpoint.predict_response(AsgiRequest(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_http_app(endpoint: Any) -> FastAPI:
    """The FastAPI app of one replica, its routes bound to `endpoint` (a StudentEndpoint)."""
    app = FastAPI(title="raysys", description="Student model endpoint (Ray Serve)", docs_url="/docs",
                  redoc_url=None)
    app.add_middleware(PredictFastPath, endpoint=endpoint)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        """Score rows: {"instances": [{feature: value}, ...]} or {"columns": [...], "data": [[...]]}, optional
        "request_id". (Served by PredictFastPath; this route documents it and is its fallback.)"""
        return await endpoint.predict_response(request)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        """Delayed labels for earlier predictions, joined by request id."""
        async def run() -> Response:
            endpoint.check_auth(request)
            with endpoint.monitor_requests.hold():
                items, prefix = parse_feedback_body(await read_body_capped(request, FEEDBACK_MAX_BODY_BYTES))
                return json_response(202, await endpoint.feedback(items, prefix))

        return await guarded(run())

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response(200, to_jsonable(endpoint.health()))

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready to score: a model is loaded (never needs the key; load balancers probe it)."""
        ready = endpoint.readiness()
        return json_response(200 if ready["status"] == "ready" else 503, ready)

    @app.get("/v1/model")
    async def model_info(request: Request) -> Response:
        async def run() -> Response:
            endpoint.check_auth(request)
            return json_response(200, to_jsonable(endpoint.describe()))

        return await guarded(run())

    @app.get("/v1/monitor")
    async def monitor_report(request: Request) -> Response:
        async def run() -> Response:
            endpoint.check_auth(request)
            with endpoint.monitor_requests.hold():
                return json_response(200, to_jsonable(await endpoint.monitor_report()))

        return await guarded(run())

    install_openapi(app, endpoint)
    return app


def install_openapi(app: FastAPI, endpoint: Any) -> None:
    """/openapi.json (and /docs) from `serve.openapi.api_document`: the bodies and responses of the model being
    served, remade when a rollout replaces the served versions (the routes read raw bodies, so FastAPI alone
    would declare none)."""
    base = FastAPI.openapi(app)  # paths and summaries from the routes above; computed once
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        versions = endpoint.versions
        if cache.get("versions") is not versions:
            schema = versions.stable.schema
            held = [s for s in (versions.stable, versions.candidate) if s is not None
                    and [f.name for f in s.schema.numeric] == [f.name for f in schema.numeric]]
            bounds = numeric_bounds([s.preprocessor for s in held], len(schema.numeric))
            cache.update(versions=versions, doc=api_document(
                base, schema, max_instances=endpoint.serve_cfg.max_instances_per_request,
                auth=endpoint.auth_required, bounds=bounds))
        return cache["doc"]

    app.openapi = openapi
