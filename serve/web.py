"""HTTP concerns of the endpoint, framework-light: the API key (auth), the body-size cap, JSON responses
and the guard that turns exceptions into them.

Ray's token auth does not cover the Serve HTTP port: when the proxy must listen beyond 127.0.0.1, set
`RAYSYS_API_TOKEN` (or `RAYSYS_API_TOKEN_FILE`, a mounted secret) in the replicas' environment, and
clients send `Authorization: Bearer <key>` or `X-API-Key: <key>` to /v1/*.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.responses import Response

from raysys.data.schema import DatasetSchema
from serve.parsing import RequestError

log = logging.getLogger("ray.serve")

API_TOKEN_ENV = "RAYSYS_API_TOKEN"
API_TOKEN_FILE_ENV = "RAYSYS_API_TOKEN_FILE"
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


def load_api_token(explicit: str | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The endpoint's API key: `explicit`, else $RAYSYS_API_TOKEN, else the first line of the file named by
    $RAYSYS_API_TOKEN_FILE (a mounted secret). None: no auth. A named file that is missing or empty is an
    error (ValueError), never a silently open endpoint."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit
    if env.get(API_TOKEN_ENV):
        return env[API_TOKEN_ENV]
    path = env.get(API_TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        lines = Path(path).read_text().strip().splitlines()
        token = lines[0].strip() if lines else ""
    except OSError as e:
        raise ValueError(f"{API_TOKEN_FILE_ENV}={path}: cannot read the API key file ({e.strerror})") from None
    if not token:
        raise ValueError(f"{API_TOKEN_FILE_ENV}={path}: the API key file is empty")
    return token


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
