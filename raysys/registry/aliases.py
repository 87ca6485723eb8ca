"""Aliases (`production`, `candidate`, ...): named pointers at versions of a model, with their history.

    <root>/<name>/aliases/<alias>.json    {"version": N, "previous": M, "history": [..., M, N], "updated_at": ...}

An alias moves atomically: its file is written under a temporary name and renamed over the old one, so a
reader sees the old or the new version, never a half-written file. Each alias file carries its own history
(the versions it pointed at, oldest first), so `roll_back` moves the alias to the version it pointed at
before the current one. Two writers moving the same alias at once can lose one history entry
(read-modify-write); the alias itself always names a complete version.
"""

from __future__ import annotations

import json
import re
from typing import Any

from raysys.registry.files import RegistryFiles, as_version, check_name, json_bytes, utc_now

MAX_ALIAS_HISTORY = 100


class AliasStore:
    """The aliases of every model under one registry root."""

    def __init__(self, files: RegistryFiles):
        self.files = files

    def _path(self, name: str, alias: str) -> str:
        return self.files.path(name, "aliases", f"{alias}.json")

    def _state(self, name: str, alias: str) -> dict[str, Any]:
        try:
            return json.loads(self.files.read(self._path(name, alias)))
        except FileNotFoundError:
            return {}

    def _write(self, name: str, alias: str, state: dict[str, Any]) -> None:
        self.files.fs.create_dir(self.files.path(name, "aliases"), recursive=True)
        self.files.replace(self._path(name, alias), json_bytes(state))

    def get(self, name: str, alias: str) -> int | None:
        version = self._state(name, alias).get("version")
        return None if version is None else int(version)

    def all(self, name: str) -> dict[str, int]:
        out = {}
        for fn in self.files.files(self.files.path(name, "aliases")):
            if fn.endswith(".json"):
                alias = fn[: -len(".json")]
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
        state = self._state(name, alias)
        history = list(state.get("history", []))
        if not history or history[-1] != version:
            history.append(version)
        self._write(name, alias, {"version": version, "previous": state.get("version"),
                                  "history": history[-MAX_ALIAS_HISTORY:], "updated_at": utc_now()})

    def roll_back(self, name: str, alias: str, versions: list[int]) -> int:
        """Move `alias` to the version before its current one that is still among `versions`; returns it."""
        check_name("alias", alias)
        history = self.history(name, alias)
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
        target = history[-1]
        self._write(name, alias, {"version": target, "previous": current, "history": history,
                                  "rolled_back_from": current, "updated_at": utc_now()})
        return target

    def delete(self, name: str, alias: str) -> None:
        self.files.delete_file(self._path(name, alias))
