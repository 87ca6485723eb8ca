"""The Ray Serve application: one deployment holding the FastAPI ingress AND the batched scoring.

Why one deployment: every hop between deployments costs (DESIGN.md measured a FastAPI ingress calling a
batched model deployment at ~90 req/s against ~180 req/s for the two roles in one replica). So
`StudentEndpoint` parses and validates the HTTP request, standardises it, and hands the arrays to its
own `@serve.batch` method, which concatenates the requests of a batch and runs ONE forward pass.

HTTP API (under the application's route prefix):

    POST /v1/predict   {"instances": [{"<feature>": value, ...}, ...]}
                       -> {"predictions": [class], "probabilities": [[p]], "classes": [...],
                           "model_version": N, "model_name": "..."}
                       422 {"detail": {"field": "instances[0].x3", "message": "..."}} for a bad input,
                       413 for too many rows (serve.max_instances_per_request) or an oversized body,
                       401 when an API token is configured and missing/wrong.
    GET  /healthz      liveness and the version being served (never needs the token)
    GET  /v1/model     name, version, schema, metrics, lineage, model spec
    GET  /v1/monitor   the monitor actor's full report (503 when monitoring is off or the actor is unreachable)
    POST /v1/feedback  {"request_id": "...", "label": "<class>"} (or {"feedback": [{...}, ...]}): delayed labels,
                       joined by the monitor to the logged predictions (202; 503 when monitoring is off)

/v1/predict also accepts an optional "request_id" (a string, at most 128 characters; one is generated when
absent) and returns it, so a label sent later to /v1/feedback finds its prediction.

Everything a unit test needs is a plain function or class here (`validate_request`, `Scorer`,
`score_requests`, `format_prediction`, `parse_user_config`, `parse_app_args`, `MonitorBuffer`): the
deployment's methods are thin, because `@serve.batch` does not run in `_local_testing_mode`.

Rollout: `user_config` {"model_ref": <alias | version>} (or {"model_version": N}) applied with
`serve deploy` calls `reconfigure()` on the running replicas, which load the new weights beside the old
ones and swap them in one assignment: no restart, no dropped request. A ref that fails to load during
such an update leaves the replica serving its current version (the error is logged and shown at
/healthz and /v1/model as `last_reconfigure_error`) instead of failing the replica, so a typo in a
rollout never takes the endpoint down; at replica start the same error fails the replica loudly.

Monitoring is fire-and-forget: each batch appends its requests' raw inputs, probabilities and latencies to
an in-replica buffer; a background task ships the buffer to the named monitor actor (`record.remote`,
never awaited) every `monitor.flush_interval_ms` (1 s), or sooner at `monitor.flush_rows`. Each actor call
costs the replica milliseconds of CPU (Ray's task submission and reply handling: serve_load measured the
monitor at ~6% of throughput with a call every 0.2 s). A slow or dead monitor costs dropped monitoring
rows, never a slow or failed request.

Security: Ray's token auth does not cover the Serve HTTP port. The proxy binds 127.0.0.1 by default; when
it must listen more widely, set `RAYSYS_API_TOKEN` in the replicas' environment (or pass `api_token`)
and clients must send `Authorization: Bearer <token>` to /v1/*.
"""

import asyncio
import hmac
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from raysys.config import MonitorConfig, PipelineConfig, ServeConfig
from raysys.data.dataset import Preprocessor
from raysys.data.schema import DatasetSchema, SchemaError, schema_to_dict

log = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "StudentEndpoint"
DEFAULT_MODEL_NAME = "raysys-student"
DEFAULT_MONITOR_NAME = "raysys_monitor"
DEFAULT_MONITOR_NAMESPACE = "raysys"
API_TOKEN_ENV = "RAYSYS_API_TOKEN"
API_TOKEN_FILE_ENV = "RAYSYS_API_TOKEN_FILE"

FLOAT32_MAX = float(np.finfo(np.float32).max)
# a standardised value beyond this many training standard deviations is refused (422): no real input is
# that far out, and such values overflow the MLP's activations into inf/NaN probabilities
MAX_ABS_Z = 1e6
# generous upper bound on the JSON size of one value (`"a_long_feature_name": -1.2345678901234567e-05, `
# is ~45 bytes); bodies larger than rows x features x this are refused before they are parsed
BODY_BYTES_PER_VALUE = 256
BODY_BYTES_SLACK = 64 * 1024
# the monitor link's defaults are MonitorConfig's (one place to change them): ship at least this often, wake
# the flusher early at this many buffered rows, drop (and count) new rows beyond this many (monitor far behind)
_MONITOR_DEFAULTS = MonitorConfig()
MONITOR_FLUSH_INTERVAL_S = _MONITOR_DEFAULTS.flush_interval_ms / 1000
MONITOR_FLUSH_ROWS = _MONITOR_DEFAULTS.flush_rows
MONITOR_MAX_BUFFER_ROWS = _MONITOR_DEFAULTS.max_buffer_rows
MONITOR_MAX_PENDING = 16  # record calls in flight before new batches are dropped
MONITOR_RETRY_S = 5.0  # wait before re-acquiring a monitor that failed
MONITOR_REPORT_TIMEOUT_S = 10.0  # a brand-new monitor actor may still be starting its process
MAX_REQUEST_ID_CHARS = 128
MAX_FEEDBACK_ITEMS = 10_000


# ----------------------------------------------------------------------------------------------------
# request -> arrays (pure; unit-tested without Ray)
# ----------------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A client error with its HTTP status and the field it is about (None: the request as a whole)."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.field = field
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"detail": {"field": self.field, "message": self.message}}


@dataclass
class ValidatedRequest:
    """One request's rows: raw numeric values (what the monitor wants), standardised values (what the
    model wants) and category indices."""

    x_num_raw: np.ndarray  # float32 [n, n_num]
    x_num: np.ndarray  # float32 [n, n_num], standardised
    x_cat: np.ndarray  # int64 [n, n_cat]
    request_id: str | None = None  # the client's id for the request (None: the endpoint makes one)

    def __len__(self) -> int:
        return len(self.x_cat)


def max_body_bytes(schema: DatasetSchema, max_instances: int) -> int:
    return max_instances * (len(schema.features) + 1) * BODY_BYTES_PER_VALUE + BODY_BYTES_SLACK


