"""A fake Serve admin for rollout tests without Ray: ServeAdmin's surface over an in-memory config."""

from __future__ import annotations

import copy
import threading

from raysys.registry import Registry
from serve.contract import DEPLOYMENT_NAME

MODEL = "student"
APP = "raysys"


class FakeAdmin:
    """ServeAdmin's surface over an in-memory config; `on_apply(n)` runs before the n-th PUT lands and
    `on_config(n)` before the n-th read is answered (to interleave rollouts deterministically)."""

    def __init__(self, reg: Registry, other_apps: list | None = None):
        self.apps = [{"name": APP, "args": {"registry_uri": reg.uri, "model_name": MODEL},
                      "deployments": [{"name": DEPLOYMENT_NAME, "user_config": {
                          "model_ref": "production", "candidate_ref": None, "canary_percent": 0}}]},
                     *(other_apps or [])]
        self.lock = threading.Lock()
        self.puts: list[dict] = []
        self.reads = 0
        self.on_apply = lambda n: None
        self.on_config = lambda n: None

    def config(self) -> dict:
        self.reads += 1
        self.on_config(self.reads)
        with self.lock:
            return {"applications": copy.deepcopy(self.apps), "_imperative": []}

    def details(self) -> dict:
        return {"applications": {a["name"]: {"status": "RUNNING", "deployed_app_config": a, "route_prefix": "/"}
                                 for a in self.apps}, "http_options": {"host": "127.0.0.1", "port": 8000}}

    def apply(self, config: dict) -> None:
        self.on_apply(len(self.puts) + 1)
        with self.lock:
            self.apps = copy.deepcopy([a for a in config["applications"]])
            self.puts.append(copy.deepcopy(self.deployed()))

    def wait_running(self, app_name, user_config=None, timeout_s=300) -> dict:
        return {}

    def deployed(self) -> dict:
        app = next(a for a in self.apps if a["name"] == APP)
        return next(d for d in app["deployments"] if d["name"] == DEPLOYMENT_NAME)["user_config"]
