"""Tier 1: the rollout's compare-and-swap (serve.rollout) against a fake Serve admin and a real registry on
a temp dir (no Ray): two concurrent rollouts on one app, exactly one wins; a config that changed between
the read and the PUT is refused; a dead owner's lease ends at its expiry."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from raysys.config import DataConfig, ModelConfig
from raysys.data import Preprocessor, SyntheticTask
from raysys.models import build_model, model_spec
from raysys.registry import Registry
from serve import rollout
from serve.contract import DEPLOYMENT_NAME, parse_user_config
from tests.helpers.rollout import APP, MODEL, FakeAdmin


@pytest.fixture()
def reg(tmp_path):
    cfg = DataConfig(num_numeric=3, num_categorical=1, num_categories=3, num_classes=2, seed=3)
    task = SyntheticTask(cfg)
    schema = task.schema()
    table = task.sample(200, [3, 1])
    pre = Preprocessor.fit(schema, table)
    spec = model_spec(schema, ModelConfig(hidden_dims=[8], embed_dim=2))
    r = Registry(tmp_path / "registry")
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        r.register(MODEL, state_dict=build_model(spec).state_dict(), model_spec=spec, schema=schema,
                   preprocessor=pre, metrics={}, config={}, lineage={})
    r.set_alias(MODEL, "production", 1)
    return r


def test_two_concurrent_canaries_exactly_one_wins(reg):
    admin = FakeAdmin(reg)
    second_done = threading.Event()
    # the first PUT waits until the second rollout has run to its end: without a lease and a check, both
    # read the same config and both PUT it (last writer wins, and both report success)
    admin.on_apply = lambda n: second_done.wait(10) if n == 1 else None
    results: dict[int, object] = {}

    def run(i: int, version: int) -> None:
        try:
            results[i] = rollout.canary(admin, APP, version, 10 * version)
        except Exception as e:
            results[i] = e
        finally:
            if i == 2:
                second_done.set()

    first = threading.Thread(target=run, args=(1, 2))
    first.start()
    deadline = time.monotonic() + 10
    while admin.reads < 1 and time.monotonic() < deadline:  # the first has read the config
        time.sleep(0.01)
    time.sleep(0.1)
    run(2, 3)
    first.join(20)
    wins = [r for r in results.values() if isinstance(r, dict)]
    errors = [r for r in results.values() if not isinstance(r, dict)]
    assert len(wins) == 1 and len(errors) == 1, results
    assert isinstance(errors[0], rollout.RolloutError)
    assert "another rollout" in str(errors[0]) and "in progress" in str(errors[0])
    assert len(admin.puts) == 1 and admin.deployed() == wins[0]  # one consistent user_config
    assert wins[0]["rollout_generation"] == 1 and parse_user_config(wins[0])["candidate_ref"] == 2
    # the lease was given back: the next rollout goes through
    assert rollout.rollback(admin, APP)["rollout_generation"] == 2


def test_config_changed_between_read_and_put_is_refused(reg):
    other = {"name": "other", "args": {}, "deployments": [{"name": DEPLOYMENT_NAME, "user_config": {"model_ref": 1}}]}
    admin = FakeAdmin(reg, other_apps=[other])

    def someone_else_puts(n: int) -> None:  # a writer that is not raysys (serve deploy) changes another app
        # reads: finding the app, reconcile's, the canary's own, then the compare right before its PUT
        if n == 4:
            admin.apps[1]["deployments"][0]["user_config"] = {"model_ref": 2}

    admin.on_config = someone_else_puts
    with pytest.raises(rollout.RolloutError, match="changed since it was read"):
        rollout.canary(admin, APP, 2, 10)
    assert admin.puts == [] and admin.apps[1]["deployments"][0]["user_config"] == {"model_ref": 2}


def test_a_multi_step_rollout_checks_the_generation_it_wrote(reg):
    admin = FakeAdmin(reg)
    user = rollout.canary(admin, APP, 2, 20)
    assert user["rollout_generation"] == 1
    rollout.canary(admin, APP, 3, 20)  # someone else's canary replaced it meanwhile
    with pytest.raises(rollout.RolloutError, match="changed since"):
        rollout.promote(admin, APP, expect_generation=user["rollout_generation"])
    assert reg.get_alias(MODEL, "production") == 1  # nothing moved
    out = rollout.promote(admin, APP, expect_generation=2)
    assert out["model_ref"] == 3 and out["rollout_generation"] == 3 and reg.get_alias(MODEL, "production") == 3


def _lease_dir(reg: Registry):
    return reg.files.path(MODEL, "rollout-leases", APP)


def test_a_dead_owners_lease_blocks_until_it_expires(reg):
    admin = FakeAdmin(reg)
    reg.files.fs.create_dir(_lease_dir(reg), recursive=True)
    held = {"owner": "host:123 (dead)", "expires_at": time.time() + 600, "acquired_at": time.time()}
    reg.files.write(f"{_lease_dir(reg)}/000000000001.json", json.dumps(held).encode())
    with pytest.raises(rollout.RolloutError, match=r"another rollout .*in progress.*host:123"):
        rollout.canary(admin, APP, 2, 10)
    expired = {**held, "expires_at": time.time() - 1}
    reg.files.write(f"{_lease_dir(reg)}/000000000002.json", json.dumps(expired).encode())
    assert rollout.canary(admin, APP, 2, 10)["candidate_ref"] == 2


def test_cli_exits_2_when_another_rollout_holds_the_app(reg, monkeypatch):
    from typer.testing import CliRunner

    from raysys.cli import app

    admin = FakeAdmin(reg)
    monkeypatch.setattr(rollout, "ServeAdmin", lambda address=None: admin)
    lease = rollout.RolloutLease(reg, MODEL, APP, lease_s=600)
    lease.acquire()
    res = CliRunner().invoke(app, ["serve", "canary", "--version", "2", "--percent", "10"])
    assert res.exit_code == 2 and "in progress" in res.output, res.output
    lease.release()
    res = CliRunner().invoke(app, ["serve", "canary", "--version", "2", "--percent", "10", "--no-gate"])
    assert res.exit_code == 0, res.output
    assert admin.deployed()["candidate_ref"] == 2


def test_rollout_generation_is_validated():
    assert parse_user_config({"model_ref": 1, "rollout_generation": 4}) == {"model_ref": 1}
    with pytest.raises(ValueError, match="rollout_generation"):
        parse_user_config({"model_ref": 1, "rollout_generation": -1})


def test_rollout_commands_find_the_token_where_ray_stored_it(reg, tmp_path, monkeypatch):
    # a second terminal against `make demo`'s cluster: the token is in ~/.ray/auth_token, no RAY_* variable
    from typer.testing import CliRunner

    from raysys.cli import app
    from raysys.workflow.cluster import use_cluster_token

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert not use_cluster_token() and "RAY_AUTH_MODE" not in os.environ  # no token: left alone
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("t" * 32)
    seen = []

    def admin(address=None):
        seen.append(os.environ.get("RAY_AUTH_MODE"))
        return FakeAdmin(reg)

    monkeypatch.setattr(rollout, "ServeAdmin", admin)
    res = CliRunner().invoke(app, ["serve", "status"])
    assert res.exit_code == 0 and seen == ["token"], res.output
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is respected
    assert not use_cluster_token() and os.environ["RAY_AUTH_MODE"] == "disabled"
