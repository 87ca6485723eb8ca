"""Rollout through Serve's REST API on the Ray dashboard (what `serve deploy` uses): deploy an application
declaratively, then canary, promote and roll back by editing the endpoint's `user_config` in the deployed
config and PUTting it back. Serve hands a changed `user_config` to the running replicas (`reconfigure()`),
in place; promote and rollback also move the registry alias.

One winner among concurrent rollouts of one application (Serve's PUT is last-writer-wins):
- a short lease per application (`RolloutLease`, an exclusively created file in the registry) is held from
  the read of the config to the alias move; a second rollout meanwhile gets a RolloutError at once. A lease
  whose owner died ends at its expiry (the rollout's timeout plus a margin), never blocks forever;
- right before its PUT a rollout re-reads the deployed config and refuses when it differs from what it read
  (a compare-and-swap on the whole config, so `serve deploy` or another app's rollout is not overwritten);
- every change bumps `rollout_generation` in the user_config, so a multi-step caller (the retrain job's
  canary, then promote) passes `expect_generation` and finds out that somebody else changed the rollout.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from raysys.registry import Registry
from serve.contract import DEFAULT_MODEL_NAME, DEPLOYMENT_NAME, parse_user_config

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
LEASE_MARGIN_S = 60  # a lease outlives the rollout's own timeout by this much
KEEP_LEASE_FILES = 20


class RolloutError(ValueError):
    """A rollout that cannot be applied (no such app, no canary to promote, another rollout in progress...):
    the CLI exits 2 with it."""


class RolloutLease:
    """An exclusive, expiring lease on the rollouts of one application, kept as numbered files in the
    registry (`<root>/<model>/rollout-leases/<app>/<n>.json`, each created exclusively, the highest
    current): taking it creates n+1 while n is released or expired, so two takers cannot both win."""

    def __init__(self, reg: Registry, model_name: str, app_name: str, *, lease_s: float):
        self.files = reg.files
        self.dir = reg.files.path(model_name, "rollout-leases", re.sub(r"[^A-Za-z0-9._-]", "_", app_name) or "_")
        self.app_name, self.lease_s = app_name, lease_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.number: int | None = None

    def _path(self, n: int) -> str:
        return f"{self.dir}/{n:012d}.json"

    def _newest(self) -> tuple[int, dict]:
        numbers = sorted(int(f[:-5]) for f in self.files.files(self.dir) if re.fullmatch(r"\d+\.json", f))
        for n in reversed(numbers):
            try:
                return n, json.loads(self.files.read(self._path(n)))
            except (FileNotFoundError, ValueError):
                continue
        return 0, {}

    def _busy(self, state: dict) -> RolloutError:
        left = max(0.0, float(state.get("expires_at", 0)) - time.time())
        return RolloutError(f"another rollout of {self.app_name!r} is in progress (owner {state.get('owner')}, "
                            f"lease ends in {left:.0f}s unless it finishes first); try again when it is done "
                            "(`raysys serve status` shows what is served)")

    def acquire(self) -> RolloutLease:
        self.files.fs.create_dir(self.dir, recursive=True)
        n, state = self._newest()
        if state and not state.get("released") and float(state.get("expires_at", 0)) > time.time():
            raise self._busy(state)
        now = time.time()
        mine = {"owner": self.owner, "acquired_at": now, "expires_at": now + self.lease_s}
        if not self.files.create_exclusive(self._path(n + 1), json.dumps(mine).encode()):
            raise self._busy(self._newest()[1])  # another taker created n+1 first
        self.number = n + 1
        for f in self.files.files(self.dir):  # old leases are history only: keep the last few for debugging
            if re.fullmatch(r"\d+\.json", f) and int(f[:-5]) <= self.number - KEEP_LEASE_FILES:
                self.files.delete_file(self._path(int(f[:-5])))
        return self

    def release(self) -> None:
        if self.number is None:
            return
        done = {"owner": self.owner, "released": True, "released_at": time.time()}
        # False: the lease had expired and somebody took it over; theirs stands
        self.files.create_exclusive(self._path(self.number + 1), json.dumps(done).encode())
        self.number = None

    def __enter__(self) -> RolloutLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def cluster_dashboard_url() -> str | None:
    """The dashboard URL of the Ray cluster this process is connected to (None when it runs none)."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


