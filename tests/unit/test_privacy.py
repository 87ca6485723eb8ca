"""Privacy of logs and stored traffic (issue 21), tier 1: no Ray, no network.

The FastAPI app of a replica runs in-process over a real (untrained) student, with the API key on, and a plain
`Monitor` behind a fake actor handle writing recent traffic, labels and snapshots to disk. After predictions
(a sensitive column holding unique markers), refused requests that would echo values, and feedback, every log
record (every logger, DEBUG, also written to a file), every answer, every Parquet file (all columns as text), the
snapshot JSON and the /v1/monitor report are searched for the API key, the Ray token, the traffic salt and the
sensitive markers: none may appear. Also: the salt is a secret per deployment (two deployments hash one id
differently), kept across monitor restarts (hashes still join), keyed with HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from helpers.endpoint import bare_endpoint
from pydantic import ValidationError

from raysys.config import ModelConfig
from raysys.data import Preprocessor
from raysys.data.schema import DatasetSchema, FeatureSpec, schema_to_dict
from raysys.models import build_model, model_spec
from raysys.monitor import Monitor, ReferenceProfile
from raysys.monitor.salt import SALT_FILE, TRAFFIC_SALT_ENV, TRAFFIC_SALT_FILE_ENV, hash_value
from raysys.monitor.store import hash_value as store_hash_value
from serve.routes import build_http_app

KEY = "api-key-marker-3f9c2a7be1d04c55"
RAY_TOKEN = "ray-token-marker-8d1e6b40a2f7c933"
AUTH = {"Authorization": f"Bearer {KEY}"}
# what a sensitive column carries: the numbers as sent and as float32 round-trips them (Parquet, %g)
INCOME = [987654.321, 876543.219]
INCOME_TEXT = ["987654.3", "876543.2"]
HUGE = 4.2424242e21  # refused (too many standard deviations out); its message must not echo it
HUGE_TEXT = ["4.24242e+21", "4.2424242e", "42424242"]
CITY = "city-marker-zq7x"  # a category of the sensitive categorical feature
UNKNOWN_CITY = "unknown-city-marker-k2v9"  # refused: unknown category, never echoed
REQUEST_ID = "rid-marker-5c8e1f"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (TRAFFIC_SALT_ENV, TRAFFIC_SALT_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)


def _schema() -> DatasetSchema:
    return DatasetSchema(label="y", classes=["no", "yes"], features=[
        FeatureSpec(name="x0", kind="numeric"),
        FeatureSpec(name="income", kind="numeric", sensitive=True),
        FeatureSpec(name="c0", kind="categorical", categories=["a", "b"]),
        FeatureSpec(name="city", kind="categorical", categories=["paris", CITY], sensitive=True)])


def _profile(schema: DatasetSchema, pre: Preprocessor) -> dict:
    rng = np.random.default_rng(0)
    x_num = rng.normal(size=(200, 2)) * pre.std + pre.mean
    x_cat = np.stack([rng.integers(0, 2, 200), rng.integers(0, 2, 200)], 1)
    return ReferenceProfile.from_arrays(schema, x_num, x_cat, num_bins=5, pred=rng.integers(0, 2, 200)).to_dict()


def _monitor(tmp_path, schema, pre, traffic="traffic", **cfg) -> Monitor:
    return Monitor(_profile(schema, pre), schema_to_dict(schema),
                   {"window_size": 100, "min_rows": 10, "traffic_uri": str(tmp_path / traffic),
                    "traffic_hash_columns": ["request_id"], "traffic_flush_interval_s": 3600,
                    "snapshot_uri": str(tmp_path / "snap"), **cfg}, model_version=1)


def _endpoint(monkeypatch, mon: Monitor, schema: DatasetSchema, pre: Preprocessor):
    return bare_endpoint(monkeypatch, schema, pre, mon, KEY, registry_uri="memory://privacy")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture()
def all_logs(tmp_path, caplog):
    """Every record of every logger at DEBUG: caplog (root), plus a handler of ours on the root and on every
    logger that does not propagate (Ray's), also writing to a file. Yields a function returning all the text."""
    caplog.set_level(logging.DEBUG)
    fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
    capture, to_file = _Capture(), logging.FileHandler(tmp_path / "run.log")
    for h in (capture, to_file):
        h.setLevel(logging.DEBUG)
        h.setFormatter(fmt)
    targets = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger) and not lg.propagate]
    targets += [logging.getLogger(n) for n in ("raysys", "ray.serve", "ray") if logging.getLogger(n) not in targets]
    saved = [(lg, lg.level, lg.disabled) for lg in targets]
    for lg in targets:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
        lg.addHandler(capture)
        lg.addHandler(to_file)

    def text() -> str:
        to_file.flush()
        with open(tmp_path / "run.log", encoding="utf-8") as f:
            on_disk = f.read()
        # the formatted messages (with any traceback), what caplog saw, and the file
        return "\n".join([*capture.lines, caplog.text, on_disk])

    yield text
    for lg, level, disabled in saved:
        lg.removeHandler(capture)
        lg.removeHandler(to_file)
        lg.setLevel(level)
        lg.disabled = disabled
    to_file.close()


