"""Request and feedback parsing, pure (no Ray, no HTTP): a `/v1/predict` body -> validated arrays, a
`/v1/feedback` body -> (request id, label) pairs. Every client error is a RequestError naming its field.

A predict request is checked in two steps, the same ones on every path:

    parse_predict(body)                 the body's shape: row or column form, request id, row count
    validate_rows([(rows, prefix)...])  the rows against the model's schema, standardised; several requests
                                        of one model version in ONE pass (the replica's batches)

`validate_request` is the two for one request; the endpoint runs `parse_predict` as a request arrives
and `validate_rows` (inside `serve.scoring.score_requests`) for each batch.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raysys.data.dataset import Preprocessor
from raysys.data.schema import DatasetSchema, SchemaError

FLOAT32_MAX = float(np.finfo(np.float32).max)
# a standardised value beyond this many training standard deviations is refused (422): no real input is
# that far out, and such values overflow the MLP's activations into inf/NaN probabilities
MAX_ABS_Z = 1e6
MAX_REQUEST_ID_CHARS = 128
MAX_FEEDBACK_ITEMS = 10_000
PREDICT_KEYS = ("instances", "columns", "data", "request_id")
# the JSON escape of a UTF-16 surrogate (\ud800-\udfff): the only way a JSON text decoded as UTF-8 can carry a
# string that is not valid UTF-8 text (a lone surrogate). A body without one needs no per-string check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
NOT_UTF8 = "is not valid UTF-8 text (a lone surrogate such as \\ud800); send Unicode text"


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
class PredictRequest:
    """A `/v1/predict` body whose shape is valid: its rows (as sent; the column form already turned into row
    objects), the key its errors are named under ("instances" or "data"), and the client's request id."""

    rows: Any
    prefix: str = "instances"
    request_id: str | None = None


@dataclass
class ValidatedRequest:
    """Rows checked against the schema: raw numeric values (what the monitor wants), standardised values
    (what the model wants) and category indices."""

    x_num_raw: np.ndarray  # float32 [n, n_num]
    x_num: np.ndarray  # float32 [n, n_num + is-missing indicators], standardised
    x_cat: np.ndarray  # int64 [n, n_cat]
    request_id: str | None = None  # the client's id for the request (None: the endpoint makes one)

    def __len__(self) -> int:
        return len(self.x_cat)


@dataclass
class ValidatedRows:
    """`validate_rows`' answer for several requests: the valid ones' rows concatenated (one forward pass),
    which requests they are and how many rows each has, and the errors of the others."""

    rows: ValidatedRequest | None  # None when no request was valid
    ok: list[int] = field(default_factory=list)  # indices of the valid requests, in order
    sizes: list[int] = field(default_factory=list)  # their row counts
    errors: dict[int, RequestError] = field(default_factory=dict)

    def split(self, array: np.ndarray) -> list[np.ndarray]:
        """A per-row array of the concatenated rows, cut back into the valid requests' parts."""
        return np.split(array, np.cumsum(self.sizes)[:-1])


# ----- the body's shape -----


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


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def too_many_rows(field: str, n: int, limit: int) -> RequestError:
    return RequestError(413, field, f"{n} rows in one request; the limit is {limit} "
                                    "(serve.max_instances_per_request): split the request")


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


def request_rows(payload: dict[str, Any], *, max_instances: int) -> tuple[Any, str]:
    """The rows of a /v1/predict payload that passed `check_predict_payload`, and the key its errors name
    ("instances", or "data" for the column form, whose rows become objects here). 413 past max_instances."""
    if "instances" in payload:
        rows = payload["instances"]
        if isinstance(rows, list) and len(rows) > max_instances:
            raise too_many_rows("instances", len(rows), max_instances)
        return rows, "instances"
    return columns_to_rows(payload["columns"], payload["data"], max_instances=max_instances), "data"


def is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (Parquet, hashing, logs): False for lone surrogates."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(text: str) -> str:
    """`text` with lone surrogates written as \\udXXX escapes, for a field name in an error."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_row_text(row: Any, where: str, names: list[str] | None = None) -> None:
    """A row object (or, with `names`, a column-form row of values) whose keys and string values are
    UTF-8 text; 422 naming `<where>.<feature>` otherwise."""
    pairs = zip(names, row) if names is not None else row.items() if isinstance(row, dict) else ()
    for name, value in pairs:
        if isinstance(name, str) and not is_utf8(name):
            raise RequestError(422, f"{where}.{shown(name)}", f"feature name {NOT_UTF8}")
        if isinstance(value, str) and not is_utf8(value):
            raise RequestError(422, f"{where}.{shown(str(name))}", f"value {NOT_UTF8}")


def check_payload_text(payload: dict[str, Any]) -> None:
    """Feature names and string values of a /v1/predict payload (that passed `check_predict_payload`) are
    UTF-8 text: 422 naming `instances[i].<name>`, `columns[j]` or `data[r].<name>` otherwise. A category or
    name that is not text would otherwise reach the monitor's Parquet writer, which refuses it."""
    if "instances" in payload:
        rows = payload["instances"]
        for i, row in enumerate(rows if isinstance(rows, list) else ()):
            _check_row_text(row, f"instances[{i}]")
        return
    columns = payload.get("columns")
    names = columns if isinstance(columns, list) else []
    for j, name in enumerate(names):
        if isinstance(name, str) and not is_utf8(name):
            raise RequestError(422, f"columns[{j}]", f"feature name {NOT_UTF8}")
    data = payload.get("data")
    for r, values in enumerate(data if isinstance(data, list) else ()):
        if isinstance(values, list):
            _check_row_text(values, f"data[{r}]", [str(n) for n in names])