class ServeAdmin:
    """Serve's REST API on the Ray dashboard (`ServeSubmissionClient`, the client of `serve deploy`; it adds
    the cluster's auth token). Every change is a PUT of the whole declarative config with one application
    changed; a change of `user_config` alone reaches running replicas through `reconfigure()`, in place."""

    def __init__(self, address: str | None = None, *, connect_timeout_s: float = 30):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        self.address = (address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD).rstrip("/")
        if "://" not in self.address:
            self.address = f"http://{self.address}"
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                self.client = ServeSubmissionClient(self.address)
                return
            except Exception as e:  # a dashboard that just started answers after a few seconds
                if type(e).__name__ == "AuthenticationError":  # waiting does not bring a token: say so at once
                    raise RolloutError(f"--address: the Ray dashboard at {self.address} refused this client: "
                                       f"{str(e)[:600]}") from None
                if time.monotonic() >= deadline:
                    raise RolloutError(
                        f"--address: cannot reach the Ray dashboard at {self.address} ({type(e).__name__}: "
                        f"{str(e)[:300]}); pass the dashboard URL of a running cluster (RAY_DASHBOARD_ADDRESS)"
                    ) from None
                time.sleep(1)

    def details(self) -> dict[str, Any]:
        return self.client.get_serve_details()

    def config(self) -> dict[str, Any]:
        """The deployed declarative config of every application (to PUT back with one change)."""
        details = self.details()
        apps, imperative = [], []
        for name, app in (details.get("applications") or {}).items():
            conf = app.get("deployed_app_config")
            # an app deployed from Python (serve.run) has no config; Serve leaves it alone when a config is
            # applied, so it is left out here (and cannot be rolled out through a config)
            if conf is not None:
                apps.append(conf)
            else:
                imperative.append(name)
        out: dict[str, Any] = {"applications": apps, "_imperative": imperative}
        http = details.get("http_options") or {}
        if http.get("port"):
            out["http_options"] = {"host": http.get("host"), "port": http.get("port")}
        if details.get("proxy_location"):
            out["proxy_location"] = details["proxy_location"]
        return out

    def apply(self, config: dict[str, Any]) -> None:
        self.client.deploy_applications({k: v for k, v in config.items() if not k.startswith("_")})

    def wait_running(self, app_name: str, user_config: dict | None = None, timeout_s: float = 300) -> dict:
        """Until `app_name` is RUNNING (and, given `user_config`, deployed with it); raises on DEPLOY_FAILED."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            app = (self.details().get("applications") or {}).get(app_name)
            if app is not None:
                last = app.get("status")
                if last == "DEPLOY_FAILED":
                    raise RolloutError(f"application {app_name!r} failed to deploy: {app.get('message', '')[:2000]}")
                deployed = _deployment(app.get("deployed_app_config") or {}, DEPLOYMENT_NAME)
                same = user_config is None or (deployed or {}).get("user_config") == user_config
                if last == "RUNNING" and same:
                    return app
            time.sleep(0.5)
        raise RolloutError(f"application {app_name!r} not RUNNING after {timeout_s:.0f}s (status {last})")


def _deployment(app_conf: dict, name: str) -> dict | None:
    for d in app_conf.get("deployments") or []:
        if d.get("name") == name:
            return d
    return None


def _find_app(config: dict, app_name: str) -> dict:
    for app in config["applications"]:
        if app.get("name") == app_name:
            return app
    if app_name in config.get("_imperative", []):
        raise RolloutError(f"application {app_name!r} was deployed from Python (serve.run), so Serve cannot update it "
                           "in place through a config; redeploy it with `raysys serve deploy` or `serve deploy`")
    names = [a.get("name") for a in config["applications"]]
    raise RolloutError(f"--app: no application {app_name!r} on this cluster (applications: {names}); deploy it "
                       "with `raysys serve deploy`")


def deploy_app(admin: ServeAdmin, app: dict[str, Any], *, timeout_s: float = 300) -> dict:
    """Add or replace one application (the others are PUT back unchanged); wait until it runs."""
    config = admin.config()
    config["applications"] = [a for a in config["applications"] if a.get("name") != app["name"]] + [app]
    admin.apply(config)
    return admin.wait_running(app["name"], _deployment(app, DEPLOYMENT_NAME).get("user_config"), timeout_s)


def current_rollout(admin: ServeAdmin, app_name: str) -> tuple[dict, dict, dict]:
    """(whole config, the app's config, the endpoint deployment's user_config as deployed). The config keeps
    a copy of the applications as read (`_read`), which `set_user_config` compares before its PUT."""
    config = admin.config()
    config["_read"] = copy.deepcopy(config["applications"])
    app = _find_app(config, app_name)
    dep = _deployment(app, DEPLOYMENT_NAME)
    if dep is None:
        dep = {"name": DEPLOYMENT_NAME}
        app.setdefault("deployments", []).append(dep)
    user = dict(dep.get("user_config") or {})
    if "model_version" in user:  # the other spelling of the stable version
        user["model_ref"] = user.pop("model_version")
    user.setdefault("model_ref", (app.get("args") or {}).get("model_ref", "production"))
    user.setdefault("rollout_generation", 0)
    dep["user_config"] = user
    return config, app, user


def _registry(app: dict) -> tuple[Registry, str]:
    args = app.get("args") or {}
    if not args.get("registry_uri"):
        raise RolloutError(f"application {app.get('name')!r} has no args.registry_uri")
    return Registry(args["registry_uri"]), args.get("model_name") or DEFAULT_MODEL_NAME


def _changed(app_name: str, what: str) -> RolloutError:
    return RolloutError(f"the Serve config of {app_name!r} changed since it was read ({what}): another rollout "
                        "or deploy got there first; check `raysys serve status` and run the step again")


def set_user_config(admin: ServeAdmin, app_name: str, changes: dict[str, Any], *, state: tuple | None = None,
                    timeout_s: float = 300) -> dict:
    """Apply `changes` to the endpoint's user_config (validated as the replicas will) and wait until the
    application runs with it. `state`: what `current_rollout` returned, when the caller already read it.
    The PUT happens only when the deployed config is still the one read (else RolloutError), and bumps
    `rollout_generation`. Returns the new user_config."""
    config, app, user = state or current_rollout(admin, app_name)
    user.update(changes)
    user["rollout_generation"] = int(user.get("rollout_generation") or 0) + 1
    if not user.get("candidate_ref"):
        user["candidate_ref"], user["canary_percent"] = None, 0
    try:
        parse_user_config(user)
    except ValueError as e:
        raise RolloutError(str(e)) from None
    _deployment(app, DEPLOYMENT_NAME)["user_config"] = user
    if admin.config()["applications"] != config["_read"]:  # the compare of the compare-and-swap
        raise _changed(app_name, "between this rollout's read and its update")
    admin.apply(config)
    admin.wait_running(app_name, user, timeout_s)
    return user


def _step(admin: ServeAdmin, app_name: str, expect_generation: int | None, timeout_s: float,
          body: Callable[[tuple, Registry, str], dict]) -> dict:
    """Run one rollout step under the application's lease, on the config read after taking it."""
    reg, name = _registry(_find_app(admin.config(), app_name))
    with RolloutLease(reg, name, app_name, lease_s=timeout_s + LEASE_MARGIN_S):
        state = current_rollout(admin, app_name)
        gen = state[2]["rollout_generation"]
        if expect_generation is not None and gen != expect_generation:
            raise _changed(app_name, f"rollout generation {gen}, expected {expect_generation}")
        return body(state, reg, name)