def _parquet_text(root) -> tuple[str, int]:
    """Every Parquet file under `root`, every column as text (and the file's key-value metadata)."""
    out, n = [], 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".parquet"):
                t = pq.read_table(os.path.join(dirpath, name))
                n += 1
                out.append(str(t.schema.metadata))
                out += [json.dumps(t.column(c).to_pylist(), default=str) for c in t.column_names]
                out += [str(v) for c in t.column_names for v in t.column(c).to_pylist()]
    return "\n".join(out), n


def _assert_absent(text: str, secrets: dict[str, list[str]], where: str) -> None:
    for what, needles in secrets.items():
        for needle in needles:
            assert needle not in text, f"{what} ({needle!r}) found in {where}"


def test_no_key_token_salt_or_sensitive_value_in_logs_answers_or_stored_files(tmp_path, monkeypatch, all_logs):
    schema = _schema()
    pre = Preprocessor(schema, [0.5, 50_000.0], [1.5, 20_000.0])
    mon = _monitor(tmp_path, schema, pre)
    app = build_http_app(_endpoint(monkeypatch, mon, schema, pre))
    answers, ids = [], []
    with TestClient(app) as client:
        def post(path, body, headers=AUTH):
            r = client.post(path, headers=headers, json=body)
            answers.append(r.text)
            return r

        for i, income in enumerate(INCOME):
            r = post("/v1/predict", {"instances": [{"x0": 0.1 * i, "income": income, "c0": "a", "city": CITY},
                                                   {"x0": 1.0, "income": income, "c0": "b", "city": "paris"}],
                                     **({"request_id": REQUEST_ID} if i == 0 else {})})
            assert r.status_code == 200, r.text
            ids.append(r.json()["request_id"])
        r = post("/v1/predict", {"columns": ["x0", "income", "c0", "city"], "data": [[0.0, INCOME[1], "a", CITY]]})
        assert r.status_code == 200
        ids.append(r.json()["request_id"])
        # refused requests whose messages would echo a value: an unknown category, a value far out of range
        bad_city = post("/v1/predict", {"instances": [{"x0": 0.0, "income": 1.0, "c0": "a", "city": UNKNOWN_CITY}]})
        assert bad_city.status_code == 422 and bad_city.json()["detail"]["field"] == "instances[0].city"
        huge = post("/v1/predict", {"instances": [{"x0": 0.0, "income": HUGE, "c0": "a", "city": CITY}]})
        assert huge.status_code == 422 and huge.json()["detail"]["field"] == "instances[0].income"
        # the same mistakes in a feature that is not sensitive are still echoed (the message stays useful)
        plain = post("/v1/predict", {"instances": [{"x0": 0.0, "income": 1.0, "c0": "zz-plain", "city": CITY}]})
        assert plain.status_code == 422 and "zz-plain" in plain.text
        assert post("/v1/predict", {"instances": [{"x0": 0.0, "income": 1.0, "c0": "a", "city": CITY}]},
                    headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = post("/v1/feedback", {"feedback": [{"request_id": rid, "label": ["yes", "no"]} for rid in ids[:2]]})
        assert r.status_code == 202 and r.json()["accepted"] == 2, r.text
        assert post("/v1/feedback", {"request_id": ids[2], "label": "nonsense"}).status_code == 422
        assert post("/v1/feedback", {"request_id": "never-answered", "label": "no"}).status_code == 404
        report = client.get("/v1/monitor", headers=AUTH)
        assert report.status_code == 200
        answers.append(report.text)
        answers.append(client.get("/v1/model", headers=AUTH).text)
    mon.record_feedback_batch([(ids[2], "nonsense-label")])  # logs a warning of its own
    assert mon.snapshot()  # writes the snapshot and flushes traffic + labels

    traffic = tmp_path / "traffic"
    salt = (traffic / SALT_FILE).read_text().strip()
    assert len(salt) == 64 and stat.S_IMODE((traffic / SALT_FILE).stat().st_mode) == 0o600
    secrets = {"the API key": [KEY], "the Ray token": [RAY_TOKEN], "the traffic salt": [salt, salt[:16]],
               "a sensitive value": [*INCOME_TEXT, *HUGE_TEXT, CITY, UNKNOWN_CITY]}
    parquet, n_files = _parquet_text(traffic)
    assert n_files == 2  # the traffic and the joined labels
    _assert_absent(parquet, {**secrets, "a raw request id": [REQUEST_ID]}, "the stored traffic")
    t = pq.read_table(next(p for p in traffic.glob("*.parquet")))
    assert t.num_rows == 5 and {"income", "city", "x0", "c0", "request_id"} <= set(t.column_names)
    assert t.column("city").to_pylist()[0] == hash_value(CITY, salt)  # hashed, not dropped
    assert t.column("c0").to_pylist()[:2] == ["a", "b"]  # the other columns stay raw
    labels = pq.read_table(next(p for p in (traffic / "labels").glob("*.parquet")))
    assert set(labels.column("request_id").to_pylist()) <= set(t.column("request_id").to_pylist())  # still join
    snapshots = "\n".join(p.read_text() for p in (tmp_path / "snap").rglob("*.json"))
    assert snapshots
    _assert_absent(snapshots, secrets, "the monitor snapshot")
    _assert_absent("\n".join(answers), {k: v for k, v in secrets.items() if k != "a sensitive value"}, "an answer")
    _assert_absent(bad_city.text + huge.text, secrets, "a 422 answer")
    assert json.loads(report.text)["traffic"]["salt_from"].endswith(SALT_FILE)
    assert json.loads(report.text)["traffic"]["sensitive_columns"] == ["city", "income"]
    logs = all_logs()
    assert "invalid feedback" in logs  # the capture works: it sees the monitor's own warning
    _assert_absent(logs, secrets, "the logs")


def test_traffic_sensitive_drop_writes_no_column(tmp_path):
    schema = _schema()
    pre = Preprocessor(schema, [0.5, 50_000.0], [1.5, 20_000.0])
    mon = _monitor(tmp_path, schema, pre, traffic_sensitive="drop")
    mon.record({"x_num": np.array([[0.0, INCOME[0]]]), "x_cat": np.array([[0, 1]]), "pred": np.array([1]),
                "latency_ms": [1.0], "request_ids": ["r1"]})
    mon.snapshot()
    t = pq.read_table(next((tmp_path / "traffic").glob("*.parquet")))
    assert "income" not in t.column_names and "city" not in t.column_names and "x0" in t.column_names
    assert mon.report()["traffic"]["sensitive_stored_as"] == "drop"


def _hashed_ids(mon: Monitor, request_id: str) -> str:
    mon.record({"x_num": np.array([[0.0, 1.0]]), "x_cat": np.array([[0, 0]]), "pred": np.array([0]),
                "latency_ms": [1.0], "request_ids": [request_id]})
    mon.snapshot()
    files = mon.traffic.files()
    return pq.read_table(files[-1]).column("request_id").to_pylist()[-1]


def test_the_salt_is_per_deployment_and_survives_a_restart(tmp_path):
    schema = _schema()
    pre = Preprocessor(schema, [0.5, 50_000.0], [1.5, 20_000.0])
    a = _monitor(tmp_path, schema, pre, traffic="a", snapshot_uri=str(tmp_path / "snap-a"))
    b = _monitor(tmp_path, schema, pre, traffic="b", snapshot_uri=str(tmp_path / "snap-b"))
    ha, hb = _hashed_ids(a, "same-id"), _hashed_ids(b, "same-id")
    assert len(ha) == len(hb) == 16 and ha != hb
    assert (tmp_path / "a" / SALT_FILE).read_text() != (tmp_path / "b" / SALT_FILE).read_text()
    # a restarted monitor (a new actor on the same storage) hashes the same id the same: labels keep joining
    again = _monitor(tmp_path, schema, pre, traffic="a", snapshot_uri=str(tmp_path / "snap-a"))
    assert again.restored and _hashed_ids(again, "same-id") == ha
    assert again.record_feedback("same-id", 0)["matched"]
    again.snapshot()
    labels = pq.read_table(again.recent.labels.files()[-1])
    assert labels.column("request_id").to_pylist() == [ha]
    # the hash is an HMAC keyed by the salt, not sha256 of salt + value
    salt = (tmp_path / "a" / SALT_FILE).read_text().strip()
    assert ha == hmac.new(salt.encode(), b"same-id", hashlib.sha256).hexdigest()[:16]
    assert store_hash_value is hash_value


def test_the_salt_from_the_environment(tmp_path, monkeypatch):
    schema = _schema()
    pre = Preprocessor(schema, [0.5, 50_000.0], [1.5, 20_000.0])
    monkeypatch.setenv(TRAFFIC_SALT_ENV, "env-salt-0123456789abcdef")
    mon = _monitor(tmp_path, schema, pre, traffic="env")
    assert _hashed_ids(mon, "x") == hash_value("x", "env-salt-0123456789abcdef")
    assert not (tmp_path / "env" / SALT_FILE).exists() and mon.report()["traffic"]["salt_from"] == f"${TRAFFIC_SALT_ENV}"
    monkeypatch.delenv(TRAFFIC_SALT_ENV)
    secret = tmp_path / "mounted-secret"
    secret.write_text("file-salt-fedcba9876543210\n")
    monkeypatch.setenv(TRAFFIC_SALT_FILE_ENV, str(secret))
    mon = _monitor(tmp_path, schema, pre, traffic="file", snapshot_uri=str(tmp_path / "snap-file"))
    assert _hashed_ids(mon, "x") == hash_value("x", "file-salt-fedcba9876543210")
    monkeypatch.setenv(TRAFFIC_SALT_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=f"{TRAFFIC_SALT_FILE_ENV}=.*cannot read"):
        _monitor(tmp_path, schema, pre, traffic="file2")
    monkeypatch.delenv(TRAFFIC_SALT_FILE_ENV)
    monkeypatch.setenv(TRAFFIC_SALT_ENV, "short")
    with pytest.raises(ValueError, match="at least 16"):
        _monitor(tmp_path, schema, pre, traffic="short")


def test_the_sensitive_flag_round_trips_and_is_validated(tmp_path):
    from raysys.registry import Registry

    schema = _schema()
    assert schema.sensitive == ["income", "city"]
    d = schema_to_dict(schema)
    assert d["features"][1]["sensitive"] is True and "sensitive" not in d["features"][0]  # bytes kept when unset
    assert DatasetSchema.model_validate(d) == schema and DatasetSchema.from_json(schema.to_json()) == schema
    with pytest.raises(ValidationError, match="sensitive"):
        FeatureSpec(name="x", kind="numeric", sensitive="yes")
    pre = Preprocessor(schema, [0.5, 50_000.0], [1.5, 20_000.0])
    spec = model_spec(schema, ModelConfig(hidden_dims=[8], embed_dim=2))
    reg = Registry(str(tmp_path / "reg"))
    v = reg.register("m", state_dict=build_model(spec).state_dict(), model_spec=spec, schema=schema,
                     preprocessor=pre, metrics={}, config={}, lineage={})
    assert reg.load("m", v).schema.sensitive == ["income", "city"]


def test_a_retrain_refuses_traffic_whose_sensitive_features_are_hashed(tmp_path):
    from raysys.workflow.labelled_traffic import RetrainError, read_labelled_traffic

    schema = _schema()
    pre = Preprocessor(schema, [0.5, 50_000.0], [1.5, 20_000.0])
    mon = _monitor(tmp_path, schema, pre)
    _hashed_ids(mon, "r1")
    assert mon.record_feedback("r1", 0)["matched"]
    mon.snapshot()
    with pytest.raises(RetrainError, match=r"\['income', 'city'\] are marked sensitive"):
        read_labelled_traffic(mon.recent.traffic.root, mon.recent.labels.root, schema)
