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
- every change bumps `rollout_generation` in the user_config, so a multi-step caller passes
  `expect_generation` and finds out that somebody else changed the rollout.

Rollouts that heal: every step writes the application's `RolloutJournal` (phase, target, alias) before it
changes what is served, and every command first runs `reconcile` under the lease: a promotion or rollback
whose owner died half-way is finished, a canary past its deadline or whose gated owner died is stopped. The
gated canary itself (metrics decide promote or rollback) is `serve.canary.run_canary`.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager
from typing import Any

from raysys.registry import Registry
from serve.contract import DEFAULT_MODEL_NAME, DEPLOYMENT_NAME, parse_user_config
from serve.rollout_state import LEASE_MARGIN_S, RolloutError, RolloutJournal, RolloutLease  # noqa: F401 (re-exported)

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
# what stops a canary: no candidate, no share, no shadow, no deadline
NO_CANARY = {"candidate_ref": None, "canary_percent": 0, "shadow": False, "canary_deadline": None}


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
    """Add or replace one application (the others are PUT back unchanged) under its rollout lease, so that
    it never lands in the middle of a canary; its rollout generation continues from the deployed one's.
    Waits until it runs."""
    reg, name = _registry(app)
    app = copy.deepcopy(app)
    with RolloutLease(reg, name, app["name"], lease_s=timeout_s + LEASE_MARGIN_S):
        config = admin.config()
        old = next((a for a in config["applications"] if a.get("name") == app["name"]), None)
        gen = ((_deployment(old, DEPLOYMENT_NAME) or {}).get("user_config") or {}).get("rollout_generation", 0) \
            if old else 0
        user = _deployment(app, DEPLOYMENT_NAME).setdefault("user_config", {})
        user["rollout_generation"] = int(gen or 0) + 1
        config["applications"] = [a for a in config["applications"] if a.get("name") != app["name"]] + [app]
        admin.apply(config)
        out = admin.wait_running(app["name"], user, timeout_s)
        RolloutJournal(reg, name, app["name"]).write("idle", event=f"deployed, stable {user.get('model_ref')}")
        return out


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
        user.update(NO_CANARY)
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


def _resolve(reg: Registry, name: str, ref: Any) -> int:
    return int(reg.resolve(name, ref))


