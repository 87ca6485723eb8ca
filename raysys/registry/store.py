"""`Registry`: register, resolve and load immutable model versions; aliases point at them.

A version is immutable. `register` writes every file under `versions/.tmp-<uuid>/` and renames that
directory to `versions/<N>` (N = highest existing + 1), each file and the directory fsynced before the rename
(`RegistryFiles.publish_dir`). A register that fails part-way (a full disk) removes its temporary directory:
no version appears and the number stays free. POSIX `rename` of a directory onto an existing,
non-empty one fails, so two writers racing for the same N cannot overwrite each other: the loser
retries with N+1. Object stores have no directory rename; there the files are written straight into
`versions/<N>/` with `manifest.json` last, and a version counts only once its manifest exists (that
path checks for a free N first but cannot exclude a concurrent writer on the same N: register from one
process per model name on object storage; a failed write there removes its partial `versions/<N>/`).

Every public method validates the model name, alias and version ref it is given (`check_name`, `check_ref`)
before touching the filesystem, reads included: a name can never resolve to a path outside the root.

Quantized variants store float weights plus `"quantization": "dynamic_int8"` in `model.json`; `load`
quantizes them again (raysys.models.quantize), so no packed or pickled tensors are ever stored.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import raysys
from raysys.data.dataset import Preprocessor
from raysys.data.schema import DatasetSchema
from raysys.models import build_model
from raysys.models.quantize import apply_quantization, split_spec
from raysys.registry.aliases import AliasStore
from raysys.registry.files import (
    RegistryFiles,
    as_dict,
    check_name,
    check_ref,
    fsync_dir,
    is_name,
    json_bytes,
    utc_now,
)
from raysys.registry.manifest import MANIFEST_FILE, WEIGHTS_FILE, build_manifest, check_manifest, verified

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


def _weights(state_dict: dict[str, torch.Tensor] | nn.Module, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CPU copies of the weights, checked to load strictly into `build_model(spec)`."""
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError("register: state_dict must be a non-empty dict of tensors (model.state_dict())")
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    try:
        build_model(split_spec(spec)[0]).load_state_dict(tensors, strict=True)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"register: state_dict does not fit model_spec {spec}: {err}") from None
    return tensors


def _card_files(model_card: dict[str, Any], name: str, lineage: dict[str, Any]) -> dict[str, bytes]:
    from raysys.registry.modelcard import render_markdown

    card = as_dict(model_card, "model_card")
    card.setdefault("name", name)
    card.setdefault("lineage", {})
    card["lineage"] = {**lineage, **card["lineage"]}
    return {"model_card.json": json_bytes(card), "model_card.md": render_markdown(card).encode()}


