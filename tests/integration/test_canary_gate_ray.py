"""Tier 3: the metric-gated canary on a real cluster, driven the way a user drives it: `raysys serve canary`
from a second terminal (no RAY_* variable) against a token-auth `ray start` cluster, under concurrent HTTP
load through the HAProxy ingress. A candidate that fails on some inputs, one that is merely slower, and one
that disagrees with stable are rolled back with the failed check named (exit 1) while stable keeps
answering; one as good as stable is promoted (exit 0). Then rollouts that heal: the gate's process is
SIGKILLed during its canary (the next command ends the orphan once its lease lapses), and a promotion is
SIGKILLed between the Serve update and the alias move (the next command finishes it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import torch
import yaml
from helpers.cluster import BIN
from helpers.cluster import token_cluster as start_token_cluster
from helpers.serving import MODEL, Load, make_registry, poll, register_failing_version

from raysys.models import model_spec
from serve.ingress import free_port

pytestmark = pytest.mark.integration
GATE = ["--percent", "50", "--interval-s", "2", "--intervals", "3", "--min-rows", "40"]


def _register_like(reg, base: int, state_dict: dict, spec: dict | None = None, note: str = "") -> int:
    b = reg.load(MODEL, base)
    return reg.register(MODEL, state_dict=state_dict, model_spec=spec or b.model_spec, schema=b.schema,
                        preprocessor=b.preprocessor, metrics={}, config={}, lineage={"note": note},
                        reference_profile=b.reference_profile)


def _slow_copy(reg, base: int, width: int) -> int:
    """v`base`'s function in a layer `width` wide (its units zero-padded): the same answers, slower."""
    b = reg.load(MODEL, base)
    sd = b.model.state_dict()
    (w1, b1), head = (k for k in sd if k.startswith("body.0.")), "head.weight"
    spec = model_spec(b.schema, _cfg(width, b.model_spec))
    wide = {k: v.clone() for k, v in sd.items()}
    wide[w1] = torch.zeros(width, sd[w1].shape[1])
    wide[w1][:sd[w1].shape[0]] = sd[w1]
    wide[b1] = torch.zeros(width)
    wide[b1][:sd[b1].shape[0]] = sd[b1]
    wide[head] = torch.zeros(sd[head].shape[0], width)
    wide[head][:, :sd[head].shape[1]] = sd[head]
    return _register_like(reg, base, wide, spec, f"v{base} padded to {width} units")