class Rollout:
    """One application's rollout while its lease is held: the admin, the registry and the journal, and
    what `reconcile` found and did on taking it."""

    def __init__(self, admin: ServeAdmin, app_name: str, reg: Registry, name: str, lease: RolloutLease,
                 timeout_s: float):
        self.admin, self.app_name, self.reg, self.name, self.lease = admin, app_name, reg, name, lease
        self.journal = RolloutJournal(reg, name, app_name)
        self.timeout_s = timeout_s
        self.reconciled: list[str] = []

    def state(self, expect_generation: int | None = None) -> tuple:
        state = current_rollout(self.admin, self.app_name)
        gen = state[2]["rollout_generation"]
        if expect_generation is not None and gen != expect_generation:
            raise _changed(self.app_name, f"rollout generation {gen}, expected {expect_generation}")
        return state

    def update(self, changes: dict[str, Any], state: tuple | None = None) -> dict:
        return set_user_config(self.admin, self.app_name, changes, state=state, timeout_s=self.timeout_s)

    # ----- the steps (each writes the journal BEFORE it changes what is served) -----
    def start_canary(self, version: int, percent: float, *, shadow: bool = False, deadline: float | None = None,
                     gated: bool = False, state: tuple | None = None) -> dict:
        state = state or self.state()
        if _resolve(self.reg, self.name, state[2]["model_ref"]) == version:
            raise RolloutError(f"--version: v{version} is already the stable version of {self.app_name!r}")
        self.journal.write("canary", f"{'shadow' if shadow else 'canary'} of v{version} at {percent:g}%",
                           version=version, percent=percent, shadow=shadow, deadline=deadline, gated=gated,
                           owner=self.lease.owner)
        return self.update({"candidate_ref": version, "canary_percent": percent, "shadow": shadow,
                            "canary_deadline": deadline}, state)

    def promote(self, alias: str, state: tuple | None = None, why: str = "") -> dict:
        state = state or self.state()
        if not state[2].get("candidate_ref"):
            raise RolloutError(f"application {self.app_name!r} has no canary to promote; start one with "
                               "`raysys serve canary --version N --percent P`")
        version = _resolve(self.reg, self.name, state[2]["candidate_ref"])
        self.journal.write("promoting", f"promoting v{version}", version=version, alias=alias)
        out = self.update({"model_ref": version, **NO_CANARY}, state)
        self.reg.set_alias(self.name, alias, version)
        self.journal.write("idle", f"promoted v{version}{': ' + why if why else ''}", version=version, alias=alias)
        return out

    def stop_canary(self, why: str, state: tuple | None = None) -> dict:
        state = state or self.state()
        version = state[2].get("candidate_ref")
        out = self.update(dict(NO_CANARY), state)
        self.journal.write("idle", f"canary of v{version} stopped: {why}", version=version)
        return out

    def roll_back_stable(self, alias: str, state: tuple | None = None) -> dict:
        state = state or self.state()
        current = _resolve(self.reg, self.name, state[2]["model_ref"])
        history = self.reg.alias_history(self.name, alias)
        earlier = [v for v in history if v != current]
        if not earlier:
            raise RolloutError(f"nothing to roll back to: {self.app_name!r} serves v{current} and the registry alias "
                               f"{alias!r} has no earlier version (history {history})")
        target = earlier[-1]
        self.journal.write("rolling_back", f"rolling back v{current} -> v{target}", version=target, alias=alias)
        out = self.update({"model_ref": target}, state)
        if self.reg.get_alias(self.name, alias) == current:
            self.reg.rollback(self.name, alias)
        else:
            self.reg.set_alias(self.name, alias, target)
        self.journal.write("idle", f"rolled back v{current} -> v{target}", version=target, alias=alias)
        return out


@contextmanager
def holding(admin: ServeAdmin, app_name: str, *, timeout_s: float = 300, lease_s: float | None = None):
    """The application's rollout lease, held for the `with` block, after `reconcile` has finished or undone
    whatever an earlier rollout left half-done (the result is in `Rollout.reconciled`)."""
    reg, name = _registry(_find_app(admin.config(), app_name))
    lease = RolloutLease(reg, name, app_name, lease_s=lease_s or timeout_s + LEASE_MARGIN_S).acquire()
    try:
        ro = Rollout(admin, app_name, reg, name, lease, timeout_s)
        ro.reconciled = reconcile(ro)
        yield ro
    finally:
        lease.release()


def reconcile(ro: Rollout) -> list[str]:
    """Finish or undo what an earlier rollout left half-done, as a controller would; returns what it did.

    - phase `promoting`/`rolling_back` (its owner died between the journal and the alias move): Serve is
      brought to the target version and the alias moved to it;
    - a canary still live whose deadline passed, or a gated canary whose owner no longer holds the lease
      (we hold it now, so it stopped renewing: it died): the canary is stopped.
    """
    state = ro.state()
    user, j = state[2], ro.journal.read()
    phase = j.get("phase", "idle")
    if phase in ("promoting", "rolling_back"):
        return _finish(ro, state, phase, int(j["version"]), j.get("alias") or "production")
    if user.get("candidate_ref"):
        deadline = user.get("canary_deadline")
        if deadline is not None and time.time() > float(deadline):
            why = f"its deadline ({time.ctime(float(deadline))}) passed"
        elif phase == "canary" and j.get("gated"):
            why = f"its owner ({j.get('owner')}) stopped renewing the rollout lease (it died or was killed)"
        else:
            return []  # a canary started by hand lives until promote or rollback
        candidate = user["candidate_ref"]
        ro.stop_canary(f"ended by reconcile: {why}", state)
        return [f"stopped the canary of v{candidate}: {why}"]
    if phase == "canary":  # the journal was written but the canary never reached Serve
        ro.journal.write("idle", "canary never reached Serve (its owner stopped first); nothing to undo")
    return []