def canary(admin: ServeAdmin, app_name: str, ref: str | int, percent: float, *, timeout_s: float = 300,
           expect_generation: int | None = None) -> dict:
    """Send `percent`% of requests to version/alias `ref` (resolved to a version number now, so a later alias
    move does not change what runs), the rest to the stable version."""
    if not 0 < percent <= 100:
        raise RolloutError(f"--percent: must be in (0, 100], got {percent}")

    def body(state: tuple, reg: Registry, name: str) -> dict:
        version = reg.resolve(name, ref)
        if str(reg.resolve(name, state[2]["model_ref"])) == str(version):
            raise RolloutError(f"--version: v{version} is already the stable version of {app_name!r}")
        return set_user_config(admin, app_name, {"candidate_ref": version, "canary_percent": percent}, state=state,
                               timeout_s=timeout_s)

    return _step(admin, app_name, expect_generation, timeout_s, body)


def promote(admin: ServeAdmin, app_name: str, *, alias: str = "production", timeout_s: float = 300,
            expect_generation: int | None = None) -> dict:
    """The canary's version becomes the stable one for all traffic, and the registry alias moves to it."""

    def body(state: tuple, reg: Registry, name: str) -> dict:
        user = state[2]
        if not user.get("candidate_ref"):
            raise RolloutError(f"application {app_name!r} has no canary to promote; start one with "
                               "`raysys serve canary --version N --percent P`")
        version = reg.resolve(name, user["candidate_ref"])
        out = set_user_config(admin, app_name, {"model_ref": version, "candidate_ref": None, "canary_percent": 0},
                              state=state, timeout_s=timeout_s)
        reg.set_alias(name, alias, version)
        return out

    return _step(admin, app_name, expect_generation, timeout_s, body)


def rollback(admin: ServeAdmin, app_name: str, *, alias: str = "production", timeout_s: float = 300,
             expect_generation: int | None = None) -> dict:
    """With a canary running: stop it (all traffic back to the stable version). Without one: go back to the
    version the registry alias pointed at before the current one, and move the alias back."""

    def body(state: tuple, reg: Registry, name: str) -> dict:
        user = state[2]
        if user.get("candidate_ref"):
            return set_user_config(admin, app_name, {"candidate_ref": None, "canary_percent": 0}, state=state,
                                   timeout_s=timeout_s)
        current = reg.resolve(name, user["model_ref"])
        history = reg.alias_history(name, alias)
        earlier = [v for v in history if v != current]
        if not earlier:
            raise RolloutError(f"nothing to roll back to: {app_name!r} serves v{current} and the registry alias "
                               f"{alias!r} has no earlier version (history {history})")
        target = earlier[-1]
        out = set_user_config(admin, app_name, {"model_ref": target}, state=state, timeout_s=timeout_s)
        if reg.get_alias(name, alias) == current:
            reg.rollback(name, alias)
        else:
            reg.set_alias(name, alias, target)
        return out

    return _step(admin, app_name, expect_generation, timeout_s, body)
