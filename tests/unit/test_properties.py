"""Tier 1: hypothesis property tests (no Ray). Request validation takes any JSON value and any Unicode (lone
surrogates included) and answers a result or a 4xx RequestError naming its field, never another exception; the
drift statistics are bounded, symmetric where they should be and zero for identical inputs; any text is a valid
registry name or a ValueError, and never a path outside the registry root. Each property is bounded
(`max_examples`), so the file runs in seconds."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from helpers.spyfs import SpyFS
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from raysys.config import DataConfig, ModelConfig
from raysys.data import Preprocessor, SyntheticTask
from raysys.models import build_model, model_spec
from raysys.monitor.profile import NumericRef
from raysys.monitor.refbins import SegmentedRefs
from raysys.monitor.stats import jensen_shannon, psi
from raysys.registry import Registry
from raysys.registry.files import NAME_RULE, RegistryFiles, check_name, check_ref
from serve.parsing import RequestError, ValidatedRequest, parse_predict, validate_request

# database=None: no .hypothesis/ directory in the checkout; deadline=None: the box is shared and busy
BOUNDED = settings(max_examples=300, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LN2 = math.log(2.0)
MAX_INSTANCES = 8

# any code point, lone surrogates (Cs) and unassigned ones (Cn) included
UNICODE = st.characters(categories=["L", "M", "N", "P", "S", "Z", "C"])
TRICKY = ["", "\ud800", "a\udfffb", "\udc00\ud800", "NaN", "-Infinity", "1e999", "-0", "\x00", "\U0001d7d8", "\u0663",
          "\ufeff", "\u202e", "..", "../x", "%2e%2e", "%2f", "#", "/etc", "..\\x", "\uff0e\uff0e", "\u2025", "a" * 200]
TEXT = st.one_of(st.text(UNICODE, max_size=12), st.sampled_from(TRICKY))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(10**400), 10**400),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=5) | st.dictionaries(TEXT, c, max_size=5),
                    max_leaves=25)


def _task():
    cfg = DataConfig(num_numeric=3, num_categorical=2, num_categories=3, num_classes=3, seed=5)
    task = SyntheticTask(cfg)
    schema = task.schema()
    table = task.sample(200, [5, 1])
    return schema, Preprocessor.fit(schema, table), table.drop_columns([schema.label]).to_pylist()


SCHEMA, PRE, ROWS = _task()
NAMES = [f.name for f in SCHEMA.numeric] + [f.name for f in SCHEMA.categorical]
CATEGORIES = sorted({v for f in SCHEMA.categorical for v in f.categories})
KEYS = st.one_of(st.sampled_from(NAMES), TEXT)
VALUES = st.one_of(SCALARS, st.sampled_from(CATEGORIES), st.floats(-5, 5), st.lists(SCALARS, max_size=2))


@st.composite
def rows(draw):
    """A valid row with a few features replaced, removed or added: the bodies that reach the deep checks."""
    row = dict(draw(st.sampled_from(ROWS)))
    for key, value in draw(st.lists(st.tuples(KEYS, VALUES), max_size=3)):
        row[key] = value
    for key in draw(st.lists(st.sampled_from(NAMES), max_size=2)):
        row.pop(key, None)
    return row


@st.composite
def payloads(draw):
    kind = draw(st.sampled_from(["json", "rows", "columns", "columns_junk"]))
    if kind == "json":
        return draw(JSON)
    extra = draw(st.dictionaries(st.sampled_from(["request_id", "data", "extra"]), JSON, max_size=1))
    body_rows = draw(st.lists(rows(), max_size=MAX_INSTANCES + 1))
    if kind == "rows":
        return {"instances": body_rows, **extra}
    if kind == "columns":
        cols = draw(st.permutations(NAMES))
        return {"columns": cols, "data": [[r.get(c) for c in cols] for r in body_rows]}
    return {"columns": draw(st.lists(KEYS, max_size=6)), "data": draw(st.lists(st.lists(VALUES, max_size=6),
                                                                                 max_size=3))}


def _encode(payload, how: str):
    """The body as the endpoint gets it (bytes), as text, or as parsed JSON."""
    if how == "object":
        return payload
    if how == "text":  # lone surrogates stay in the str
        return json.dumps(payload, ensure_ascii=False)
    if how == "invalid_utf8":  # lone surrogates as raw (invalid) UTF-8 bytes
        return json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(payload).encode()  # ASCII with \\uXXXX escapes


def _answer(body):
    """validate_request's result, or None for a well-formed RequestError; anything else fails the test."""
    try:
        parse_predict(body, max_instances=MAX_INSTANCES)
        out = validate_request(body, SCHEMA, PRE, max_instances=MAX_INSTANCES)
    except RequestError as e:
        assert 400 <= e.status < 500, e
        # the field is the client's own key for an unknown one, which may be "" (a JSON object allows it)
        assert isinstance(e.field, str) and (e.field or "unknown key" in e.message) and e.message, e
        json.dumps(e.body())  # the error itself can be sent back
        return None
    assert isinstance(out, ValidatedRequest)
    n = len(out)
    assert 1 <= n <= MAX_INSTANCES or n == 0
    assert out.x_num.shape[0] == out.x_num_raw.shape[0] == n and out.x_cat.shape == (n, len(SCHEMA.categorical))
    assert np.isfinite(out.x_num).all() and np.isfinite(out.x_num_raw).all()
    return out