class Registry:
    """Versioned, immutable model store. `uri` is a local path (made absolute) or a pyarrow.fs URI."""

    def __init__(self, uri: str | Path):
        self.files = RegistryFiles(uri)
        self.uri, self.root = self.files.uri, self.files.root
        self._aliases = AliasStore(self.files)

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    def _version_dir(self, name: str, version: int) -> str:
        return self.files.path(name, "versions", version)

    def _numeric_version_dirs(self, name: str) -> list[int]:
        dirs = self.files.subdirs(self.files.path(check_name("model name", name), "versions"))
        return sorted(int(d) for d in dirs if d.isascii() and d.isdigit())

    # ----- listing -----
    def list_models(self) -> list[str]:
        """Valid names with at least one complete version (a directory whose name breaks the rules, or a model
        whose only register failed part-way, is not listed)."""
        return sorted(d for d in self.files.subdirs(self.root) if is_name(d) and self.list_versions(d))

    def list_versions(self, name: str) -> list[int]:
        """Complete versions (those with a manifest), ascending."""
        dirs = self._numeric_version_dirs(name)
        if not dirs:
            return []
        done = self.files.is_file([f"{self._version_dir(name, v)}/{MANIFEST_FILE}" for v in dirs])
        return [v for v, ok in zip(dirs, done) if ok]

    # ----- register -----
    def register(self, name: str, *, state_dict: dict[str, torch.Tensor] | nn.Module, model_spec: dict[str, Any],
                 schema: DatasetSchema | dict, preprocessor: Preprocessor | dict, metrics: dict[str, Any],
                 config: dict[str, Any] | Any, lineage: dict[str, Any],
                 reference_profile: dict[str, Any] | Any | None = None,
                 model_card: dict[str, Any] | None = None) -> int:
        """Store a new immutable version and return its number (highest existing + 1, starting at 1).

        `lineage` gets `created_at` (UTC ISO time) and `code_version` (raysys.__version__) when missing.
        The weights must load strictly into `build_model(model_spec)`, so a spec/weights mismatch fails
        here rather than at serving time. `model_card` (raysys.registry.modelcard.build_model_card) is stored as
        `model_card.json` and rendered to `model_card.md`. A spec with `"quantization": "dynamic_int8"`
        takes the *float* weights; `load` quantizes them.
        """
        from safetensors.torch import save as st_save

        check_name("model name", name)
        spec = as_dict(model_spec, "model_spec")
        schema_obj = schema if isinstance(schema, DatasetSchema) else DatasetSchema.model_validate(schema)
        pre = preprocessor.to_dict() if isinstance(preprocessor, Preprocessor) else as_dict(preprocessor,
                                                                                              "preprocessor")
        Preprocessor.from_dict(schema_obj, pre)  # raises when mean/std do not match the schema
        tensors = _weights(state_dict, spec)
        lin = as_dict(lineage, "lineage")
        lin.setdefault("created_at", utc_now())
        lin.setdefault("code_version", raysys.__version__)
        files: dict[str, bytes] = {
            WEIGHTS_FILE: st_save(tensors, metadata={"format": "pt", "name": name}),
            "model.json": json_bytes(spec),
            "schema.json": schema_obj.to_json().encode(),
            "preprocessor.json": json_bytes(pre),
            "metrics.json": json_bytes(as_dict(metrics, "metrics")),
            "config.json": json_bytes(as_dict(config, "config")),
            "lineage.json": json_bytes(lin),
        }
        if reference_profile is not None:
            files["reference_profile.json"] = json_bytes(as_dict(reference_profile, "reference_profile"))
        if model_card is not None:
            files.update(_card_files(model_card, name, lin))
        num_parameters = int(sum(t.numel() for t in tensors.values()))
        files[MANIFEST_FILE] = json_bytes(build_manifest(name, lin["created_at"], num_parameters, files))
        versions_dir = self.files.path(name, "versions")
        self.files.make_dir(versions_dir, recursive=True)
        if self.files.atomic_dir_rename:
            return self._commit_by_rename(name, versions_dir, files)
        return self._commit_in_place(name, versions_dir, files)

    def _commit_by_rename(self, name: str, versions_dir: str, files: dict[str, bytes]) -> int:
        fs = self.files
        tmp = f"{versions_dir}/.tmp-{uuid.uuid4().hex}"
        fs.make_dir(tmp)
        try:
            for fn, data in files.items():
                fs.write(f"{tmp}/{fn}", data)
            existing = self._numeric_version_dirs(name)
            version = (existing[-1] if existing else 0) + 1
            for _ in range(_MAX_RENAME_TRIES):
                target = f"{versions_dir}/{version}"
                if not fs.exists(target):
                    try:
                        fs.publish_dir(tmp, target)
                    except OSError:
                        # another writer took `version` between the check and the rename (the rename
                        # refuses a non-empty target); anything else is a real error
                        if not fs.exists(target):
                            raise
                    else:
                        fsync_dir(versions_dir)  # the new name survives a crash
                        return version
                version += 1
            raise RuntimeError(f"register: could not claim a version number for {name!r} after "
                               f"{_MAX_RENAME_TRIES} tries")
        finally:
            fs.discard(tmp)  # gone after a successful rename; after a failure, the partial files with it

    def _commit_in_place(self, name: str, versions_dir: str, files: dict[str, bytes]) -> int:
        existing = self._numeric_version_dirs(name)
        version = (existing[-1] if existing else 0) + 1
        while self.files.exists(f"{versions_dir}/{version}"):
            version += 1
        target = f"{versions_dir}/{version}"
        self.files.make_dir(target)
        try:
            for fn, data in files.items():
                if fn != MANIFEST_FILE:
                    self.files.write(f"{target}/{fn}", data)
            self.files.write(f"{target}/{MANIFEST_FILE}", files[MANIFEST_FILE])  # last: the commit marker
        except BaseException:
            self.files.discard(target)  # no manifest was written, so nothing saw this version
            raise
        return version

    # ----- aliases (raysys.registry.aliases) -----
    def aliases(self, name: str) -> dict[str, int]:
        return self._aliases.all(name)

    def set_alias(self, name: str, alias: str, version: int | str) -> None:
        """Point `alias` (e.g. "production") at an existing version; atomic replace of the alias file.
        The version is appended to the alias's history (unless it already is the current one)."""
        self._aliases.move(name, alias, version, self.list_versions(name))

    def alias_history(self, name: str, alias: str) -> list[int]:
        """Versions `alias` pointed at, oldest first; the last is the current one."""
        return self._aliases.history(name, alias)

    def rollback(self, name: str, alias: str = "production") -> int:
        """Move `alias` back to the version it pointed at before the current one; returns that version.

        The current version is dropped from the alias's history, so a second rollback goes one further.
        """
        return self._aliases.roll_back(name, alias, self.list_versions(name))

    def get_alias(self, name: str, alias: str) -> int | None:
        return self._aliases.get(name, alias)

    def delete_alias(self, name: str, alias: str) -> None:
        self._aliases.delete(name, alias)

    # ----- resolve -----
    def resolve(self, name: str, ref: str | int) -> int:
        """An alias name, "latest", or a version ("3", "v3", 3) -> an existing version number. ValueError naming
        the field for an invalid name or ref (checked before any file is read), or one that does not exist."""
        check_name("model name", name)
        ref = check_ref(ref)
        versions = self.list_versions(name)
        if not versions:
            raise ValueError(f"registry: no model named {name!r} under {self.uri}; models are {self.list_models()}")
        if isinstance(ref, int):
            if ref in versions:
                return ref
        elif ref == "latest":
            return versions[-1]
        else:
            v = self.get_alias(name, ref)
            if v is not None and v in versions:
                return v
        raise ValueError(f"registry: {name!r} has no version or alias {ref!r}; versions are {versions}, "
                         f"aliases are {self.aliases(name)} (or use 'latest')")

    # ----- load -----
    def _manifest(self, name: str, version: int) -> dict[str, Any]:
        vdir = self._version_dir(name, version)
        manifest = json.loads(self.files.read(f"{vdir}/{MANIFEST_FILE}"))
        check_manifest(manifest, f"{name} v{version}", vdir, [i.base_name for i in self.files.children(vdir)])
        return manifest

    def _read_verified(self, name: str, version: int, manifest: dict[str, Any], fn: str) -> bytes:
        path = f"{self._version_dir(name, version)}/{fn}"
        try:
            data = self.files.read(path)
        except FileNotFoundError:
            raise ValueError(f"registry: {name} v{version}: file {fn} is missing ({path})") from None
        return verified(data, manifest["files"][fn], f"{name} v{version}", fn)

    def _read_json(self, name: str, version: int, manifest: dict[str, Any], fn: str) -> Any:
        return json.loads(self._read_verified(name, version, manifest, fn))

    def _build(self, name: str, version: int, spec: dict[str, Any], weights: bytes) -> nn.Module:
        """The eval-mode model of `spec` with the safetensors `weights`, quantized as the spec says."""
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        try:
            tensors = st_load(weights)
        except (SafetensorError, ValueError, OSError) as err:
            raise ValueError(f"registry: {name} v{version}: {WEIGHTS_FILE} is not a valid safetensors file "
                             f"({err})") from None
        float_spec, quantization = split_spec(spec)
        model = build_model(float_spec)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise ValueError(f"registry: {name} v{version}: weights do not fit model.json: {err}") from None
        return apply_quantization(model.eval(), quantization)

    def load(self, name: str, ref: str | int = "production") -> LoadedModel:
        """Resolve `ref`, verify every file's sha256, and rebuild the model from safetensors weights."""
        version = self.resolve(name, ref)
        manifest = self._manifest(name, version)
        # verify everything before using anything
        blobs = {fn: self._read_verified(name, version, manifest, fn) for fn in manifest["files"]}
        spec = json.loads(blobs["model.json"])
        model = self._build(name, version, spec, blobs[WEIGHTS_FILE])
        schema = DatasetSchema.from_json(blobs["schema.json"])
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
            uri=self.files.uri_of(self._version_dir(name, version)),
            model_card=json.loads(card) if card is not None else None,
            quantization=split_spec(spec)[1],
        )

    def version_files(self, name: str, ref: str | int = "production") -> tuple[int, dict[str, bytes]]:
        """`(version, {file name: bytes})`: the manifest and every file it lists, each checked against its sha256
        (what an export copies; nothing is built or unpickled)."""
        version = self.resolve(name, ref)
        manifest = self._manifest(name, version)
        files = {fn: self._read_verified(name, version, manifest, fn) for fn in manifest["files"]}
        files[MANIFEST_FILE] = self.files.read(f"{self._version_dir(name, version)}/{MANIFEST_FILE}")
        return version, files

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
            "uri": self.files.uri_of(self._version_dir(name, version)),
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