def _cfg(width: int, spec: dict):
    from raysys.config import ModelConfig

    return ModelConfig(hidden_dims=[width], embed_dim=spec["embed_dim"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    reg, _, rows = make_registry(tmp)  # v1 production, v2 other weights
    v1 = reg.load(MODEL, 1).model.state_dict()
    versions = {"failing": register_failing_version(reg), "slow": _slow_copy(reg, 1, 60_000)}
    biased = {k: v.clone() for k, v in v1.items()}
    biased["head.bias"][0] += 50.0  # always class 0: disagrees with v1 on most rows
    versions["disagrees"] = _register_like(reg, 1, biased, note="always class 0")
    versions["good"] = _register_like(reg, 1, v1, note="v1's weights")
    versions["good2"] = _register_like(reg, 1, v1, note="v1's weights again")
    with start_token_cluster(tmp, prefix="rsg-") as cluster:
        home, dash = cluster["home"], cluster["dashboard"]
        app, http = f"gate-{uuid.uuid4().hex[:6]}", free_port()
        cfg_file = tmp / "cfg.yaml"
        cfg_file.write_text(yaml.safe_dump({"registry_uri": reg.uri, "model_name": MODEL, "serve": {
            "port": http, "app_name": app, "route_prefix": f"/{app}", "num_replicas": 2}}))
        poll(lambda: _up(dash), what="the cluster's dashboard")
        out = _terminal(home, "serve", "deploy", "--preset", "tiny", "--config", str(cfg_file), "--address",
                        cluster["gcs"], "--detach")
        assert out.returncode == 0, out.stdout + out.stderr
        url = f"http://127.0.0.1:{http}/{app}"
        poll(lambda: requests.post(f"{url}/v1/predict", json={"instances": rows[:1]}, timeout=30).status_code == 200,
             what="the deployed endpoint")
        yield {"reg": reg, "rows": rows, "home": home, "dash": dash, "app": app, "url": url, "v": versions}


def _up(dash: str) -> bool:
    try:
        requests.get(f"{dash}/api/version", timeout=5)  # any answer (a 401 without the token) means it is up
        return True
    except requests.RequestException:
        return False


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    return env


def _terminal(home: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """`raysys ...` in a fresh shell: HOME set, not one RAY_* variable. Its output with the console's line
    wrapping undone (one space for any run of whitespace), so that a message can be matched whole."""
    out = subprocess.run([str(BIN / "raysys"), *args], env=_env(home), capture_output=True, text=True,
                         timeout=timeout, cwd=str(home))
    out.stdout, out.stderr = " ".join(out.stdout.split()), " ".join(out.stderr.split())
    return out


def _serving(w) -> dict:
    return requests.get(f"{w['url']}/healthz", timeout=30).json()


def _gated_canary(w, version: int, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    with Load(w["url"], w["rows"], workers=4) as load:
        out = _terminal(w["home"], "serve", "canary", "--version", str(version), *GATE, *extra, "--app", w["app"],
                        "--address", w["dash"])
    return out, load.summary() | {"results": load.results}


@pytest.mark.parametrize("kind,check", [("failing", "server_errors"), ("slow", "latency_p99"),
                                        ("disagrees", "agreement")])
def test_a_bad_candidate_under_load_is_rolled_back_naming_the_check(world, kind, check):
    w = world
    out, load = _gated_canary(w, w["v"][kind])
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert f"{check} failed" in text and "rolled back" in text, text
    # stable answered every request routed to it; only the candidate's own requests may have failed
    assert all(st == 200 or (st == 500 and kind == "failing") for _, st, _ in load["results"]), load["statuses"]
    assert any(v == 1 for _, st, v in load["results"] if st == 200)
    health = _serving(w)
    assert health["model_version"] == 1 and health["candidate_version"] is None
    assert w["reg"].get_alias(MODEL, "production") == 1


def test_a_candidate_as_good_as_stable_is_promoted_then_rolled_back_by_hand(world):
    w = world
    out, load = _gated_canary(w, w["v"]["good"])
    assert out.returncode == 0 and "promoted" in out.stdout, out.stdout + out.stderr
    assert set(load["statuses"]) == {200}, load["statuses"]
    assert _serving(w)["model_version"] == w["v"]["good"] and w["reg"].get_alias(MODEL, "production") == w["v"]["good"]
    back = _terminal(w["home"], "serve", "rollback", "--app", w["app"], "--address", w["dash"])
    assert back.returncode == 0, back.stdout + back.stderr
    assert _serving(w)["model_version"] == 1 and w["reg"].get_alias(MODEL, "production") == 1


def test_a_killed_gate_leaves_no_canary_live_and_a_second_canary_is_refused(world):
    w = world
    cmd = [str(BIN / "raysys"), "serve", "canary", "--version", str(w["v"]["good2"]), "--percent", "50",
           "--interval-s", "2", "--intervals", "1000", "--app", w["app"], "--address", w["dash"]]
    gate = subprocess.Popen(cmd, env=_env(w["home"]), cwd=str(w["home"]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        poll(lambda: _serving(w)["candidate_version"] == w["v"]["good2"], what="the canary to go live")
        second = _terminal(w["home"], "serve", "canary", "--version", str(w["v"]["good"]), "--no-gate", "--app",
                           w["app"], "--address", w["dash"])
        assert second.returncode == 2 and "in progress" in second.stdout, second.stdout + second.stderr
    finally:
        os.killpg(gate.pid, signal.SIGKILL)
        gate.wait(timeout=30)
    assert _serving(w)["candidate_version"] == w["v"]["good2"]  # orphaned: live until somebody reconciles

    def reconciled() -> str | None:
        st = _terminal(w["home"], "serve", "status", "--app", w["app"], "--address", w["dash"])
        return st.stdout if "reconciled" in st.stdout else None

    text = poll(reconciled, timeout_s=90, interval_s=3, what="status to stop the orphaned canary")
    assert "stopped renewing the rollout lease" in text, text
    health = _serving(w)
    assert health["candidate_version"] is None and health["model_version"] == 1
    assert w["reg"].get_alias(MODEL, "production") == 1


def test_a_promotion_killed_between_serve_and_the_alias_is_finished_by_the_next_command(world):
    w = world
    started = _terminal(w["home"], "serve", "canary", "--version", str(w["v"]["good"]), "--percent", "20",
                        "--no-gate", "--app", w["app"], "--address", w["dash"])
    assert started.returncode == 0, started.stdout + started.stderr
    # the promote command, SIGKILLed by itself the moment it would move the registry alias
    code = ("import os, signal, sys\n"
            "from raysys.registry import Registry\n"
            "Registry.set_alias = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "from raysys.cli import app\n"
            "sys.argv = ['raysys'] + sys.argv[1:]\n"
            "app()\n")
    killed = subprocess.run([sys.executable, "-c", code, "serve", "promote", "--app", w["app"], "--address",
                             w["dash"]], env=_env(w["home"]), cwd=str(w["home"]), capture_output=True, text=True,
                            timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert _serving(w)["model_version"] == w["v"]["good"] and w["reg"].get_alias(MODEL, "production") == 1
    st = _terminal(w["home"], "serve", "status", "--app", w["app"], "--address", w["dash"])
    assert st.returncode == 0 and "moved the registry alias 'production'" in st.stdout, st.stdout + st.stderr
    assert w["reg"].get_alias(MODEL, "production") == w["v"]["good"] == _serving(w)["model_version"]
    assert _serving(w)["candidate_version"] is None
    back = _terminal(w["home"], "serve", "rollback", "--app", w["app"], "--address", w["dash"])
    assert back.returncode == 0 and w["reg"].get_alias(MODEL, "production") == 1, back.stdout + back.stderr
    deadline = time.monotonic() + 60
    while _serving(w)["model_version"] != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _serving(w)["model_version"] == 1