@BOUNDED
@given(payload=payloads(), how=st.sampled_from(["object", "text", "ascii", "invalid_utf8"]))
def test_any_predict_body_is_a_result_or_a_4xx_naming_its_field(payload, how):
    try:
        body = _encode(payload, how)
    except ValueError:  # an integer too long for json.dumps: nothing a client could send
        assume(False)
    _answer(body)


@settings(BOUNDED, max_examples=200)
@given(raw=st.one_of(st.binary(max_size=64), st.text(UNICODE, max_size=64),
                     st.text(st.sampled_from('[]{}",:0123456789.eE+-ntrufalsNI\\ud800'), max_size=64)))
def test_any_bytes_or_text_body_is_a_result_or_a_4xx(raw):
    _answer(raw)


def test_valid_rows_still_validate():
    # the properties above must not pass by refusing everything
    out = _answer(json.dumps({"instances": ROWS[:3], "request_id": "r1"}).encode())
    assert out is not None and len(out) == 3 and out.request_id == "r1"


# ----- drift statistics (raysys.monitor.stats, refbins) -----

COUNTS = st.integers(1, 16).flatmap(lambda k: st.tuples(
    st.lists(st.integers(0, 10**6), min_size=k, max_size=k).filter(lambda v: sum(v) > 0),
    st.lists(st.integers(0, 10**6), min_size=k, max_size=k).filter(lambda v: sum(v) > 0)))


def _props(counts) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    return c / c.sum()


@BOUNDED
@given(pair=COUNTS, scale=st.integers(1, 1000))
def test_psi_is_non_negative_symmetric_and_zero_for_identical_inputs(pair, scale):
    p, q = pair
    d = psi(_props(p), np.asarray(q, dtype=np.float64))
    assert math.isfinite(d) and d >= -1e-12
    assert d == pytest.approx(psi(_props(q), np.asarray(p, dtype=np.float64)), rel=1e-9, abs=1e-12)
    assert d == pytest.approx(psi(_props(p), np.asarray(q, dtype=np.float64) * scale), rel=1e-9, abs=1e-12)
    assert abs(psi(_props(p), np.asarray(p, dtype=np.float64) * scale)) <= 1e-12
    assert psi(_props(p), np.zeros(len(p))) == 0.0  # an empty window: nothing to compare yet


@BOUNDED
@given(pair=COUNTS)
def test_jensen_shannon_is_bounded_by_ln2_symmetric_and_zero_for_identical_inputs(pair):
    p, q = pair
    d = jensen_shannon(_props(p), np.asarray(q, dtype=np.float64))
    assert -1e-12 <= d <= LN2 + 1e-12  # natural log: ln 2 nats (1 bit) for disjoint supports
    assert d == pytest.approx(jensen_shannon(_props(q), np.asarray(p, dtype=np.float64)), rel=1e-9, abs=1e-12)
    assert abs(jensen_shannon(_props(p), np.asarray(p, dtype=np.float64))) <= 1e-12


def test_jensen_shannon_reaches_ln2_for_disjoint_supports():
    assert jensen_shannon(np.array([1.0, 0.0]), np.array([0.0, 5.0])) == pytest.approx(LN2, rel=1e-12)


REF_COLUMN = st.one_of(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False), min_size=2, max_size=120),
    st.lists(st.sampled_from([0.0, 1.0, 2.5, -3.0, 1e3]), min_size=2, max_size=120),  # discrete: atoms, ties
    st.lists(st.integers(-50, 50).map(float), min_size=2, max_size=120))
WINDOW_VALUE = st.one_of(st.floats(-1e7, 1e7, allow_subnormal=False), st.sampled_from([math.nan, math.inf, -math.inf]))


@settings(BOUNDED, max_examples=200)
@given(cols=st.lists(REF_COLUMN, min_size=1, max_size=3), num_bins=st.integers(2, 12), exact=st.booleans(),
       data=st.data())
def test_window_statistics_are_bounded_and_zero_for_the_reference_itself(cols, num_bins, exact, data):
    n_ref = min(len(c) for c in cols)
    cols = [np.asarray(c[:n_ref]) for c in cols]
    seg = SegmentedRefs([NumericRef.build(f"f{j}", c, num_bins) for j, c in enumerate(cols)])
    n = data.draw(st.integers(0, 40))
    window = np.array(data.draw(st.lists(st.lists(WINDOW_VALUE, min_size=len(cols), max_size=len(cols)),
                                         min_size=n, max_size=n)), dtype=np.float64).reshape(n, len(cols))
    with np.errstate(all="ignore"):
        for x in (window, np.column_stack(cols)):
            got = seg.stats(x, n_ref, exact=exact)
            assert all(np.isfinite(got[k]).all() for k in ("psi", "js", "ks", "ks_p")), got
            assert (got["psi"] >= -1e-12).all() and ((got["js"] >= -1e-12) & (got["js"] <= LN2 + 1e-12)).all()
            assert ((got["ks"] >= 0) & (got["ks"] <= 1)).all() and ((got["ks_p"] >= 0) & (got["ks_p"] <= 1)).all()
            assert [int(c.sum()) for c in got["counts"]] == [len(x)] * len(cols)
    # the reference rows as the window: the same bin counts, so no drift at all (where distinct values are
    # resolved by SegmentedRefs' key map: see test_near_ties_below_the_key_resolution_are_binned_together)
    if all(_resolved(c, len(cols)) for c in cols):
        assert np.abs(got["psi"]).max() <= 1e-9 and np.abs(got["js"]).max() <= 1e-9


