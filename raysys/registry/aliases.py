"""Aliases (`production`, `candidate`, ...): named pointers at versions of a model, with their history.

    <root>/<name>/aliases/<alias>/<generation>.json   {"version": N, "previous": M, "history": [..., M, N],
                                                       "generation": G, "updated_at": ...}

Every move writes a NEW immutable file, one generation above the one it read, created exclusively
(`RegistryFiles.create_exclusive`): the highest generation is the alias's state. Two processes moving the
same alias at once both read generation G, exactly one creates G+1; the other sees G+1 taken, reads it and
retries on top of it, so no history entry is lost (a compare-and-swap on the generation number). Readers see
the old or the new state, never a half-written file. Each state carries the alias's history (oldest first),
so `roll_back` moves the alias to the version it pointed at before the current one.

On object stores pyarrow.fs offers no conditional put, so the exclusive create there is check-then-write
with a read-back (see `create_exclusive`): two movers racing inside that window can still lose one entry.
A registry written before generations existed keeps `<alias>.json`; it is read as generation 0.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from raysys.registry.files import RegistryFiles, as_version, check_name, is_name, json_bytes, utc_now

MAX_ALIAS_HISTORY = 100
KEEP_GENERATIONS = 200  # older state files are pruned; a mover would have to stall for this many moves to notice
MAX_MOVE_TRIES = 200  # a mover that loses this many races in a row gives up with an error, never silently
_GENERATION_RE = re.compile(r"([0-9]+)\.json", re.ASCII)


class AliasStore:
    """The aliases of every model under one registry root."""

    def __init__(self, files: RegistryFiles):
        self.files = files

    def _dir(self, name: str, alias: str | None = None) -> str:
        # every method passes through here (or `_legacy_path`): names are checked before any path is built
        check_name("model name", name)
        return self.files.path(name, "aliases", *([check_name("alias", alias)] if alias is not None else []))

    def _legacy_path(self, name: str, alias: str) -> str:
        return self.files.path(check_name("model name", name), "aliases", f"{check_name('alias', alias)}.json")

    def _generations(self, name: str, alias: str) -> list[int]:
        found = (_GENERATION_RE.fullmatch(fn) for fn in self.files.files(self._dir(name, alias)))
        return sorted(int(m.group(1)) for m in found if m)

    def _current(self, name: str, alias: str) -> tuple[int, dict[str, Any]]:
        """(generation, state) of the alias; (0, {}) when it was never set."""
        for gen in reversed(self._generations(name, alias)):
            try:  # pruned by a concurrent mover between the listing and the read: take the next one down
                return gen, json.loads(self.files.read(self.files.path(name, "aliases", alias, f"{gen:012d}.json")))
            except FileNotFoundError:
                continue
        try:
            return 0, json.loads(self.files.read(self._legacy_path(name, alias)))
        except FileNotFoundError:
            return 0, {}

    def _state(self, name: str, alias: str) -> dict[str, Any]:
        return self._current(name, alias)[1]

    def _update(self, name: str, alias: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict:
        """Compare-and-swap: `change(current state)` -> the new state (None: nothing to write), written as the
        next generation; a lost race re-reads and re-applies `change`. Returns the state that stands."""
        self.files.fs.create_dir(self._dir(name, alias), recursive=True)
        for attempt in range(MAX_MOVE_TRIES):
            gen, state = self._current(name, alias)
            new = change(state)
            if new is None:
                return state
            new = {**new, "generation": gen + 1, "write_id": uuid.uuid4().hex, "updated_at": utc_now()}
            path = self.files.path(name, "aliases", alias, f"{gen + 1:012d}.json")
            if self.files.create_exclusive(path, json_bytes(new)):
                self._prune(name, alias, gen + 1)
                return new
            time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))  # spread the losers of a race
        raise RuntimeError(f"registry: alias {alias!r} of {name!r} lost {MAX_MOVE_TRIES} concurrent moves in a row; "
                           "try again")

    def _prune(self, name: str, alias: str, newest: int) -> None:
        for gen in self._generations(name, alias):
            if gen <= newest - KEEP_GENERATIONS:
                try:
                    self.files.delete_file(self.files.path(name, "aliases", alias, f"{gen:012d}.json"))
                except (FileNotFoundError, OSError):  # another mover pruned it first
                    pass

    def get(self, name: str, alias: str) -> int | None:
        version = self._state(name, alias).get("version")
        return None if version is None else int(version)

    def all(self, name: str) -> dict[str, int]:
        root = self._dir(name)
        names = set(self.files.subdirs(root)) | {fn[: -len(".json")] for fn in self.files.files(root)
                                                 if fn.endswith(".json")}
        names = {a for a in names if is_name(a)}  # a stray file or directory is not an alias
        out = {}
        for alias in names:
            version = self.get(name, alias)
            if version is not None:
                out[alias] = version
        return dict(sorted(out.items()))

    def history(self, name: str, alias: str) -> list[int]:
        return [int(v) for v in self._state(name, alias).get("history", [])]

    def move(self, name: str, alias: str, version: int | str, versions: list[int]) -> None:
        """Point `alias` at `version`, one of the model's complete `versions`."""
        check_name("alias", alias)
        if alias == "latest" or re.fullmatch(r"[vV]?\d+", alias):
            raise ValueError(f"registry: alias {alias!r} is reserved; pick a name such as 'production'")
        version = as_version(version)
        if version not in versions:
            raise ValueError(f"registry: cannot set alias {alias!r}: {name!r} has no version {version}; "
                             f"versions are {versions}")

        def change(state: dict[str, Any]) -> dict[str, Any] | None:
            history = [int(v) for v in state.get("history", [])]
            if state.get("version") == version and history and history[-1] == version:
                return None  # already there: no duplicate history entry
            history.append(version)
            return {"version": version, "previous": state.get("version"), "history": history[-MAX_ALIAS_HISTORY:]}

        self._update(name, alias, change)

    def roll_back(self, name: str, alias: str, versions: list[int]) -> int:
        """Move `alias` to the version before its current one that is still among `versions`; returns it."""
        check_name("alias", alias)

        def change(state: dict[str, Any]) -> dict[str, Any]:
            history = [int(v) for v in state.get("history", [])]
            if not history:
                raise ValueError(f"registry: {name!r} has no alias {alias!r} to roll back")
            if len(history) < 2:
                raise ValueError(f"registry: {name!r} alias {alias!r} has no earlier version to roll back to "
                                 f"(history {history})")
            current = history.pop()
            while history and history[-1] not in versions:  # a version deleted by hand is skipped
                history.pop()
            if not history:
                raise ValueError(f"registry: {name!r} alias {alias!r}: no earlier version still exists")
            return {"version": history[-1], "previous": current, "history": history, "rolled_back_from": current}

        return int(self._update(name, alias, change)["version"])

    def delete(self, name: str, alias: str) -> None:
        self.files.delete_file(self._legacy_path(name, alias))
        if self.files.is_dir(self._dir(name, alias)):
            self.files.fs.delete_dir(self._dir(name, alias))
