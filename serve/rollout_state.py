"""What a rollout leaves in the registry so that it can be finished or undone by whoever comes next:

- `RolloutLease`: an exclusive, expiring lease on the rollouts of one application (numbered files, each
  created exclusively). A gated canary holds it for its whole run and renews it every check (a heartbeat):
  when its owner dies, the lease ends within `lease_s`, and the next rollout command finds the canary
  ownerless and ends it.
- `RolloutJournal`: the rollout's phase (`canary`, `promoting`, `rolling_back`, `idle`), its target version,
  alias and deadline, written BEFORE each step that changes what is served, plus the last events (canary
  started, promoted, rolled back, reconciled). A crash between the Serve update and the alias move leaves
  phase `promoting`, which the next command finishes (`serve.rollout.reconcile`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from typing import Any

from raysys.registry import Registry

LEASE_MARGIN_S = 60  # a lease outlives the rollout's own timeout by this much
KEEP_LEASE_FILES = 20
KEEP_EVENTS = 50


class RolloutError(ValueError):
    """A rollout that cannot be applied (no such app, no canary to promote, another rollout in progress...):
    the CLI exits 2 with it."""


def _app_dir(app_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", app_name) or "_"


class RolloutLease:
    """An exclusive, expiring lease on the rollouts of one application, kept as numbered files in the
    registry (`<root>/<model>/rollout-leases/<app>/<n>.json`, each created exclusively, the highest
    current): taking it creates n+1 while n is released or expired, so two takers cannot both win."""

    def __init__(self, reg: Registry, model_name: str, app_name: str, *, lease_s: float):
        self.files = reg.files
        self.dir = reg.files.path(model_name, "rollout-leases", _app_dir(app_name))
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

    def renew(self, lease_s: float | None = None) -> None:
        """Extend the lease to `lease_s` (default: the lease's own) from now, a heartbeat; RolloutError when it
        was lost meanwhile (it expired and somebody else took it over)."""
        if self.number is None:
            raise RolloutError(f"the rollout lease of {self.app_name!r} is not held")
        now = time.time()
        mine = {"owner": self.owner, "acquired_at": now, "expires_at": now + (lease_s or self.lease_s),
                "renewal": True}
        if not self.files.create_exclusive(self._path(self.number + 1), json.dumps(mine).encode()):
            self.number = None
            raise RolloutError(f"lost the rollout lease of {self.app_name!r} (it expired and another rollout took "
                               "it over); this rollout stops here")
        self.number += 1

    def holder(self) -> dict[str, Any] | None:
        """The current owner's lease record while somebody holds it (None: free or expired)."""
        _, state = self._newest()
        if state and not state.get("released") and float(state.get("expires_at", 0)) > time.time():
            return state
        return None

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


class RolloutJournal:
    """The rollout state of one application, `<root>/<model>/rollouts/<app>/state.json`, replaced atomically.
    Written only under the application's `RolloutLease`, so no two writers race."""

    def __init__(self, reg: Registry, model_name: str, app_name: str):
        self.files = reg.files
        self.path = reg.files.path(model_name, "rollouts", _app_dir(app_name), "state.json")

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.files.read(self.path))
        except FileNotFoundError:
            return {"phase": "idle", "events": []}
        except ValueError:  # a torn or foreign file: start over rather than block every rollout
            return {"phase": "idle", "events": [], "note": "unreadable state file replaced"}

    def write(self, phase: str, event: str | None = None, **fields: Any) -> dict[str, Any]:
        """Set the phase (and its fields: version, alias, deadline, gated...), appending `event` to the log."""
        old = self.read()
        events = list(old.get("events") or [])
        if event:
            events.append({"time": time.time(), "phase": phase, "event": event,
                           **{k: v for k, v in fields.items() if k in ("version", "alias")}})
        state = {"phase": phase, **fields, "updated_at": time.time(), "events": events[-KEEP_EVENTS:]}
        self.files.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        self.files.replace(self.path, json.dumps(state, default=str).encode())
        return state