def _resolved(col: np.ndarray, k: int) -> bool:
    """Whether every two distinct values of `col` stay distinct in SegmentedRefs' keys: (x - lo) / range + shift,
    shift up to 10 (k - 1), so two values closer than ~1e-15 * 10k of the feature's range can share a key."""
    v = np.unique(col)
    return len(v) < 2 or float(np.diff(v).min()) > 1e-12 * k * (v[-1] - v[0])


@pytest.mark.xfail(strict=True, reason="raysys.monitor.refbins maps values to keys (x - lo) / range + shift: distinct "
                   "values closer than float resolution of the range share a key and a bin, so the reference itself "
                   "as the window shows drift (PSI 0.2 here). A limit of the one-searchsorted design, for the monitor "
                   "owner; remove this mark once refbins resolves near ties.")
def test_near_ties_below_the_key_resolution_are_binned_together():
    col = np.array([0.0, 1.0, 1.0, 3.026298690757284e-178, -1.0])
    seg = SegmentedRefs([NumericRef.build("f0", col, 2)])
    got = seg.stats(col[:, None], len(col))
    assert abs(got["psi"][0]) <= 1e-9


# ----- registry names and paths -----

PIECES = st.lists(st.sampled_from(["..", ".", "/", "\\", "%2e", "%2f", "%00", "#", "\x00", "a", "Z9", "-", "_", "~",
                                   ":", "\u2024", "\uff0e", "\u2215", "\n", " ", "v1", "latest"]), max_size=6).map("".join)
ANY_NAME = st.one_of(st.text(UNICODE, max_size=20), st.sampled_from(TRICKY), PIECES,
                     st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,140}", fullmatch=True))


def _inside(root: str, path: str) -> bool:
    return os.path.normpath(path) == path and (path == root or path.startswith(root + "/"))


@settings(BOUNDED, max_examples=500)
@given(name=ANY_NAME)
def test_any_text_is_a_valid_name_or_a_value_error_and_stays_under_the_root(name, tmp_path_factory):
    files = RegistryFiles(tmp_path_factory.getbasetemp() / "names")
    try:
        check_name("model name", name)
    except ValueError as e:
        assert str(e).startswith("registry: model name ") and NAME_RULE in str(e) and len(str(e)) < 400
        return
    assert name.isascii() and 1 <= len(name) <= 128 and name not in (".", "..") and "/" not in name
    for parts in ((name,), (name, "versions", 3), (name, "aliases", name, "000000000001.json")):
        path = files.path(*parts)
        assert _inside(files.root, path) and path.split("/")[len(files.root.split("/"))] == name


@settings(BOUNDED, max_examples=300)
@given(part=ANY_NAME)
def test_a_path_component_is_refused_or_stays_one_level_under_the_root(part, tmp_path_factory):
    files = RegistryFiles(tmp_path_factory.getbasetemp() / "parts")
    try:
        path = files.path(part)
    except ValueError as e:
        assert "path component" in str(e)
        return
    assert _inside(files.root, path) and os.path.dirname(path) == files.root


@pytest.fixture(scope="module")
def small_registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("propreg") / "reg")
    torch.manual_seed(0)
    spec = model_spec(SCHEMA, ModelConfig(hidden_dims=[4], embed_dim=2))
    reg.register("student", state_dict=build_model(spec).state_dict(), model_spec=spec, schema=SCHEMA,
                 preprocessor=PRE, metrics={}, config={}, lineage={})
    reg.set_alias("student", "production", 1)
    reg.files.fs = SpyFS(reg.files.fs)
    return reg


@settings(BOUNDED, max_examples=300)
@given(name=st.one_of(ANY_NAME, st.just("student")), ref=st.one_of(ANY_NAME, st.integers(), st.just("production"),
                                                                   st.sampled_from([1, "1", "v1", "latest", None])))
def test_resolve_answers_a_version_or_a_value_error_for_any_name_and_ref(small_registry, name, ref):
    try:
        version = small_registry.resolve(name, ref)
    except ValueError as e:
        assert str(e).startswith("registry: ")
        version = None
    seen, small_registry.files.fs.paths = small_registry.files.fs.paths, []
    assert all(_inside(small_registry.root, p) for p in seen), seen
    if version is not None:
        assert name == "student" and version == 1 and check_ref(ref) in (1, "latest", "production")
