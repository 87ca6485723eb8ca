"""Auth that fits the risk (tier 1, no Ray): an endpoint that listens beyond loopback without an API key
refuses to start unless serve.network says the network is private; an embedded local Ray that will serve gets
a generated key (mode 0600) whose place is printed; raysys's clients find and send it."""

from __future__ import annotations

import logging
import stat

import pytest

from raysys.config import ServeConfig
from serve.apikey import (
    API_TOKEN_ENV,
    API_TOKEN_FILE_ENV,
    auth_headers,
    client_api_key,
    ensure_api_key,
    key_usage,
    require_api_key,
)
from serve.ingress import exposure


@pytest.fixture
def no_key_env(monkeypatch, tmp_path):
    """No key in the environment and a HOME of our own (so ~/.raysys/api_key is this test's)."""
    for name in (API_TOKEN_ENV, API_TOKEN_FILE_ENV):
        monkeypatch.setenv(name, "")  # recorded as it was, so whatever the test sets is undone after it
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_exposure_names_every_way_beyond_loopback():
    assert exposure("127.0.0.1", http_host="127.0.0.1", flags=(False, False)) == []
    assert exposure("x", http_host="::1", flags=(False, False)) == []
    assert exposure("127.0.0.1", http_host="0.0.0.0", flags=(False, False)) == ["the Serve HTTP proxy binds 0.0.0.0"]
    reasons = exposure("127.0.0.1", http_host="localhost", flags=(True, True))
    assert len(reasons) == 2 and "HAProxy" in reasons[0] and "30000-31000" in reasons[1]


def test_no_key_beyond_loopback_refuses_unless_the_network_is_private(caplog):
    beyond = ["the Serve HTTP proxy binds 0.0.0.0"]
    with pytest.raises(ValueError, match=r"serve\.network='public' and no API key.*0\.0\.0\.0.*RAYSYS_API_TOKEN_FILE"
                                         r".*serve\.network: private"):
        require_api_key(None, "public", beyond)
    require_api_key("k", "public", beyond)  # a key: fine
    require_api_key(None, "public", [])  # loopback only: fine
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        require_api_key(None, "private", beyond)  # explicitly private: starts, with a warning
    assert "serve.network=private" in caplog.text
    assert ServeConfig().network == "public"
    with pytest.raises(ValueError, match="network"):
        ServeConfig(network="open")


def test_replica_init_refuses_to_start_without_a_key(no_key_env, tmp_path):
    from serve.endpoint import StudentEndpoint

    cls = next(c for c in StudentEndpoint.func_or_class.__mro__ if "_predict" in vars(c))
    ep = cls.__new__(cls)
    with pytest.raises(ValueError, match=r"serve\.network='public' and no API key.*binds 0\.0\.0\.0"):
        ep.__init__(str(tmp_path / "registry"), serve_cfg={"host": "0.0.0.0"}, monitor=False)
    # told the network is private, it gets past the check (and on to the registry, empty here)
    with pytest.raises(Exception) as e:
        ep.__init__(str(tmp_path / "registry"), serve_cfg={"host": "0.0.0.0", "network": "private"}, monitor=False)
    assert "API key" not in str(e.value)


def test_generated_key_is_0600_reused_and_handed_to_the_local_ray(no_key_env, tmp_path):
    env: dict[str, str] = {}
    path, created = ensure_api_key(tmp_path / "keys" / "api_key", env)
    assert created and env[API_TOKEN_FILE_ENV] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = path.read_text().strip()
    assert len(key) >= 40
    again, created = ensure_api_key(tmp_path / "keys" / "api_key", {})
    assert again == path and not created and path.read_text().strip() == key  # kept across runs
    assert ensure_api_key(tmp_path / "other", {API_TOKEN_ENV: "set"}) == (None, False)  # a key set: used as is
    assert ensure_api_key(tmp_path / "other", {API_TOKEN_FILE_ENV: str(path)}) == (None, False)
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="empty"):
        ensure_api_key(tmp_path / "empty", {})


def test_default_key_file_is_found_by_clients_and_its_place_printed(no_key_env, monkeypatch, caplog):
    import os

    from raysys.cli.serve import api_key_note
    from raysys.workflow.cluster import _provide_api_key

    assert client_api_key() is None and auth_headers() == {}
    with caplog.at_level(logging.INFO, logger="raysys"):
        _provide_api_key()  # what init_ray(serving=True) does before a local Ray starts
    key_file = no_key_env / ".raysys" / "api_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert f"generated the endpoint's API key at {key_file}" in caplog.text
    assert os.environ[API_TOKEN_FILE_ENV] == str(key_file)
    key = key_file.read_text().strip()
    assert auth_headers() == {"Authorization": f"Bearer {key}"}
    note = api_key_note("http://127.0.0.1:8000")
    assert str(key_file) in note and f'curl -H "Authorization: Bearer $(cat {key_file})"' in note
    assert note == key_usage(key_file, "http://127.0.0.1:8000")
    # a client in a second terminal (no variables) still finds ~/.raysys/api_key; $RAYSYS_API_TOKEN wins
    monkeypatch.delenv(API_TOKEN_FILE_ENV)
    assert client_api_key() == key
    assert client_api_key({API_TOKEN_ENV: "explicit"}) == "explicit"


def test_shipped_configs_require_a_key():
    """The RayService gives every pod the key file; cluster.yaml starts every node's Ray with it; the Serve
    config and the demo default to serve.network: public (a key, or no start beyond loopback)."""
    import yaml
    from helpers import REPO

    docs = list(yaml.safe_load_all((REPO / "deploy" / "kuberay" / "rayservice.yaml").read_text()))
    spec = docs[0]["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert env[API_TOKEN_FILE_ENV] == "/etc/raysys/api_key" and mounts["/etc/raysys"] == "api-key"
        secret = {v["name"]: v for v in pod["volumes"]}["api-key"]["secret"]
        assert secret["secretName"] == "raysys-api-key"
    cluster = (REPO / "cluster.yaml").read_text()
    assert cluster.count("RAYSYS_API_TOKEN_FILE=$HOME/.raysys/api_key ~/venv/bin/ray start") == 2
    assert '"~/.raysys/api_key": "~/.raysys/api_key"' in cluster
    serve_cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]["args"]["serve_cfg"]
    assert ServeConfig.model_validate(serve_cfg).network == "public"