def _finish(ro: Rollout, state: tuple, phase: str, target: int, alias: str) -> list[str]:
    what = "promotion" if phase == "promoting" else "rollback"
    done = []
    user = state[2]
    if _resolve(ro.reg, ro.name, user["model_ref"]) != target or user.get("candidate_ref"):
        ro.update({"model_ref": target, **NO_CANARY}, state)
        done.append(f"finished the {what} of v{target} in Serve")
    if ro.reg.get_alias(ro.name, alias) != target:
        ro.reg.set_alias(ro.name, alias, target)
        done.append(f"moved the registry alias {alias!r} to v{target}")
    ro.journal.write("idle", f"{what} of v{target} finished by reconcile", version=target, alias=alias)
    return done or [f"the {what} of v{target} had finished; journal closed"]


def canary(admin: ServeAdmin, app_name: str, ref: str | int, percent: float, *, timeout_s: float = 300,
           expect_generation: int | None = None, shadow: bool = False, deadline_s: float | None = None) -> dict:
    """Send `percent`% of requests to version/alias `ref` (resolved to a version number now, so a later alias
    move does not change what runs), the rest to the stable version; `shadow`: the candidate scores a copy
    and stable answers. `deadline_s`: the replicas stop routing to it after this many seconds. Not gated:
    it lives until `promote`/`rollback` (see `serve.canary.run_canary` for the gated one)."""
    if not 0 < percent <= 100:
        raise RolloutError(f"--percent: must be in (0, 100], got {percent}")
    with holding(admin, app_name, timeout_s=timeout_s) as ro:
        state = ro.state(expect_generation)
        deadline = time.time() + deadline_s if deadline_s else None
        return ro.start_canary(_resolve(ro.reg, ro.name, ref), percent, shadow=shadow, deadline=deadline, state=state)


def promote(admin: ServeAdmin, app_name: str, *, alias: str = "production", timeout_s: float = 300,
            expect_generation: int | None = None) -> dict:
    """The canary's version becomes the stable one for all traffic, and the registry alias moves to it."""
    with holding(admin, app_name, timeout_s=timeout_s) as ro:
        return ro.promote(alias, ro.state(expect_generation))


def rollback(admin: ServeAdmin, app_name: str, *, alias: str = "production", timeout_s: float = 300,
             expect_generation: int | None = None) -> dict:
    """With a canary running: stop it (all traffic back to the stable version). Without one: go back to the
    version the registry alias pointed at before the current one, and move the alias back."""
    with holding(admin, app_name, timeout_s=timeout_s) as ro:
        state = ro.state(expect_generation)
        if state[2].get("candidate_ref"):
            return ro.stop_canary("rolled back by hand", state)
        return ro.roll_back_stable(alias, state)


def status(admin: ServeAdmin, app_name: str, *, timeout_s: float = 300) -> dict[str, Any]:
    """What the application serves, after reconciling a half-done rollout when no rollout is in progress
    (while one is, its owner's lease is reported and nothing is changed)."""
    reg, name = _registry(_find_app(admin.config(), app_name))
    reconciled, busy = [], None
    try:
        with holding(admin, app_name, timeout_s=timeout_s) as ro:
            reconciled = ro.reconciled
    except RolloutError as e:
        busy = str(e)
    _, _, user = current_rollout(admin, app_name)
    app = (admin.details().get("applications") or {}).get(app_name, {})
    stable = _resolve(reg, name, user["model_ref"])
    production = reg.get_alias(name, "production")
    return {"app": app_name, "status": app.get("status"), "user_config": user, "stable_version": stable,
            "production_alias": production, "reconciled": reconciled, "in_progress": busy,
            "journal": RolloutJournal(reg, name, app_name).read()}
