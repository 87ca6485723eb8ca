"""HTTP concerns of the endpoint, framework-light: the API key (auth), the body-size cap, JSON responses
and the guard that turns exceptions into them.

Ray's token auth does not cover the Serve HTTP port: the replicas read their key (`serve.apikey`:
`RAYSYS_API_TOKEN`, or `RAYSYS_API_TOKEN_FILE`, a mounted secret) and refuse to start without one when they
listen beyond loopback; clients send `Authorization: Bearer <key>` or `X-API-Key: <key>` to /v1/*.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from contextlib import contextmanager
from typing import Any

import numpy as np
from fastapi.responses import Response

from raysys.data.schema import DatasetSchema
from serve.apikey import API_TOKEN_ENV, API_TOKEN_FILE_ENV, load_api_token  # noqa: F401 (re-exported)
from serve.parsing import RequestError

log = logging.getLogger("ray.serve")

# generous upper bound on the JSON size of one value (`"a_long_feature_name": -1.2345678901234567e-05, `
# is ~45 bytes); bodies larger than rows x features x this are refused before they are parsed
BODY_BYTES_PER_VALUE = 256
BODY_BYTES_SLACK = 64 * 1024


# ----- auth -----


def check_auth(authorization: str | None, token: str | None, api_key: str | None = None) -> None:
    """Raise RequestError(401) unless `token` is unset, or the request carries it as `Authorization: Bearer
    <token>` or `X-API-Key: <token>`. Compared in constant time; never logged."""
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return
    if api_key is not None and hmac.compare_digest(api_key.strip().encode(), token.encode()):
        return
    raise RequestError(401, "authorization", "missing or wrong API key; send 'Authorization: Bearer <key>' or "
                                             "'X-API-Key: <key>'")


# ----- overload -----


class Overloaded(RequestError):
    """A 503 sent with Retry-After: the replica has enough of this kind of work in flight."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(503, None, message)
        self.retry_after_s = retry_after_s


class InFlightLimit:
    """At most `limit` requests of one kind in flight in a replica; one more is refused at once (Overloaded:
    503 + Retry-After) instead of waiting, so a flood of it cannot take the slots (Serve's
    max_ongoing_requests, shared by every route) that /v1/predict needs, nor pile calls onto the monitor
    actor. Counted without a lock: the routes that use it are coroutines on the replica's one event loop, and
    nothing awaits between the check and the count."""

    def __init__(self, what: str, limit: int, retry_after_s: float):
        if limit < 1:
            raise ValueError(f"{what}: the limit must be >= 1, got {limit}")
        self.what, self.limit, self.retry_after_s = what, int(limit), float(retry_after_s)
        self.in_flight = self.peak = self.refused = 0

    @contextmanager
    def hold(self):
        if self.in_flight >= self.limit:
            self.refused += 1
            raise Overloaded(f"{self.limit} {self.what} requests already in progress on this replica; retry after "
                             f"{self.retry_after_s:g}s", self.retry_after_s)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1

    def stats(self) -> dict[str, int]:
        return {"limit": self.limit, "in_flight": self.in_flight, "peak": self.peak, "refused": self.refused}


# ----- the body -----


def max_body_bytes(schema: DatasetSchema, max_instances: int) -> int:
    return max_instances * (len(schema.features) + 1) * BODY_BYTES_PER_VALUE + BODY_BYTES_SLACK


async def read_body_capped(request: Any, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading them all. `request`: a
    Starlette Request, or anything with `headers` and an async `stream()`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "body", f"body of {int(declared)} bytes is over the {limit}-byte limit; split the request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body", f"body is over the {limit}-byte limit; split the request")
        chunks.append(chunk)
    return b"".join(chunks)


# ----- responses -----


def to_jsonable(obj: Any) -> Any:
    """numpy -> Python, NaN/inf -> None (Starlette refuses NaN in JSON), tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_response(status: int, obj: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":"), allow_nan=False), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(err: RequestError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if isinstance(err, Overloaded):
        headers = {"Retry-After": str(math.ceil(err.retry_after_s))}  # delta-seconds: a whole number
    return json_response(err.status, err.body(), headers)


async def guarded(coro) -> Response:
    """Client errors -> their JSON 4xx; anything else -> a JSON 500 with no stack trace (logged here)."""
    try:
        return await coro
    except RequestError as e:
        return error_response(e)
    except Exception:
        log.exception("raysys: unexpected error while handling a request")
        return json_response(500, {"detail": {"field": None, "message": "internal error; see the replica log"}})