def integral(value: Any) -> Any:
    """A float with no fraction (1.0) as the int it is: JSON, and the OpenAPI document's `integer`, do not
    tell 1 from 1.0. Anything else unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def check_request_id(value: Any, where: str = "request_id") -> str:
    value = integral(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise RequestError(422, where, "must be a non-empty string (or an integer)")
    value = str(value)
    if not is_utf8(value):
        raise RequestError(422, where, NOT_UTF8)
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise RequestError(422, where, f"at most {MAX_REQUEST_ID_CHARS} characters")
    return value


def parse_predict(body: bytes | str | Any, *, max_instances: int) -> PredictRequest:
    """Step one: a `/v1/predict` body (bytes, or already-parsed JSON) -> its rows, error prefix and request id.
    422 for a body that is not a JSON object, a missing `instances`, an unknown top-level key, a bad request
    id or column form; 413 for more than `max_instances` rows."""
    payload = parse_json_body(body) if isinstance(body, (bytes, bytearray, str)) else body
    check_predict_payload(payload)
    # bytes (what the endpoint gets) hold a lone surrogate only as a \udXXX escape: most bodies skip the walk
    if not isinstance(body, (bytes, bytearray)) or _SURROGATE_ESCAPE.search(body):
        check_payload_text(payload)
    request_id = check_request_id(payload["request_id"]) if "request_id" in payload else None
    rows, prefix = request_rows(payload, max_instances=max_instances)
    return PredictRequest(rows, prefix, request_id)


# ----- rows against the schema -----


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


def _out_of_range(rows: Any, schema: DatasetSchema, prefix: str) -> RequestError:
    where = _first_out_of_range(rows, schema, prefix) or prefix
    return RequestError(422, where, f"number out of range (|value| must be at most {FLOAT32_MAX:.3g})")


def rows_to_request(rows: Any, schema: DatasetSchema, preprocessor: Preprocessor,
                    prefix: str = "instances") -> ValidatedRequest:
    """Check a list of row objects against the schema and turn it into arrays; RequestError naming the field
    (422: a missing or unknown feature, a wrong type, NaN/infinity, a number out of float32 range, a value
    absurdly far from the training data, an unknown category, null for a feature the schema does not mark
    nullable). A null of a nullable feature is imputed as in training (`x_num_raw` holds the imputed value)."""
    try:
        # a float64 above float32's range becomes inf in the cast: caught just below, by field
        with np.errstate(over="ignore", invalid="ignore"):
            x_num_raw, x_cat = schema.rows_to_arrays(rows, prefix=prefix)
    except SchemaError as e:
        raise RequestError(422, e.field, e.message) from None
    except OverflowError:  # a JSON integer too large for a float (math.isfinite(10**400) raises)
        raise _out_of_range(rows, schema, prefix) from None
    missing = preprocessor.fill_missing(x_num_raw, x_cat)  # JSON nulls of nullable features: imputed here
    if not np.isfinite(x_num_raw).all():
        raise _out_of_range(rows, schema, prefix)
    with np.errstate(over="ignore", invalid="ignore"):
        x_num = preprocessor.standardize(x_num_raw, missing)
    bad = ~np.isfinite(x_num) | (np.abs(x_num) > MAX_ABS_Z)
    if bad.any():
        r, j = (int(i) for i in np.argwhere(bad)[0])
        f = schema.numeric[j]
        value = "value" if f.sensitive else f"value {float(x_num_raw[r, j]):.6g}"  # a sensitive one is never echoed
        raise RequestError(422, f"{prefix}[{r}].{f.name}",
                           f"{value} is more than {MAX_ABS_Z:.0e} training standard "
                           f"deviations from the training mean (mean {float(preprocessor.mean[j]):.6g}, "
                           f"std {float(preprocessor.std[j]):.6g})")
    return ValidatedRequest(x_num_raw, x_num, x_cat)


def validate_rows(requests: list[tuple[Any, str]], schema: DatasetSchema,
                  preprocessor: Preprocessor) -> ValidatedRows:
    """Step two, for the (rows, prefix) of several requests scored by one model: all rows in ONE pass (the
    numpy checks and the standardisation run once per batch, not once per request). When some request has
    a bad row, each is checked on its own, so that its error names its own field."""
    if len(requests) > 1 and all(isinstance(rows, list) and rows for rows, _ in requests):
        try:
            together = rows_to_request([row for rows, _ in requests for row in rows], schema, preprocessor)
            return ValidatedRows(together, list(range(len(requests))), [len(rows) for rows, _ in requests])
        except RequestError:
            pass
    out = ValidatedRows(None)
    parts = []
    for i, (rows, prefix) in enumerate(requests):
        try:
            parts.append(rows_to_request(rows, schema, preprocessor, prefix))
        except RequestError as e:
            out.errors[i] = e
            continue
        out.ok.append(i)
        out.sizes.append(len(parts[-1]))
    if len(parts) == 1:
        out.rows = parts[0]
    elif parts:
        out.rows = ValidatedRequest(*(np.concatenate([getattr(p, a) for p in parts])
                                      for a in ("x_num_raw", "x_num", "x_cat")))
    return out


def validate_request(body: bytes | str | Any, schema: DatasetSchema, preprocessor: Preprocessor, *,
                     max_instances: int) -> ValidatedRequest:
    """A `/v1/predict` body -> validated arrays: `parse_predict`, then `validate_rows` for this one request.
    Raises the RequestError (422/413, field named) either step gives."""
    request = parse_predict(body, max_instances=max_instances)
    checked = validate_rows([(request.rows, request.prefix)], schema, preprocessor)
    if checked.errors:
        raise checked.errors[0]
    checked.rows.request_id = request.request_id
    return checked.rows


# ----- request ids and feedback -----


class RequestIds:
    """Request ids for requests that came without one: 128 bits from the OS CSPRNG each, 32 hex characters
    like a uuid4's hex. Unguessable: an id is what a client needs to send feedback for a request, so
    knowing one's own ids must tell nothing about anyone else's (no per-replica prefix, no counter)."""

    def next(self) -> str:
        return secrets.token_hex(16)


def _label_ok(v: Any) -> bool:
    if isinstance(v, str):
        return bool(v) and is_utf8(v)
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _feedback_items(payload: Any) -> tuple[list, str | None]:
    """The items of a feedback body and the key their errors are named under (None: the body itself)."""
    if not isinstance(payload, dict):
        raise RequestError(422, "body", 'must be a JSON object like {"request_id": "...", "label": "..."}')
    if "feedback" not in payload:
        return [payload], None
    if set(payload) != {"feedback"}:
        raise RequestError(422, "body", 'give either "feedback": [...] or one "request_id" and "label"')
    items = payload["feedback"]
    if not isinstance(items, list) or not items:
        raise RequestError(422, "feedback", "must be a non-empty list of {request_id, label} objects")
    if len(items) > MAX_FEEDBACK_ITEMS:
        raise RequestError(413, "feedback", f"at most {MAX_FEEDBACK_ITEMS} items per request")
    return items, "feedback"


def _feedback_item(item: Any, i: int, prefix: str | None) -> tuple[str, Any]:
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
    label = [integral(v) for v in label] if isinstance(label, list) else integral(label)
    if not (_label_ok(label) or (isinstance(label, list) and label and all(_label_ok(v) for v in label))):
        raise RequestError(422, f"{where}label", "must be a class name or index (or a list of them)")
    return check_request_id(item["request_id"], f"{where}request_id"), label


def parse_feedback(body: bytes | str | Any) -> list[tuple[str, Any]]:
    """A `/v1/feedback` body -> [(request_id, label)]: {"request_id": ..., "label": ...} or
    {"feedback": [{"request_id": ..., "label": ...}, ...]}; a label is a class name or index, or a list of
    them for a request of several rows. 422 naming the field otherwise."""
    return parse_feedback_body(body)[0]


def parse_feedback_body(body: bytes | str | Any) -> tuple[list[tuple[str, Any]], str | None]:
    """`parse_feedback`, and the key its items' errors are named under ("feedback", or None for a body
    that is one item)."""
    payload = parse_json_body(body) if isinstance(body, (bytes, bytearray, str)) else body
    items, prefix = _feedback_items(payload)
    return [_feedback_item(item, i, prefix) for i, item in enumerate(items)], prefix


def feedback_answer(items: list[tuple[str, Any]], verdicts: list[dict[str, Any]], prefix: str | None
                    ) -> dict[str, Any]:
    """The `/v1/feedback` answer from the monitor's verdict per item (`Monitor.feedback_verdicts`): when any
    label was accepted, {"accepted": n, "refused": [{"index", "request_id", "reason", "message"}]} (a 202);
    otherwise a RequestError naming the first refused item's field: 422 for an invalid label, 404 when
    every request id was unknown (never answered by this endpoint, already labelled, or too old)."""
    refused = [{"index": i, "request_id": rid, "reason": v["verdict"], "message": v.get("message")}
               for i, ((rid, _), v) in enumerate(zip(items, verdicts, strict=True)) if v["verdict"] != "accepted"]
    accepted = len(items) - len(refused)
    if accepted:
        return {"accepted": accepted, "refused": refused}
    where = (lambda i: f"{prefix}[{i}].") if prefix else (lambda i: "")
    invalid = [r for r in refused if r["reason"] == "invalid_label"]
    if invalid:
        raise RequestError(422, f"{where(invalid[0]['index'])}label", invalid[0]["message"])
    first = refused[0]
    raise RequestError(404, f"{where(first['index'])}request_id",
                       f"refused: {first['message']}; send labels only for request ids this endpoint answered")
