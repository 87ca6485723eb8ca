"""What a version directory holds, and its manifest: every other file with its sha256 and size.

`load` checks every file against the manifest before using any, and reads weights with safetensors only:
a pickled checkpoint (`.pt`, `.pkl`, ...) is refused, never unpickled (loading pickle can run code).
"""

from __future__ import annotations

from typing import Any

from raysys.registry.files import sha256

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (WEIGHTS_FILE, "model.json", "schema.json", "preprocessor.json", "metrics.json", "config.json",
                  "lineage.json")
OPTIONAL_FILES = ("reference_profile.json", "model_card.json", "model_card.md")
ALLOWED_FILES = frozenset(REQUIRED_FILES + OPTIONAL_FILES)
# suffixes of formats whose loading can execute code; never loaded, named in the refusal message
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")
MANIFEST_FORMAT = 1


def build_manifest(name: str, created_at: str, num_parameters: int, files: dict[str, bytes]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "created_at": created_at,
        "num_parameters": num_parameters,
        "files": {fn: {"sha256": sha256(b), "size": len(b)} for fn, b in sorted(files.items())},
    }


def check_manifest(manifest: dict[str, Any], where: str, vdir: str, listing: list[str]) -> None:
    """ValueError unless `manifest` lists every required file and nothing else; `where` ("name vN"), the
    version directory `vdir` and `listing` (the names in it) name the problem, pickled weights in particular."""
    entries = manifest.get("files")
    if not isinstance(entries, dict):
        raise ValueError(f"registry: {vdir}/{MANIFEST_FILE} has no 'files' table")
    for fn in entries:
        if fn.endswith(PICKLE_SUFFIXES):
            raise ValueError(f"registry: refusing {where}: {fn!r} is a pickle-based file, and loading pickle "
                             "can run arbitrary code; re-register with safetensors weights")
        if fn not in ALLOWED_FILES:
            raise ValueError(f"registry: {where}: unexpected file {fn!r} in the manifest; "
                             f"expected only {sorted(ALLOWED_FILES)}")
    missing = [fn for fn in REQUIRED_FILES if fn not in entries]
    if missing:
        pickled = [fn for fn in listing if fn.endswith(PICKLE_SUFFIXES)]
        if WEIGHTS_FILE in missing and pickled:
            raise ValueError(f"registry: refusing {where}: weights are in {pickled} (pickle) instead of "
                             f"{WEIGHTS_FILE}; raysys never unpickles model files")
        raise ValueError(f"registry: {where}: manifest lacks {missing}")


def verified(data: bytes, entry: dict[str, Any], where: str, fn: str) -> bytes:
    """`data` when it matches its manifest `entry`; ValueError otherwise."""
    if len(data) != entry["size"] or sha256(data) != entry["sha256"]:
        raise ValueError(f"registry: {where}: file {fn} does not match its sha256 in the manifest "
                         "(corrupted or tampered); refusing to load it")
    return data
