"""A versioned model store on `pyarrow.fs`: a local directory by default, `s3://` or `gs://` on clusters.

Layout under the root::

    <root>/<name>/versions/<N>/model.safetensors    student weights (safetensors: loading runs no code)
                              /model.json           spec for raysys.models.build_model
                              /schema.json          DatasetSchema
                              /preprocessor.json    Preprocessor.to_dict()
                              /metrics.json  /config.json  /lineage.json
                              /reference_profile.json   (optional) monitor reference
                              /model_card.json  /model_card.md   (optional) the model card
                              /manifest.json        every other file with its sha256 and size
    <root>/<name>/aliases/<alias>.json              {"version": N, "history": [..., N], ...}

A version is immutable. `register` writes every file under `versions/.tmp-<uuid>/` and renames that
directory to `versions/<N>` (N = highest existing + 1). POSIX `rename` of a directory onto an existing,
non-empty one fails, so two writers racing for the same N cannot overwrite each other: the loser
retries with N+1. Object stores have no directory rename; there the files are written straight into
`versions/<N>/` with `manifest.json` last, and a version counts only once its manifest exists (that
path checks for a free N first but cannot exclude a concurrent writer on the same N: register from one
process per model name on object storage).

`load` checks every file against the manifest before using it and reads weights with safetensors only:
a pickled checkpoint (`.pt`, `.pkl`, ...) is refused, never unpickled.

Aliases (`production`, `candidate`, ...) move atomically: the alias file is written under a temporary
name and renamed over the old one. Each alias file carries its own history (the versions it pointed at,
oldest first), so `rollback` moves an alias back to the version it pointed at before the current one.
Two writers moving the same alias at once can lose one history entry (read-modify-write); the alias
itself always names a complete version.

Quantized variants store float weights plus `"quantization": "dynamic_int8"` in `model.json`; `load`
quantizes them again (raysys.distill.quantize), so no packed or pickled tensors are ever stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import nn

import raysys
from raysys.data.dataset import Preprocessor
from raysys.data.schema import DatasetSchema
from raysys.models import build_model

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (WEIGHTS_FILE, "model.json", "schema.json", "preprocessor.json", "metrics.json", "config.json",
                  "lineage.json")
OPTIONAL_FILES = ("reference_profile.json", "model_card.json", "model_card.md")
MAX_ALIAS_HISTORY = 100
ALLOWED_FILES = frozenset(REQUIRED_FILES + OPTIONAL_FILES)
# suffixes of formats whose loading can execute code; never loaded, named in the refusal message
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")
MANIFEST_FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_RENAME_TRIES = 1000


@dataclass
class LoadedModel:
    """One registered version, verified and ready to serve (`model` is in eval mode on CPU)."""

    name: str
    version: int
    model: nn.Module
    model_spec: dict[str, Any]
    schema: DatasetSchema
    preprocessor: Preprocessor
    metrics: dict[str, Any]
    config: dict[str, Any]
    lineage: dict[str, Any]
    reference_profile: dict[str, Any] | None
    manifest: dict[str, Any]
    uri: str = field(default="")
    model_card: dict[str, Any] | None = None
    quantization: str | None = None


def _now() -> str:
    # time.gmtime rather than datetime.UTC, which needs Python 3.11 (pyproject allows 3.10)
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _json_default(o: Any) -> Any:
    # metrics often hold numpy scalars/arrays or tensors; store them as plain JSON numbers/lists
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def _as_dict(obj: Any, what: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if hasattr(obj, "model_dump"):  # pydantic config / schema
        return json.loads(obj.model_dump_json())
    if hasattr(obj, "to_dict"):  # Preprocessor, ReferenceProfile
        return obj.to_dict()
    if isinstance(obj, dict):
        return json.loads(json.dumps(obj, default=_json_default))
    raise ValueError(f"register: {what} must be a dict (or an object with to_dict()/model_dump()), "
                     f"got {type(obj).__name__}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"registry: {kind} {value!r} is invalid; use letters, digits, '.', '_' or '-' "
                         "(starting with a letter or digit, at most 128 characters)")
    return value


class Registry:
    """Versioned, immutable model store. `uri` is a local path (made absolute) or a pyarrow.fs URI."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        self.uri = uri
        self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self.root = self.root.rstrip("/") or "/"
        # POSIX rename of a directory is atomic and refuses a non-empty target; object stores cannot
        # rename directories at all
        self._atomic_dir_rename = self.fs.type_name == "local"

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # ----- paths and low-level IO -----
    def _p(self, *parts: str | int) -> str:
        return "/".join([self.root, *(str(p) for p in parts)])

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _is_dir(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.Directory

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _children(self, path: str) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))

    def _numeric_version_dirs(self, name: str) -> list[int]:
        out = []
        for info in self._children(self._p(name, "versions")):
            if info.type == pafs.FileType.Directory and info.base_name.isdigit():
                out.append(int(info.base_name))
        return sorted(out)

    # ----- listing -----
    def list_models(self) -> list[str]:
        """Names that have at least one directory of versions."""
        return sorted(i.base_name for i in self._children(self.root)
                      if i.type == pafs.FileType.Directory and self._is_dir(self._p(i.base_name, "versions")))

    def list_versions(self, name: str) -> list[int]:
        """Complete versions (those with a manifest), ascending."""
        dirs = self._numeric_version_dirs(name)
        if not dirs:
            return []
        infos = self.fs.get_file_info([self._p(name, "versions", v, MANIFEST_FILE) for v in dirs])
        return [v for v, info in zip(dirs, infos) if info.type == pafs.FileType.File]

    def aliases(self, name: str) -> dict[str, int]:
        out = {}
        for info in self._children(self._p(name, "aliases")):
            if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
                alias = info.base_name[: -len(".json")]
                version = self.get_alias(name, alias)
                if version is not None:
                    out[alias] = version
        return dict(sorted(out.items()))

    # ----- register -----
    def register(self, name: str, *, state_dict: dict[str, torch.Tensor] | nn.Module, model_spec: dict[str, Any],
                 schema: DatasetSchema | dict, preprocessor: Preprocessor | dict, metrics: dict[str, Any],
                 config: dict[str, Any] | Any, lineage: dict[str, Any],
                 reference_profile: dict[str, Any] | Any | None = None,
                 model_card: dict[str, Any] | None = None) -> int:
        """Store a new immutable version and return its number (highest existing + 1, starting at 1).

        `lineage` gets `created_at` (UTC ISO time) and `code_version` (raysys.__version__) when missing.
        The weights must load strictly into `build_model(model_spec)`, so a spec/weights mismatch fails
        here rather than at serving time. `model_card` (raysys.modelcard.build_model_card) is stored as
        `model_card.json` and rendered to `model_card.md`. A spec with `"quantization": "dynamic_int8"`
        takes the *float* weights; `load` quantizes them.
        """
        from raysys.distill.quantize import split_spec

        _check_name("model name", name)
        if isinstance(state_dict, nn.Module):
            state_dict = state_dict.state_dict()
        if not isinstance(state_dict, dict) or not state_dict:
            raise ValueError("register: state_dict must be a non-empty dict of tensors (model.state_dict())")
        spec = _as_dict(model_spec, "model_spec")
        schema_obj = schema if isinstance(schema, DatasetSchema) else DatasetSchema.model_validate(schema)
        pre = preprocessor.to_dict() if isinstance(preprocessor, Preprocessor) else _as_dict(preprocessor,
                                                                                               "preprocessor")
        Preprocessor.from_dict(schema_obj, pre)  # raises when mean/std do not match the schema
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
        try:
            build_model(split_spec(spec)[0]).load_state_dict(tensors, strict=True)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"register: state_dict does not fit model_spec {spec}: {err}") from None
        from safetensors.torch import save as st_save

        lin = _as_dict(lineage, "lineage")
        lin.setdefault("created_at", _now())
        lin.setdefault("code_version", raysys.__version__)
        files: dict[str, bytes] = {
            WEIGHTS_FILE: st_save(tensors, metadata={"format": "pt", "name": name}),
            "model.json": _json_bytes(spec),
            "schema.json": schema_obj.to_json().encode(),
            "preprocessor.json": _json_bytes(pre),
            "metrics.json": _json_bytes(_as_dict(metrics, "metrics")),
            "config.json": _json_bytes(_as_dict(config, "config")),
            "lineage.json": _json_bytes(lin),
        }
        if reference_profile is not None:
            files["reference_profile.json"] = _json_bytes(_as_dict(reference_profile, "reference_profile"))
        if model_card is not None:
            from raysys.modelcard import render_markdown

            card = _as_dict(model_card, "model_card")
            card.setdefault("name", name)
            card.setdefault("lineage", {})
            card["lineage"] = {**lin, **card["lineage"]}
            files["model_card.json"] = _json_bytes(card)
            files["model_card.md"] = render_markdown(card).encode()
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "created_at": lin["created_at"],
            "num_parameters": int(sum(t.numel() for t in tensors.values())),
            "files": {fn: {"sha256": _sha256(b), "size": len(b)} for fn, b in sorted(files.items())},
        }
        files[MANIFEST_FILE] = _json_bytes(manifest)
        versions_dir = self._p(name, "versions")
        self.fs.create_dir(versions_dir, recursive=True)
        if self._atomic_dir_rename:
            return self._commit_by_rename(name, versions_dir, files)
        return self._commit_in_place(name, versions_dir, files)

    def _commit_by_rename(self, name: str, versions_dir: str, files: dict[str, bytes]) -> int:
        tmp = f"{versions_dir}/.tmp-{uuid.uuid4().hex}"
        self.fs.create_dir(tmp)
        try:
            for fn, data in files.items():
                self._write(f"{tmp}/{fn}", data)
            existing = self._numeric_version_dirs(name)
            version = (existing[-1] if existing else 0) + 1
            for _ in range(_MAX_RENAME_TRIES):
                target = f"{versions_dir}/{version}"
                if not self._exists(target):
                    try:
                        self.fs.move(tmp, target)
                        return version
                    except OSError:
                        # another writer took `version` between the check and the rename (the rename
                        # refuses a non-empty target); anything else is a real error
                        if not self._exists(target):
                            raise
                version += 1
            raise RuntimeError(f"register: could not claim a version number for {name!r} after "
                               f"{_MAX_RENAME_TRIES} tries")
        finally:
            if self._exists(tmp):
                self.fs.delete_dir(tmp)

    def _commit_in_place(self, name: str, versions_dir: str, files: dict[str, bytes]) -> int:
        existing = self._numeric_version_dirs(name)
        version = (existing[-1] if existing else 0) + 1
        while self._exists(f"{versions_dir}/{version}"):
            version += 1
        target = f"{versions_dir}/{version}"
        self.fs.create_dir(target)
        for fn, data in files.items():
            if fn != MANIFEST_FILE:
                self._write(f"{target}/{fn}", data)
        self._write(f"{target}/{MANIFEST_FILE}", files[MANIFEST_FILE])  # last: the commit marker
        return version

    # ----- aliases -----
    def set_alias(self, name: str, alias: str, version: int | str) -> None:
        """Point `alias` (e.g. "production") at an existing version; atomic replace of the alias file.
        The version is appended to the alias's history (unless it already is the current one)."""
        _check_name("alias", alias)
        if alias == "latest" or re.fullmatch(r"[vV]?\d+", alias):
            raise ValueError(f"registry: alias {alias!r} is reserved; pick a name such as 'production'")
        version = self._as_version(version)
        versions = self.list_versions(name)
        if version not in versions:
            raise ValueError(f"registry: cannot set alias {alias!r}: {name!r} has no version {version}; "
                             f"versions are {versions}")
        state = self._alias_state(name, alias)
        history = list(state.get("history", []))
        previous = state.get("version")
        if not history or history[-1] != version:
            history.append(version)
        self._write_alias(name, alias, {"version": version, "previous": previous,
                                        "history": history[-MAX_ALIAS_HISTORY:], "updated_at": _now()})

    def _write_alias(self, name: str, alias: str, state: dict[str, Any]) -> None:
        adir = self._p(name, "aliases")
        self.fs.create_dir(adir, recursive=True)
        tmp = f"{adir}/{alias}.json.tmp-{uuid.uuid4().hex}"
        self._write(tmp, _json_bytes(state))
        self.fs.move(tmp, f"{adir}/{alias}.json")  # rename over the old file: readers see old or new

    def _alias_state(self, name: str, alias: str) -> dict[str, Any]:
        try:
            data = json.loads(self._read(self._p(name, "aliases", f"{alias}.json")))
        except FileNotFoundError:
            return {}
        if "history" not in data:  # written before histories existed
            data["history"] = [v for v in (data.get("previous"), data.get("version")) if v is not None]
        return data

    def alias_history(self, name: str, alias: str) -> list[int]:
        """Versions `alias` pointed at, oldest first; the last is the current one."""
        return [int(v) for v in self._alias_state(name, alias).get("history", [])]

    def rollback(self, name: str, alias: str = "production") -> int:
        """Move `alias` back to the version it pointed at before the current one; returns that version.

        The current version is dropped from the alias's history, so a second rollback goes one further.
        """
        _check_name("alias", alias)
        state = self._alias_state(name, alias)
        history = [int(v) for v in state.get("history", [])]
        if not history:
            raise ValueError(f"registry: {name!r} has no alias {alias!r} to roll back")
        if len(history) < 2:
            raise ValueError(f"registry: {name!r} alias {alias!r} has no earlier version to roll back to "
                             f"(history {history})")
        versions = set(self.list_versions(name))
        current = history.pop()
        while history and history[-1] not in versions:  # a version deleted by hand is skipped
            history.pop()
        if not history:
            raise ValueError(f"registry: {name!r} alias {alias!r}: no earlier version still exists")
        target = history[-1]
        self._write_alias(name, alias, {"version": target, "previous": current, "history": history,
                                        "rolled_back_from": current, "updated_at": _now()})
        return target

    def get_alias(self, name: str, alias: str) -> int | None:
        try:
            data = json.loads(self._read(self._p(name, "aliases", f"{alias}.json")))
        except FileNotFoundError:
            return None
        return int(data["version"])

    def delete_alias(self, name: str, alias: str) -> None:
        path = self._p(name, "aliases", f"{alias}.json")
        if self._exists(path):
            self.fs.delete_file(path)

    # ----- resolve -----
    @staticmethod
    def _as_version(ref: int | str) -> int:
        if isinstance(ref, bool):
            raise ValueError(f"registry: version {ref!r} is not a number")
        if isinstance(ref, (int, np.integer)):
            return int(ref)
        s = str(ref).strip()
        if s.lower().startswith("v") and s[1:].isdigit():
            s = s[1:]
        if not s.isdigit():
            raise ValueError(f"registry: version {ref!r} is not a number")
        return int(s)

    def resolve(self, name: str, ref: str | int) -> int:
        """An alias name, "latest", or a version ("3", "v3", 3) -> an existing version number."""
        versions = self.list_versions(name)
        if not versions:
            raise ValueError(f"registry: no model named {name!r} under {self.uri}; models are {self.list_models()}")
        is_number = isinstance(ref, (int, np.integer)) and not isinstance(ref, bool)
        if not is_number:
            s = str(ref).strip()
            is_number = s.isdigit() or (s[:1].lower() == "v" and s[1:].isdigit())
        if is_number:
            v = self._as_version(ref)
            if v in versions:
                return v
        elif str(ref) == "latest":
            return versions[-1]
        else:
            v = self.get_alias(name, str(ref))
            if v is not None and v in versions:
                return v
        raise ValueError(f"registry: {name!r} has no version or alias {ref!r}; versions are {versions}, "
                         f"aliases are {self.aliases(name)} (or use 'latest')")

    # ----- load -----
    def _version_dir(self, name: str, version: int) -> str:
        return self._p(name, "versions", version)

    def _manifest(self, name: str, version: int) -> dict[str, Any]:
        vdir = self._version_dir(name, version)
        manifest = json.loads(self._read(f"{vdir}/{MANIFEST_FILE}"))
        entries = manifest.get("files")
        if not isinstance(entries, dict):
            raise ValueError(f"registry: {vdir}/{MANIFEST_FILE} has no 'files' table")
        for fn in entries:
            if fn.endswith(PICKLE_SUFFIXES):
                raise ValueError(f"registry: refusing {name} v{version}: {fn!r} is a pickle-based file, and "
                                 "loading pickle can run arbitrary code; re-register with safetensors weights")
            if fn not in ALLOWED_FILES:
                raise ValueError(f"registry: {name} v{version}: unexpected file {fn!r} in the manifest; "
                                 f"expected only {sorted(ALLOWED_FILES)}")
        missing = [fn for fn in REQUIRED_FILES if fn not in entries]
        if missing:
            pickled = [i.base_name for i in self._children(vdir) if i.base_name.endswith(PICKLE_SUFFIXES)]
            if WEIGHTS_FILE in missing and pickled:
                raise ValueError(f"registry: refusing {name} v{version}: weights are in {pickled} (pickle) "
                                 f"instead of {WEIGHTS_FILE}; raysys never unpickles model files")
            raise ValueError(f"registry: {name} v{version}: manifest lacks {missing}")
        return manifest

    def _read_verified(self, name: str, version: int, manifest: dict[str, Any], fn: str) -> bytes:
        path = f"{self._version_dir(name, version)}/{fn}"
        try:
            data = self._read(path)
        except FileNotFoundError:
            raise ValueError(f"registry: {name} v{version}: file {fn} is missing ({path})") from None
        want = manifest["files"][fn]
        if len(data) != want["size"] or _sha256(data) != want["sha256"]:
            raise ValueError(f"registry: {name} v{version}: file {fn} does not match its sha256 in the manifest "
                             "(corrupted or tampered); refusing to load it")
        return data

    def _read_json(self, name: str, version: int, manifest: dict[str, Any], fn: str) -> Any:
        return json.loads(self._read_verified(name, version, manifest, fn))

    def load(self, name: str, ref: str | int = "production") -> LoadedModel:
        """Resolve `ref`, verify every file's sha256, and rebuild the model from safetensors weights."""
        version = self.resolve(name, ref)
        manifest = self._manifest(name, version)
        # verify everything before using anything
        blobs = {fn: self._read_verified(name, version, manifest, fn) for fn in manifest["files"]}
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        try:
            tensors = st_load(blobs[WEIGHTS_FILE])
        except (SafetensorError, ValueError, OSError) as err:
            raise ValueError(f"registry: {name} v{version}: {WEIGHTS_FILE} is not a valid safetensors file "
                             f"({err})") from None
        from raysys.distill.quantize import apply_quantization, split_spec

        spec = json.loads(blobs["model.json"])
        schema = DatasetSchema.from_json(blobs["schema.json"])
        float_spec, quantization = split_spec(spec)
        model = build_model(float_spec)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise ValueError(f"registry: {name} v{version}: weights do not fit model.json: {err}") from None
        model = apply_quantization(model.eval(), quantization)
        ref_profile = blobs.get("reference_profile.json")
        card = blobs.get("model_card.json")
        return LoadedModel(
            name=name,
            version=version,
            model=model,
            model_spec=spec,
            schema=schema,
            preprocessor=Preprocessor.from_dict(schema, json.loads(blobs["preprocessor.json"])),
            metrics=json.loads(blobs["metrics.json"]),
            config=json.loads(blobs["config.json"]),
            lineage=json.loads(blobs["lineage.json"]),
            reference_profile=json.loads(ref_profile) if ref_profile is not None else None,
            manifest=manifest,
            uri=self._uri_of(self._version_dir(name, version)),
            model_card=json.loads(card) if card is not None else None,
            quantization=quantization,
        )

    def _uri_of(self, path: str) -> str:
        if self.fs.type_name == "local":
            return path
        return f"{self.uri.split('://', 1)[0]}://{path}"

    def describe(self, name: str, ref: str | int = "latest") -> dict[str, Any]:
        """What `raysys registry show` prints: version, aliases, lineage, metrics, spec and files.

        Reads (and verifies) only the small JSON files, not the weights.
        """
        version = self.resolve(name, ref)
        manifest = self._manifest(name, version)

        def js(fn: str) -> Any:
            return self._read_json(name, version, manifest, fn) if fn in manifest["files"] else None

        schema = js("schema.json")
        return {
            "name": name,
            "version": version,
            "uri": self._uri_of(self._version_dir(name, version)),
            "aliases": sorted(a for a, v in self.aliases(name).items() if v == version),
            "all_versions": self.list_versions(name),
            "created_at": manifest.get("created_at"),
            "num_parameters": manifest.get("num_parameters"),
            "model_spec": js("model.json"),
            "metrics": js("metrics.json"),
            "lineage": js("lineage.json"),
            "config": js("config.json"),
            "features": [f["name"] for f in schema["features"]] if schema else None,
            "classes": schema["classes"] if schema else None,
            "has_reference_profile": "reference_profile.json" in manifest["files"],
            "model_card": js("model_card.json"),
            "alias_history": {a: self.alias_history(name, a) for a in self.aliases(name)},
            "files": manifest["files"],
        }

    def model_card(self, name: str, ref: str | int = "production") -> tuple[int, dict[str, Any] | None, str | None]:
        """`(version, card JSON or None, card Markdown or None)`, both verified against the manifest."""
        version = self.resolve(name, ref)
        manifest = self._manifest(name, version)
        if "model_card.json" not in manifest["files"]:
            return version, None, None
        card = self._read_json(name, version, manifest, "model_card.json")
        md = (self._read_verified(name, version, manifest, "model_card.md").decode()
              if "model_card.md" in manifest["files"] else None)
        return version, card, md