def parse_json_body(body: bytes | str) -> Any:
    """JSON text -> Python. NaN/Infinity literals parse (Python's json accepts them) and are refused
    later with the field they sit in; deep nesting and bad encodings are 422s, not 500s."""
    if not body or not body.strip():
        raise RequestError(422, "body", 'empty body; send a JSON object like {"instances": [{...}]}')
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(422, "body", "JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int-too-long
        raise RequestError(422, "body", f"not valid JSON: {e}") from None


def too_many_rows(field: str, n: int, limit: int) -> RequestError:
    return RequestError(413, field, f"{n} rows in one request; the limit is {limit} "
                                    "(serve.max_instances_per_request): split the request")


def _first_out_of_range(rows: list, schema: DatasetSchema, prefix: str = "instances") -> str | None:
    """The first numeric field (in validation order) whose value does not fit a float32."""
    for r, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        for f in schema.numeric:
            v = row.get(f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            try:
                too_big = abs(float(v)) > FLOAT32_MAX
            except OverflowError:
                too_big = True
            if too_big:
                return f"{prefix}[{r}].{f.name}"
    return None


def rows_to_request(rows: Any, schema: DatasetSchema, preprocessor: Preprocessor, *,
                    max_instances: int, prefix: str = "instances") -> ValidatedRequest:
    """Validate a list of row objects and turn it into arrays; raise RequestError naming the field."""
    if isinstance(rows, list) and len(rows) > max_instances:
        raise too_many_rows(prefix, len(rows), max_instances)
    try:
        # a float64 above float32's range becomes inf in the cast: caught just below, by field
        with np.errstate(over="ignore", invalid="ignore"):
            x_num_raw, x_cat = schema.rows_to_arrays(rows, prefix=prefix)
    except SchemaError as e:
        raise RequestError(422, e.field, e.message) from None
    except OverflowError:  # a JSON integer too large for a float (math.isfinite(10**400) raises)
        where = _first_out_of_range(rows, schema, prefix) or prefix
        raise RequestError(422, where, f"number out of range (|value| must be at most {FLOAT32_MAX:.3g})") from None
    if not np.isfinite(x_num_raw).all():
        where = _first_out_of_range(rows, schema, prefix) or prefix
        raise RequestError(422, where, f"number out of range (|value| must be at most {FLOAT32_MAX:.3g})")
    with np.errstate(over="ignore", invalid="ignore"):
        x_num = preprocessor.standardize(x_num_raw)
    bad = ~np.isfinite(x_num) | (np.abs(x_num) > MAX_ABS_Z)
    if bad.any():
        r, j = (int(i) for i in np.argwhere(bad)[0])
        f = schema.numeric[j]
        raise RequestError(422, f"{prefix}[{r}].{f.name}",
                           f"value {float(x_num_raw[r, j]):.6g} is more than {MAX_ABS_Z:.0e} training standard "
                           f"deviations from the training mean (mean {float(preprocessor.mean[j]):.6g}, "
                           f"std {float(preprocessor.std[j]):.6g})")
    return ValidatedRequest(x_num_raw, x_num, x_cat)


def validate_request(body: bytes | str | Any, schema: DatasetSchema, preprocessor: Preprocessor, *,
                     max_instances: int) -> ValidatedRequest:
    """A `/v1/predict` body (bytes, or already-parsed JSON) -> validated arrays.

    422 (field named) for: a body that is not a JSON object, a missing `instances`, an unknown top-level
    key, a missing or unknown feature, a wrong type, NaN/infinity, a number out of float32 range, an
    unknown category. 413 for more than `max_instances` rows.
    """
    payload = parse_json_body(body) if isinstance(body, (bytes, bytearray, str)) else body
    check_predict_payload(payload)
    request_id = check_request_id(payload["request_id"]) if "request_id" in payload else None
    rows, prefix = request_rows(payload, max_instances=max_instances)
    req = rows_to_request(rows, schema, preprocessor, max_instances=max_instances, prefix=prefix)
    req.request_id = request_id
    return req


def request_rows(payload: dict[str, Any], *, max_instances: int) -> tuple[Any, str]:
    """The rows of a /v1/predict payload that passed `check_predict_payload`, and the key its errors name
    ("instances", or "data" for the column form, whose rows become objects here). 413 past max_instances."""
    if "instances" in payload:
        rows = payload["instances"]
        if isinstance(rows, list) and len(rows) > max_instances:
            raise too_many_rows("instances", len(rows), max_instances)
        return rows, "instances"
    return columns_to_rows(payload["columns"], payload["data"], max_instances=max_instances), "data"


PREDICT_KEYS = ("instances", "columns", "data", "request_id")


def check_predict_payload(payload: Any) -> None:
    """The top level of a /v1/predict body: row form {"instances": [...]} or column form {"columns": [...],
    "data": [[...], ...]}, plus an optional "request_id". 422 naming the key otherwise."""
    if not isinstance(payload, dict):
        raise RequestError(422, "body", f'must be a JSON object like {{"instances": [{{...}}]}}, got '
                                        f"{_json_type(payload)}")
    unknown = sorted(str(k) for k in payload if k not in PREDICT_KEYS)
    if unknown:
        raise RequestError(422, unknown[0], 'unknown key; send "instances" (rows) or "columns" + "data", and an '
                                            'optional "request_id"')
    if "instances" in payload:
        if "columns" in payload or "data" in payload:
            raise RequestError(422, "instances", 'give either "instances" or "columns" + "data", not both')
        return
    if "columns" not in payload and "data" not in payload:
        raise RequestError(422, "instances", 'missing; send "instances": a list of rows, one object per row (or '
                                             '"columns": [names] + "data": [[values], ...])')
    for key in ("columns", "data"):
        if key not in payload:
            raise RequestError(422, key, 'missing; the column form needs both "columns" and "data"')


def columns_to_rows(columns: Any, data: Any, *, max_instances: int) -> list[dict[str, Any]]:
    """Column form -> row dicts, so both forms share one validation (errors name `data[r].<feature>`)."""
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise RequestError(422, "columns", "must be a non-empty list of feature names")
    if len(set(columns)) != len(columns):
        dup = next(c for i, c in enumerate(columns) if c in columns[:i])
        raise RequestError(422, "columns", f"feature {dup!r} appears twice")
    if not isinstance(data, list):
        raise RequestError(422, "data", "must be a list of rows, each a list of values in the order of columns")
    if len(data) > max_instances:
        raise too_many_rows("data", len(data), max_instances)
    rows = []
    for r, values in enumerate(data):
        if not isinstance(values, list) or len(values) != len(columns):
            raise RequestError(422, f"data[{r}]", f"must be a list of {len(columns)} values (one per column)")
        rows.append(dict(zip(columns, values)))
    return rows


class RequestIds:
    """Request ids for requests that came without one: a random 64-bit prefix per replica + a counter, 32 hex
    characters like a uuid4's hex, unique across replicas, without a urandom syscall per request."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFFFFFFFFFF:016x}"


def check_request_id(value: Any, where: str = "request_id") -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise RequestError(422, where, "must be a non-empty string (or an integer)")
    value = str(value)
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise RequestError(422, where, f"at most {MAX_REQUEST_ID_CHARS} characters")
    return value


def _label_ok(v: Any) -> bool:
    return bool((isinstance(v, str) and v) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0))


def parse_feedback(body: bytes | str | Any) -> list[tuple[str, Any]]:
    """A `/v1/feedback` body -> [(request_id, label)]: {"request_id": ..., "label": ...} or
    {"feedback": [{"request_id": ..., "label": ...}, ...]}; a label is a class name or index, or a list of
    them for a request of several rows. 422 naming the field otherwise."""
    payload = parse_json_body(body) if isinstance(body, (bytes, bytearray, str)) else body
    if not isinstance(payload, dict):
        raise RequestError(422, "body", 'must be a JSON object like {"request_id": "...", "label": "..."}')
    if "feedback" in payload:
        if set(payload) != {"feedback"}:
            raise RequestError(422, "body", 'give either "feedback": [...] or one "request_id" and "label"')
        items, prefix = payload["feedback"], "feedback"
        if not isinstance(items, list) or not items:
            raise RequestError(422, "feedback", "must be a non-empty list of {request_id, label} objects")
        if len(items) > MAX_FEEDBACK_ITEMS:
            raise RequestError(413, "feedback", f"at most {MAX_FEEDBACK_ITEMS} items per request")
    else:
        items, prefix = [payload], None
    out = []
    for i, item in enumerate(items):
        where = f"{prefix}[{i}]." if prefix else ""
        if not isinstance(item, dict):
            raise RequestError(422, f"{prefix}[{i}]", "must be an object with request_id and label")
        unknown = sorted(set(item) - {"request_id", "label"})
        if unknown:
            raise RequestError(422, f"{where}{unknown[0]}", 'unknown key; use "request_id" and "label"')
        if "request_id" not in item:
            raise RequestError(422, f"{where}request_id", "missing")
        if "label" not in item:
            raise RequestError(422, f"{where}label", "missing; a class name or index")
        label = item["label"]
        if not (_label_ok(label) or (isinstance(label, list) and label and all(_label_ok(v) for v in label))):
            raise RequestError(422, f"{where}label", "must be a class name or index (or a list of them)")
        out.append((check_request_id(item["request_id"], f"{where}request_id"), label))
    return out


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


# ----------------------------------------------------------------------------------------------------
# arrays -> probabilities (pure)
# ----------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Scorer:
    """One loaded model version and what scoring needs from it. Immutable once built: a version swap
    replaces the whole object, so a request validated against one version is scored by that version."""

    name: str
    version: int
    model: torch.nn.Module
    schema: DatasetSchema
    preprocessor: Preprocessor
    model_spec: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    reference_profile: dict[str, Any] | None = None

    @classmethod
    def from_loaded(cls, loaded: Any) -> "Scorer":
        """From a `raysys.registry.LoadedModel`."""
        loaded.model.eval()
        return cls(name=loaded.name, version=int(loaded.version), model=loaded.model, schema=loaded.schema,
                   preprocessor=loaded.preprocessor, model_spec=dict(loaded.model_spec), metrics=loaded.metrics,
                   lineage=loaded.lineage, reference_profile=loaded.reference_profile)

    @property
    def classes(self) -> list[str]:
        return list(self.schema.classes)

    def predict_proba(self, x_num: np.ndarray, x_cat: np.ndarray) -> np.ndarray:
        """Standardised numeric [n, n_num] + category indices [n, n_cat] -> float64 probabilities [n, C]."""
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x_num, dtype=np.float32)),
                                torch.from_numpy(np.ascontiguousarray(x_cat, dtype=np.int64)))
            # float64 softmax: rows sum to 1 to ~1e-15 in the JSON the client reads
            probs = torch.softmax(logits.double(), dim=1).numpy()
        if not np.isfinite(probs).all():
            raise RuntimeError(f"model {self.name} v{self.version} produced non-finite probabilities")
        return probs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "classes": self.classes,
                "features": [f.name for f in self.schema.features], "schema": schema_to_dict(self.schema),
                "metrics": self.metrics, "lineage": self.lineage, "model_spec": self.model_spec,
                "has_reference_profile": self.reference_profile is not None}


@dataclass
class ScoredRows:
    """One request's rows after `score_requests`: what the monitor records, and the probabilities."""

    x_num_raw: np.ndarray  # float32 [n, n_num], as sent
    x_cat: np.ndarray  # int64 [n, n_cat]
    probs: np.ndarray  # float64 [n, C]


def score_requests(items: list[tuple]) -> list["ScoredRows | RequestError"]:
    """Validate, standardise and score the rows of many requests together: `items` are (scorer, rows,
    prefix, ...) with rows as sent (a list of objects) and prefix the key errors are named under (further
    fields are ignored). Per model version, all rows go through ONE validation pass (the numpy checks and
    the standardisation run once per batch, not once per request) and ONE forward pass, and are split back.
    A request with a bad row gets its own RequestError naming its field (as `validate_request` would); the
    others are still scored."""
    out: list[ScoredRows | RequestError | None] = [None] * len(items)
    groups: dict[int, tuple[Scorer, list[int]]] = {}
    for i, item in enumerate(items):
        groups.setdefault(id(item[0]), (item[0], []))[1].append(i)
    for scorer, idx in groups.values():
        together = None
        if all(isinstance(items[i][1], list) and items[i][1] for i in idx):
            try:
                together = rows_to_request([row for i in idx for row in items[i][1]], scorer.schema,
                                           scorer.preprocessor, max_instances=sys.maxsize)
            except RequestError:
                pass  # some request has a bad row: validate one by one, so each error names its own field
        if together is not None:
            ok, sizes = idx, [len(items[i][1]) for i in idx]
        else:
            reqs: dict[int, ValidatedRequest] = {}
            for i in idx:
                try:
                    reqs[i] = rows_to_request(items[i][1], scorer.schema, scorer.preprocessor,
                                              max_instances=sys.maxsize, prefix=items[i][2])
                except RequestError as e:
                    out[i] = e
            if not reqs:
                continue
            ok, sizes = list(reqs), [len(r) for r in reqs.values()]
            together = ValidatedRequest(*(np.concatenate([getattr(r, a) for r in reqs.values()])
                                          for a in ("x_num_raw", "x_num", "x_cat")))
        probs = scorer.predict_proba(together.x_num, together.x_cat)
        bounds = np.cumsum(sizes)[:-1]
        for i, raw, cat, pr in zip(ok, np.split(together.x_num_raw, bounds), np.split(together.x_cat, bounds),
                                   np.split(probs, bounds)):
            out[i] = ScoredRows(raw, cat, pr)
    return out  # type: ignore[return-value]


def format_prediction(scorer: Scorer, probs: np.ndarray) -> dict[str, Any]:
    classes = scorer.classes
    return {"predictions": [classes[i] for i in probs.argmax(1).tolist()], "probabilities": probs.tolist(),
            "classes": classes, "model_version": scorer.version, "model_name": scorer.name}


# ----------------------------------------------------------------------------------------------------
# configuration (pure)
# ----------------------------------------------------------------------------------------------------

USER_CONFIG_KEYS = ("model_ref", "model_version", "candidate_ref", "canary_percent", "max_batch_size",
                    "batch_wait_timeout_s")


def _check_ref(where: str, ref: Any) -> str | int:
    if isinstance(ref, bool) or not isinstance(ref, (str, int)) or (isinstance(ref, str) and not ref.strip()):
        raise ValueError(f"{where}: must be an alias name ('production', 'latest') or a version number, got {ref!r}")
    if isinstance(ref, int) and ref < 1:
        raise ValueError(f"{where}: versions start at 1, got {ref}")
    return ref


def parse_user_config(user_config: Any) -> dict[str, Any]:
    """Validate a deployment `user_config`: {"model_ref": alias|version} or {"model_version": N} (the stable
    version), optional "candidate_ref" (alias|version|None) + "canary_percent" (0..100: the share of requests
    the candidate scores), "max_batch_size" and "batch_wait_timeout_s". Returns {"model_ref": ..., ...} (only
    the keys given). Raises ValueError naming the key."""
    if user_config is None:
        return {}
    if not isinstance(user_config, dict):
        raise ValueError(f"user_config: must be a mapping such as {{'model_ref': 'production'}}, "
                         f"got {type(user_config).__name__}")
    unknown = sorted(set(user_config) - set(USER_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"user_config.{unknown[0]}: unknown key; allowed keys are {list(USER_CONFIG_KEYS)}")
    out: dict[str, Any] = {}
    if "model_ref" in user_config and "model_version" in user_config:
        raise ValueError("user_config: give model_ref or model_version, not both")
    if "model_ref" in user_config:
        out["model_ref"] = _check_ref("user_config.model_ref", user_config["model_ref"])
    if "model_version" in user_config:
        v = user_config["model_version"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"user_config.model_version: must be a version number >= 1, got {v!r}")
        out["model_ref"] = v
    if "candidate_ref" in user_config:
        ref = user_config["candidate_ref"]
        out["candidate_ref"] = None if ref is None else _check_ref("user_config.candidate_ref", ref)
    if "canary_percent" in user_config:
        v = user_config["canary_percent"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 100:
            raise ValueError(f"user_config.canary_percent: must be a number from 0 to 100, got {v!r}")
        out["canary_percent"] = float(v)
    if out.get("canary_percent") and out.get("candidate_ref", "unset") is None:
        raise ValueError("user_config.canary_percent: a canary needs user_config.candidate_ref (alias or version)")
    if "max_batch_size" in user_config:
        v = user_config["max_batch_size"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"user_config.max_batch_size: must be an integer >= 1, got {v!r}")
        out["max_batch_size"] = v
    if "batch_wait_timeout_s" in user_config:
        v = user_config["batch_wait_timeout_s"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"user_config.batch_wait_timeout_s: must be a number >= 0, got {v!r}")
        out["batch_wait_timeout_s"] = float(v)
    return out


APP_ARG_KEYS = ("registry_uri", "model_name", "model_ref", "serve_cfg", "monitor_cfg", "monitor", "monitor_name",
                "monitor_namespace", "torch_threads")


def resolve_registry_uri(uri: str | Path) -> str:
    """A URI (`s3://...`) unchanged; a local path made absolute against THIS process's cwd.

    Resolved once, in the process that builds the application (the `serve run` shell, the `raysys` CLI,
    or for `serve deploy` the cluster's build task, whose cwd is where `ray start` ran or the runtime_env
    working_dir), so every replica reads the same directory wherever its own cwd is.
    """
    uri = str(uri)
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def parse_app_args(args: dict[str, Any] | None) -> dict[str, Any]:
    """`build_app` args -> `StudentEndpoint` constructor kwargs, validated (errors name the key).

    Keys: registry_uri (required), model_name, model_ref, serve_cfg (ServeConfig fields), monitor_cfg
    (MonitorConfig fields), monitor (bool), monitor_name, monitor_namespace, torch_threads.
    """
    args = dict(args or {})
    unknown = sorted(set(args) - set(APP_ARG_KEYS))
    if unknown:
        raise ValueError(f"args.{unknown[0]}: unknown key; allowed keys are {list(APP_ARG_KEYS)}")
    if not args.get("registry_uri"):
        raise ValueError("args.registry_uri: required (a registry directory such as runs/registry, or a "
                         "pyarrow.fs URI such as s3://bucket/registry)")
    try:
        serve_cfg = ServeConfig.model_validate(args.get("serve_cfg") or {})
    except Exception as e:
        raise ValueError(f"args.serve_cfg: {e}") from None
    try:
        monitor_cfg = MonitorConfig.model_validate(args.get("monitor_cfg") or {})
    except Exception as e:
        raise ValueError(f"args.monitor_cfg: {e}") from None
    monitor = args.get("monitor", True)
    if not isinstance(monitor, bool):
        raise ValueError(f"args.monitor: must be true or false, got {monitor!r}")
    threads = args.get("torch_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"args.torch_threads: must be an integer >= 1, got {threads!r}")
    return {
        "registry_uri": resolve_registry_uri(args["registry_uri"]),
        "model_name": str(args.get("model_name") or DEFAULT_MODEL_NAME),
        "model_ref": _check_ref("args.model_ref", args.get("model_ref", "production")),
        "serve_cfg": serve_cfg.model_dump(),
        "monitor_cfg": monitor_cfg.model_dump(),
        "monitor": monitor,
        "monitor_name": str(args.get("monitor_name") or DEFAULT_MONITOR_NAME),
        "monitor_namespace": str(args.get("monitor_namespace") or DEFAULT_MONITOR_NAMESPACE),
        "torch_threads": threads,
    }


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


def route_version(request_id: str, stable: "Scorer", candidate: "Scorer | None", percent: float) -> "Scorer":
    """The version that scores a request: the candidate for `percent`% of request ids (a hash, so a retried
    request with the same id gets the same version), else the stable one."""
    if candidate is None or percent <= 0:
        return stable
    if percent >= 100:
        return candidate
    return candidate if zlib.crc32(request_id.encode()) % 10_000 < percent * 100 else stable


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


async def read_body_capped(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading them all."""
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


# ----------------------------------------------------------------------------------------------------
# monitor link: buffer (pure) + fire-and-forget shipping
# ----------------------------------------------------------------------------------------------------


class MonitorBuffer:
    """Rows waiting to be sent to the monitor, grouped by model version. Thread-safe (requests add from
    the replica's event loop; `reconfigure` flushes from Serve's thread pool)."""

    def __init__(self, max_rows: int = MONITOR_MAX_BUFFER_ROWS):
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._parts: dict[Any, list[tuple]] = {}
        self._errors: dict[Any, int] = {}
        self.rows = 0
        self.rows_dropped = 0

    def add(self, x_num_raw: np.ndarray, x_cat: np.ndarray, pred: np.ndarray | None, latency_ms: float,
            model_version: Any, *, proba: np.ndarray | None = None, request_id: str | None = None) -> bool:
        """One request's rows; see `add_many`."""
        return self.add_many([(x_num_raw, x_cat, pred, latency_ms, model_version, proba, request_id)]) == 1

    def add_many(self, parts: list[tuple]) -> int:
        """Requests' rows, each part `(x_num_raw, x_cat, pred, latency_ms, model_version, proba, request_id)`
        (pred may be None when proba is given: the monitor takes the argmax). A few array references and a
        tuple append per request under one lock per call: the request path's whole cost of monitoring.
        Returns how many parts were kept; the rest (buffer full: the monitor is far behind) are counted
        as dropped."""
        kept = 0
        with self._lock:
            for x_num_raw, x_cat, pred, latency_ms, version, proba, request_id in parts:
                n = len(x_cat)
                if self.rows + n > self.max_rows:
                    self.rows_dropped += n
                    continue
                self._parts.setdefault(version, []).append((x_num_raw, x_cat, pred, float(latency_ms), proba,
                                                            request_id))
                self.rows += n
                kept += 1
        return kept

    def add_error(self, model_version: Any) -> None:
        with self._lock:
            self._errors[model_version] = self._errors.get(model_version, 0) + 1

    def take(self) -> list[dict[str, Any]]:
        """Everything buffered, as `record` batches (one per model version); empties the buffer."""
        with self._lock:
            parts, self._parts, self.rows = self._parts, {}, 0
            errors, self._errors = self._errors, {}
        out = []
        for version, ps in parts.items():
            batch = {"x_num": np.concatenate([p[0] for p in ps]).astype(np.float32, copy=False),
                     "x_cat": np.concatenate([p[1] for p in ps]).astype(np.int64, copy=False),
                     "latency_ms": [p[3] for p in ps],
                     "model_version": version}
            if all(p[4] is not None for p in ps):
                batch["proba"] = np.concatenate([p[4] for p in ps]).astype(np.float32, copy=False)
            if any(p[2] is not None for p in ps) or "proba" not in batch:  # else the monitor takes the argmax
                batch["pred"] = np.concatenate([p[2] if p[2] is not None else p[4].argmax(1)
                                                for p in ps]).astype(np.int64, copy=False)
            if all(p[5] is not None for p in ps):
                batch["request_ids"] = [p[5] for p in ps]
                batch["rows_per_request"] = [len(p[1]) for p in ps]
            if errors.get(version):
                batch["errors"] = errors.pop(version)
            out.append(batch)
        for version, count in errors.items():  # versions with failures only
            out.append({"x_num": np.zeros(0, np.float32), "x_cat": np.zeros(0, np.int64),
                        "pred": np.zeros(0, np.int64), "latency_ms": [], "model_version": version, "errors": count})
        return out


class MonitorLink:
    """The replica's side of monitoring: acquires the named monitor actor, ships buffered rows with
    `record.remote` (never awaited on the request path), keeps at most `max_pending` calls in flight,
    and backs off for `retry_s` when the actor fails. `make_handle()` returns the actor handle (raising
    when it cannot)."""

    def __init__(self, make_handle, *, interval_s: float = MONITOR_FLUSH_INTERVAL_S,
                 flush_rows: int = MONITOR_FLUSH_ROWS, max_pending: int = MONITOR_MAX_PENDING,
                 retry_s: float = MONITOR_RETRY_S, buffer: MonitorBuffer | None = None):
        self._make_handle = make_handle
        self.interval_s = interval_s
        self.flush_rows = flush_rows
        self.max_pending = max_pending
        self.retry_s = retry_s
        self.buffer = buffer or MonitorBuffer()
        self.handle = None
        self.last_error: str | None = None
        self._next_try = 0.0
        self._pending: deque = deque()
        self.rows_sent = 0
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._lock = threading.Lock()

    # -- handle --
    def acquire(self):
        with self._lock:
            if self.handle is not None:
                return self.handle
            if time.monotonic() < self._next_try:
                return None
            try:
                self.handle = self._make_handle()
                self.last_error = None
            except Exception as e:  # the monitor must never break serving
                self._fail(f"cannot reach the monitor actor: {type(e).__name__}: {e}")
            return self.handle

    def _fail(self, message: str) -> None:
        if self.last_error != message:
            log.warning("raysys monitor: %s (retrying in %.0fs; requests are unaffected)", message, self.retry_s)
        self.last_error = message
        self.handle = None
        self._next_try = time.monotonic() + self.retry_s

    def mark_failed(self, message: str) -> None:
        with self._lock:
            self._fail(message)

    # -- request path --
    def add(self, x_num_raw, x_cat, pred, latency_ms, model_version, *, proba=None, request_id=None) -> None:
        self.add_many([(x_num_raw, x_cat, pred, latency_ms, model_version, proba, request_id)])

    def add_many(self, parts: list[tuple]) -> None:
        self.buffer.add_many(parts)
        if self.buffer.rows >= self.flush_rows and self._wake is not None:
            self._wake.set()

    def add_error(self, model_version) -> None:
        self.buffer.add_error(model_version)

    def feedback(self, items: list[tuple[str, Any]]) -> bool:
        """Send labels to the monitor (fire-and-forget). False when the monitor is unavailable."""
        handle = self.acquire()
        if handle is None:
            return False
        try:
            ref = handle.record_feedback_batch.remote(items)
        except Exception as e:
            self.mark_failed(f"record_feedback failed: {type(e).__name__}: {e}")
            return False
        if ref is not None:
            self._pending.append(ref)
        return True

    def ensure_started(self) -> None:
        """Start the flusher on the running event loop (first request); a no-op afterwards."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.prune()
                self.flush()
            except Exception as e:  # keep flushing whatever happens
                log.warning("raysys monitor: flush failed: %s", e)

    # -- shipping --
    def flush(self) -> int:
        """Send everything buffered (fire-and-forget). Returns the rows sent; drops them when the monitor
        is unavailable or too far behind."""
        batches = self.buffer.take()
        if not batches:
            return 0
        handle = self.acquire()
        sent = 0
        for batch in batches:
            n = len(batch["x_cat"])
            if handle is None or len(self._pending) >= self.max_pending:
                self.buffer.rows_dropped += n
                continue
            try:
                ref = handle.record.remote(batch)
            except Exception as e:
                self.mark_failed(f"record failed: {type(e).__name__}: {e}")
                self.buffer.rows_dropped += n
                handle = None
                continue
            if ref is not None:
                self._pending.append(ref)
            sent += n
        self.rows_sent += sent
        return sent

    async def prune(self) -> None:
        """Forget finished record calls; a failed one (dead actor) triggers a re-acquire after back-off.
        Awaiting the refs also marks their errors as handled, so Ray does not log each one."""
        if not self._pending:
            return
        import ray

        refs = [r for r in self._pending if isinstance(r, ray.ObjectRef)]
        self._pending = deque(r for r in self._pending if isinstance(r, ray.ObjectRef))
        if not refs:
            return
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=0)
        self._pending = deque(not_ready)
        results = await asyncio.gather(*ready, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.mark_failed(f"record failed: {type(errors[-1]).__name__}: {str(errors[-1])[:200]}")

    def stats(self) -> dict[str, Any]:
        return {"connected": self.handle is not None, "rows_sent": self.rows_sent,
                "rows_buffered": self.buffer.rows, "rows_dropped": self.buffer.rows_dropped,
                "calls_in_flight": len(self._pending), "last_error": self.last_error}


# ----------------------------------------------------------------------------------------------------
# the deployment
# ----------------------------------------------------------------------------------------------------

async def _await_ref(ref):
    return await asyncio.wrap_future(ref.future())


async def _guarded(coro) -> Response:
    """Client errors -> their JSON 4xx; anything else -> a JSON 500 with no stack trace (logged here)."""
    try:
        return await coro
    except RequestError as e:
        return error_response(e)
    except Exception:
        log.exception("raysys: unexpected error while handling a request")
        return json_response(500, {"detail": {"field": None, "message": "internal error; see the replica log"}})


# NOTE: every module-level name the route methods use must be defined ABOVE the class: `@serve.ingress`
# cloudpickles the FastAPI app (and so the methods' globals) when the class is decorated.


class _AsgiRequest:
    """What `_predict` reads of a request (headers, body stream), straight from ASGI."""

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


_FAST_PATH: dict[str, Any] = {}  # "endpoint": the StudentEndpoint of this replica process


class PredictFastPath:
    """Pure-ASGI shortcut for `POST /v1/predict`, the one hot route: straight to the replica's handler,
    skipping FastAPI's middleware and routing stack (about a third of a replica's CPU per request in a
    py-spy profile). Every other route, /docs included, goes through FastAPI as usual; the FastAPI route
    for /v1/predict stays for OpenAPI and calls the same handler."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        endpoint = _FAST_PATH.get("endpoint")
        if endpoint is not None and scope["type"] == "http" and scope["method"] == "POST":
            path, root = scope["path"], scope.get("root_path") or ""
            if root and path.startswith(root):
                path = path[len(root):]
            if path == "/v1/predict":
                response = await endpoint.predict_response(_AsgiRequest(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


app = FastAPI(title="raysys", description="Student model endpoint (Ray Serve)", docs_url="/docs",
              redoc_url=None)
app.add_middleware(PredictFastPath)


def _set_torch_threads(threads: int | None) -> int:
    # Ray sets OMP_NUM_THREADS to the replica's num_cpus; tiny-MLP batches gain nothing from more threads
    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op in the process
        pass
    return torch.get_num_threads()


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class StudentEndpoint:
    """FastAPI ingress + `@serve.batch` scoring of the registered student, in one replica."""

    def __init__(self, registry_uri: str, model_name: str = DEFAULT_MODEL_NAME, model_ref: str | int = "production",
                 serve_cfg: dict | None = None, monitor_cfg: dict | None = None, monitor: bool = True, *,
                 monitor_name: str = DEFAULT_MONITOR_NAME, monitor_namespace: str = DEFAULT_MONITOR_NAMESPACE,
                 torch_threads: int | None = None, api_token: str | None = None):
        from raysys.registry import Registry

        self.serve_cfg = ServeConfig.model_validate(serve_cfg or {})
        self.monitor_cfg = MonitorConfig.model_validate(monitor_cfg or {})
        self.model_name = model_name
        self.model_ref: str | int = model_ref
        self.registry = Registry(registry_uri)
        self.torch_threads = _set_torch_threads(torch_threads)
        self._api_token = load_api_token(api_token)
        self._initialised = False  # the first reconfigure() (at replica start) fails loudly; later ones don't
        self.last_reconfigure_error: str | None = None
        self._request_ids = RequestIds()
        self.batches = self.batched_requests = self.max_requests_per_batch = 0
        # through the imported module: this class is pickled by value (serve.ingress wraps it), and its own
        # globals are a copy; PredictFastPath is pickled by reference and reads the module's dict
        import serve.app as this_module

        this_module._FAST_PATH["endpoint"] = self
        self.scorer = Scorer.from_loaded(self.registry.load(model_name, model_ref))
        # canary: a second version scoring `canary_percent`% of requests (set through user_config)
        self.candidate: Scorer | None = None
        self.candidate_ref: str | int | None = None
        self.canary_percent = 0.0
        self._set_batching(self.serve_cfg.max_batch_size, self.serve_cfg.batch_wait_timeout_s)
        self._monitor_name, self._monitor_namespace = monitor_name, monitor_namespace
        self._monitor_synced = False
        self._monitor_sync_task: asyncio.Task | None = None
        self.monitor: MonitorLink | None = None
        if monitor:
            if self.scorer.reference_profile is None:
                log.warning("raysys: %s v%d has no reference profile; monitoring is off (register the model with "
                            "reference_profile= to enable it)", model_name, self.scorer.version)
            else:
                # acquired now so that a new actor starts while the replica warms up; get_or_create ignores
                # the init kwargs when the actor exists, and a version mismatch is fixed once, later
                mc = self.monitor_cfg
                self.monitor = MonitorLink(self._make_monitor_handle, interval_s=mc.flush_interval_ms / 1000,
                                           flush_rows=mc.flush_rows, buffer=MonitorBuffer(mc.max_buffer_rows))
                self.monitor.acquire()
        try:
            self.replica_id = serve.get_replica_context().replica_tag
        except Exception:
            self.replica_id = None
        log.info("raysys: serving %s v%d from %s (batch <= %d requests / %.1f ms, %d torch threads, monitor %s, "
                 "auth %s)", model_name, self.scorer.version, registry_uri, self.max_batch_size,
                 self.batch_wait_timeout_s * 1000, self.torch_threads,
                 f"{monitor_namespace}/{monitor_name}" if self.monitor else "off",
                 "on" if self._api_token else "off")

    # ----- settings -----
    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self._score_batched.set_max_batch_size(self.max_batch_size)
        self._score_batched.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def _make_monitor_handle(self):
        from raysys.monitor.actor import get_or_create_monitor

        s = self.scorer
        return get_or_create_monitor(self._monitor_name, self._monitor_namespace, profile=s.reference_profile,
                                     schema=schema_to_dict(s.schema), monitor_cfg=self.monitor_cfg.model_dump(),
                                     model_version=s.version)

    async def _sync_monitor_version(self) -> None:
        """Once per replica: point an existing monitor (made for another version) at ours."""
        if self.monitor is None or self._monitor_synced:
            return
        handle = self.monitor.acquire()
        if handle is None:
            return
        try:
            report = await asyncio.wait_for(_await_ref(handle.report.remote()), MONITOR_REPORT_TIMEOUT_S)
        except Exception as e:
            self.monitor.mark_failed(f"report failed: {type(e).__name__}: {e}")
            return
        self._monitor_synced = True
        if str(report.get("model_version")) != str(self.scorer.version):
            self._point_monitor_at(self.scorer)

    def _point_monitor_at(self, scorer: Scorer) -> None:
        if self.monitor is None or scorer.reference_profile is None:
            return
        self.monitor.flush()  # rows of the old version go out before the switch
        handle = self.monitor.acquire()
        if handle is None:
            return
        try:
            handle.set_profile.remote(scorer.reference_profile, schema_to_dict(scorer.schema), scorer.version)
        except Exception as e:
            self.monitor.mark_failed(f"set_profile failed: {type(e).__name__}: {e}")

    # ----- rollout -----
    async def reconfigure(self, user_config: dict | None) -> None:
        """Apply `user_config` in place: {"model_ref": alias|version} or {"model_version": N}, and/or
        "max_batch_size", "batch_wait_timeout_s"."""
        first = not self._initialised
        self._initialised = True
        try:
            cfg = parse_user_config(user_config)
            # load everything first, then switch stable, candidate and split in one step (no await between),
            # so no request ever sees half a rollout
            stable = await self._load_ref(cfg["model_ref"]) if "model_ref" in cfg else self.scorer
            candidate = self.candidate
            if "candidate_ref" in cfg:
                candidate = None if cfg["candidate_ref"] is None else await self._load_ref(cfg["candidate_ref"])
            percent = cfg.get("canary_percent", self.canary_percent if candidate is not None else 0.0)
            old = self.scorer
            self.scorer, self.candidate, self.canary_percent = stable, candidate, percent
            if "model_ref" in cfg:
                self.model_ref = cfg["model_ref"]
            if "candidate_ref" in cfg:
                self.candidate_ref = cfg["candidate_ref"]
            if stable is not old:
                log.info("raysys: %s stable v%d -> v%d", self.model_name, old.version, stable.version)
                # at replica start (a restart, a scale-up) the shared monitor is left alone: the one-off
                # version check (_sync_monitor_version) re-points it only if it tracks another version
                if not first:
                    self._point_monitor_at(stable)
            if candidate is not None:
                log.info("raysys: %s canary v%d takes %.1f%% of requests", self.model_name, candidate.version,
                         percent)
            if "max_batch_size" in cfg or "batch_wait_timeout_s" in cfg:
                self._set_batching(cfg.get("max_batch_size", self.max_batch_size),
                                   cfg.get("batch_wait_timeout_s", self.batch_wait_timeout_s))
            self.last_reconfigure_error = None
        except Exception as e:
            if first:
                raise  # at replica start: fail loudly (serve status shows it)
            # a running replica keeps serving what it has: a bad rollout must not take the endpoint down
            self.last_reconfigure_error = f"{type(e).__name__}: {e}"
            log.error("raysys: reconfigure(%r) failed; still serving %s v%d: %s", user_config, self.model_name,
                      self.scorer.version, e)

    async def _load_ref(self, ref: str | int) -> Scorer:
        """The Scorer for an alias or version: one already held when it is the same version, else loaded from
        the registry (sha256 checked, safetensors only) off the event loop."""
        version = await asyncio.to_thread(self.registry.resolve, self.model_name, ref)
        for held in (self.scorer, self.candidate):
            if held is not None and held.version == version:
                return held
        loaded = Scorer.from_loaded(await asyncio.to_thread(self.registry.load, self.model_name, version))
        if loaded.reference_profile is None and self.monitor is not None:
            log.warning("raysys: %s v%d has no reference profile; the monitor keeps the current one", self.model_name,
                        loaded.version)
        return loaded

    # ----- scoring -----
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _score_batched(self, items: list[tuple]) -> list[ScoredRows | RequestError]:
        # thin on purpose: @serve.batch does not run in _local_testing_mode; score_requests is unit-tested
        return self._score(items)

    def _score(self, items: list[tuple]) -> list[ScoredRows | RequestError]:
        """Score (scorer, rows, prefix, t0, request_id) items together and hand the monitor the whole batch in
        one call; a request's latency is from its arrival to its scores."""
        self._count_batch(len(items))
        out = score_requests(items)
        if self.monitor is not None:
            now = time.perf_counter()
            self.monitor.add_many([(r.x_num_raw, r.x_cat, None, (now - t0) * 1000, scorer.version, r.probs, rid)
                                   for (scorer, _, _, t0, rid), r in zip(items, out) if isinstance(r, ScoredRows)])
        return out

    def _count_batch(self, n: int) -> None:
        self.batches += 1
        self.batched_requests += n
        self.max_requests_per_batch = max(self.max_requests_per_batch, n)

    def _check_auth(self, request: Request) -> None:
        check_auth(request.headers.get("authorization"), self._api_token, request.headers.get("x-api-key"))

    async def _predict(self, request: Request) -> Response:
        t0 = time.perf_counter()
        self._check_auth(request)
        # one routing state for the whole request, even across a rollout
        stable, candidate, percent = self.scorer, self.candidate, self.canary_percent
        limit = max_body_bytes(stable.schema, self.serve_cfg.max_instances_per_request)
        payload = parse_json_body(await read_body_capped(request, limit))
        check_predict_payload(payload)
        request_id = (check_request_id(payload["request_id"]) if "request_id" in payload
                      else self._request_ids.next())
        scorer = route_version(request_id, stable, candidate, percent)
        rows, prefix = request_rows(payload, max_instances=self.serve_cfg.max_instances_per_request)
        if self.monitor is not None and self._monitor_sync_task is None:
            self.monitor.ensure_started()
            self._monitor_sync_task = asyncio.get_running_loop().create_task(self._sync_monitor_version())
        item = (scorer, rows, prefix, t0, request_id)
        if isinstance(rows, list) and len(rows) >= self.max_batch_size:
            scored = self._score([item])[0]  # a full batch on its own: waiting for company only adds latency
        else:
            # through the batcher even when no other request seems to be here: the replica's HTTP server hands
            # requests over one at a time, so concurrent requests only ever meet in the batch queue
            scored = await self._score_batched(item)
        if isinstance(scored, RequestError):
            raise scored
        out = format_prediction(scorer, scored.probs)
        out["request_id"] = request_id
        payload = json.dumps(out, separators=(",", ":"))
        return Response(payload, media_type="application/json")

    async def _predict_within_timeout(self, request: Request) -> Response:
        try:
            # asyncio.timeout, not wait_for: no extra task per request
            async with asyncio.timeout(self.serve_cfg.request_timeout_s):
                return await self._predict(request)
        except TimeoutError:
            raise RequestError(504, None, f"not answered within serve.request_timeout_s="
                                          f"{self.serve_cfg.request_timeout_s:g}s; retry later") from None

    # ----- routes -----
    async def predict_response(self, request: Request | _AsgiRequest) -> Response:
        response = await _guarded(self._predict_within_timeout(request))
        if response.status_code >= 400 and self.monitor is not None:
            self.monitor.add_error(self.scorer.version)  # counted for the monitor's error rate
        return response

    @app.post("/v1/predict")
    async def predict(self, request: Request) -> Response:
        """Score rows: {"instances": [{feature: value}, ...]} or {"columns": [...], "data": [[...]]}, optional
        "request_id". (Served by PredictFastPath; this route documents it and is its fallback.)"""
        return await self.predict_response(request)

    @app.post("/v1/feedback")
    async def feedback(self, request: Request) -> Response:
        async def run() -> Response:
            self._check_auth(request)
            body = await read_body_capped(request, MAX_FEEDBACK_ITEMS * 512 + BODY_BYTES_SLACK)
            items = parse_feedback(body)
            if self.monitor is None:
                raise RequestError(503, None, "monitoring is off for this endpoint; feedback has nowhere to go")
            self.monitor.ensure_started()
            self.monitor.flush()  # the predictions these labels refer to reach the monitor first
            if not self.monitor.feedback(items):
                raise RequestError(503, None, f"monitor unavailable: {self.monitor.last_error}")
            return json_response(202, {"accepted": len(items)})

        return await _guarded(run())

    @app.get("/healthz")
    async def healthz(self) -> Response:
        return json_response(200, to_jsonable({
            "status": "ok", "model_name": self.model_name, "model_version": self.scorer.version,
            "model_ref": self.model_ref, "replica": self.replica_id,
            "candidate_version": self.candidate.version if self.candidate else None,
            "canary_percent": self.canary_percent,
            "last_reconfigure_error": self.last_reconfigure_error,
            "batching": {"batches": self.batches, "requests": self.batched_requests,
                         "max_requests_per_batch": self.max_requests_per_batch},
            "monitor": self.monitor.stats() if self.monitor else None}))

    @app.get("/readyz")
    async def readyz(self) -> Response:
        """Ready to score: a model is loaded (never needs the key; load balancers probe it)."""
        if self.scorer is None:
            return json_response(503, {"status": "not ready", "detail": "no model loaded"})
        return json_response(200, {"status": "ready", "model_version": self.scorer.version,
                                   "candidate_version": self.candidate.version if self.candidate else None})

    @app.get("/v1/model")
    async def model_info(self, request: Request) -> Response:
        async def run() -> Response:
            self._check_auth(request)
            info = self.scorer.describe()
            info.update(model_ref=self.model_ref, registry_uri=self.registry.uri,
                        candidate=(dict(self.candidate.describe(), ref=self.candidate_ref)
                                   if self.candidate else None),
                        canary_percent=self.canary_percent,
                        last_reconfigure_error=self.last_reconfigure_error,
                        batching={"max_batch_size": self.max_batch_size,
                                  "batch_wait_timeout_s": self.batch_wait_timeout_s},
                        max_instances_per_request=self.serve_cfg.max_instances_per_request,
                        torch_threads=self.torch_threads)
            return json_response(200, to_jsonable(info))

        return await _guarded(run())

    @app.get("/v1/monitor")
    async def monitor_report(self, request: Request) -> Response:
        async def run() -> Response:
            self._check_auth(request)
            if self.monitor is None:
                raise RequestError(503, None, "monitoring is off for this endpoint (disabled, or the model has "
                                              "no reference profile)")
            self.monitor.ensure_started()
            await self._sync_monitor_version()
            self.monitor.flush()  # this replica's buffered rows reach the actor before the report call
            handle = self.monitor.acquire()
            if handle is None:
                raise RequestError(503, None, f"monitor unavailable: {self.monitor.last_error}")
            try:
                report = await asyncio.wait_for(_await_ref(handle.report.remote()), MONITOR_REPORT_TIMEOUT_S)
            except TimeoutError:
                raise RequestError(503, None, f"monitor did not answer within {MONITOR_REPORT_TIMEOUT_S:.0f}s") from None
            except Exception as e:
                self.monitor.mark_failed(f"report failed: {type(e).__name__}: {e}")
                raise RequestError(503, None, f"monitor unavailable: {type(e).__name__}") from None
            return json_response(200, to_jsonable(report))

        return await _guarded(run())

    def check_health(self) -> None:
        # called by Serve every few seconds; a replica without a model is unhealthy
        if self.scorer is None:
            raise RuntimeError("no model loaded")


# ----------------------------------------------------------------------------------------------------
# building and deploying
# ----------------------------------------------------------------------------------------------------


def replica_options(scfg: ServeConfig) -> dict[str, Any]:
    """`num_replicas`, or `autoscaling_config` when serve.autoscaling is set."""
    if scfg.autoscaling is not None:
        return {"autoscaling_config": scfg.autoscaling.model_dump()}
    return {"num_replicas": scfg.num_replicas}


def deployment_options(scfg: ServeConfig) -> dict[str, Any]:
    """The StudentEndpoint deployment options that come from ServeConfig (beside num_replicas)."""
    return {
        # a replica must admit enough concurrent requests to fill a batch while the previous one runs
        "max_ongoing_requests": scfg.max_ongoing_requests or max(8, 2 * scfg.max_batch_size),
        # beyond this queue a request gets 503 + Retry-After at once rather than waiting without bound
        "max_queued_requests": scfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": scfg.retry_after_s},
        "logging_config": {"enable_access_log": scfg.access_log},
    }


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run serve.app:build_app registry_uri=...` and for config files
    (`import_path: serve.app:build_app` with `args:`). See `parse_app_args` for the keys."""
    kwargs = parse_app_args(args)
    scfg = ServeConfig.model_validate(kwargs["serve_cfg"])
    options = {**replica_options(scfg), **deployment_options(scfg)}
    return StudentEndpoint.options(**options).bind(**kwargs)


def _serve_http_address() -> tuple[str, int]:
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return http.host, int(http.port)


def deploy(cfg: PipelineConfig, *, blocking: bool = False, model_ref: str | int = "production",
           monitor: bool = True) -> str:
    """Start Serve (HTTP on cfg.serve.host:port) and run the endpoint for cfg.model_name from
    cfg.registry_uri as application cfg.serve.app_name at cfg.serve.route_prefix. Returns the base URL
    (`http://host:port/prefix`). `blocking=True` waits until Ctrl-C after deploying.

    Serve's HTTP options are fixed when Serve first starts on a cluster: if it is already running on
    another address, that address is kept (with a warning) and returned.
    """
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    host, port = _serve_http_address()
    if (host, port) != (cfg.serve.host, cfg.serve.port):
        log.warning("raysys: Serve already runs on %s:%d; serve.host/serve.port (%s:%d) are ignored", host, port,
                    cfg.serve.host, cfg.serve.port)
    from raysys.serving import ServeAdmin, app_config, cluster_dashboard_url, deploy_app

    application = app_config(cfg, model_ref=model_ref, monitor=monitor)
    dashboard = cluster_dashboard_url()
    if dashboard:
        # declarative, as `serve deploy` does: later `raysys serve canary/promote/rollback` update it in place
        deploy_app(ServeAdmin(dashboard), application)
    else:
        log.warning("raysys: this Ray cluster has no dashboard, so the endpoint is deployed from Python "
                    "(serve.run) and `raysys serve canary/promote/rollback` cannot update it in place")
        serve.run(build_app(application["args"]), name=application["name"],
                  route_prefix=application["route_prefix"])
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{url_host}:{port}{cfg.serve.route_prefix.rstrip('/')}"
    log.info("raysys: %s serving %s at %s", cfg.serve.app_name, cfg.model_name, url)
    if blocking:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return url
