"""Tier 1: registry hardening (no Ray). Path traversal on every read and write path (the bypass forms of
MLflow's CVE-2023-1177 .. CVE-2024-3848), a register cut by a full disk, and fsync before publishing."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from helpers.spyfs import SpyFS

from raysys.config import DataConfig, ModelConfig
from raysys.data import Preprocessor, SyntheticTask
from raysys.models import build_model, model_spec
from raysys.registry import Registry
from raysys.registry.files import RegistryFiles, shown

NAME = "student"
# each a ValueError naming the field; none may reach the filesystem
BAD_NAMES = ["../../outside", "..%2f..%2foutside", "..", ".", "../x", "../../etc/passwd", "x/../..", "%2e%2e", "%2e%2e%2fx", "..%2f..", "a%2fb", "a#b",
             "#", "x#/../..", "a\x00b", "\x00", "/etc", "/etc/passwd", "..\\x", "a\\b", "C:\\x", "\u2025",
             "\uff0e\uff0e", "\u2024\u2024/x", "x\n", "\n", " x", "x y", "", "a" * 129, "a" * 10_000, ".hidden",
             "-x", "ﬁle", "x\u0000", "~", "~root"]
BAD_REFS = ["../1", "1/../2", "%2e%2e", "#1", "1#", "\x001", "/1", "..\\1", "1\n", "", "\u0663", "\u00b2",
            "-1", "0", "v0", 0, -3, 10**12, 10**5000, 1.0, None, [1], b"1", True]


@pytest.fixture(scope="module")
def task_bits():
    cfg = DataConfig(num_train_rows=200, num_val_rows=50, num_test_rows=50, num_numeric=3, num_categorical=1,
                     num_categories=3, num_classes=2, seed=3)
    task = SyntheticTask(cfg)
    schema = task.schema()
    return schema, Preprocessor.fit(schema, task.sample(200, [3, 1]))


def _register(reg: Registry, bits, name: str = NAME, seed: int = 0) -> int:
    schema, pre = bits
    torch.manual_seed(seed)
    spec = model_spec(schema, ModelConfig(hidden_dims=[8], embed_dim=2))
    return reg.register(name, state_dict=build_model(spec).state_dict(), model_spec=spec, schema=schema,
                        preprocessor=pre, metrics={"accuracy": np.float64(0.5)}, config={}, lineage={},
                        model_card={"intended_use": "tests"})


@pytest.fixture
def reg_and_sentinel(tmp_path, task_bits):
    """A registry with one version and an alias, beside files outside its root that look like registry state:
    without the checks, name '../../outside' would list, resolve and read them."""
    outside = tmp_path / "outside"
    for rel in ("versions/1/manifest.json", "aliases/production/000000000001.json", "aliases/production.json",
                "x/versions/1/manifest.json"):
        (outside / rel).parent.mkdir(parents=True, exist_ok=True)
        (outside / rel).write_text('{"version": 1, "history": [1]}')
    reg = Registry(tmp_path / "root" / "reg")
    assert _register(reg, task_bits) == 1
    reg.set_alias(NAME, "production", 1)
    return reg, tmp_path


def _snapshot(path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*")}


def _readers(reg: Registry, name, alias="production", ref="latest"):
    """Every public Registry method that takes a model name, alias or ref."""
    return {
        "list_versions": lambda: reg.list_versions(name),
        "aliases": lambda: reg.aliases(name),
        "get_alias": lambda: reg.get_alias(name, alias),
        "alias_history": lambda: reg.alias_history(name, alias),
        "resolve": lambda: reg.resolve(name, ref),
        "load": lambda: reg.load(name, ref),
        "describe": lambda: reg.describe(name, ref),
        "model_card": lambda: reg.model_card(name, ref),
        "set_alias": lambda: reg.set_alias(name, alias, 1),
        "rollback": lambda: reg.rollback(name, alias),
        "delete_alias": lambda: reg.delete_alias(name, alias),
    }


def _inside(root: str, path: str) -> bool:
    return os.path.normpath(path) == path and path.startswith(root + "/") and "\x00" not in path


def test_bad_names_are_refused_on_every_path_and_touch_nothing_outside(reg_and_sentinel, monkeypatch):
    reg, tmp = reg_and_sentinel
    before = _snapshot(tmp)
    spy = reg.files.fs = SpyFS(reg.files.fs)
    seen: list[str] = []
    for bad in BAD_NAMES:
        seen += spy.paths
        spy.paths = []
        for method, call in _readers(reg, bad).items():
            with pytest.raises(ValueError, match="model name .* is invalid; use 1 to 128 ASCII letters") as err:
                call()
            assert len(str(err.value)) < 400, (method, "the message quotes a long name in full")
        assert spy.paths == [], f"{bad!r}: the filesystem was asked before the name was checked"
        for method, call in _readers(reg, NAME, alias=bad).items():
            if method in ("list_versions", "aliases", "resolve", "load", "describe", "model_card"):
                continue
            with pytest.raises(ValueError, match="alias .* is invalid; use 1 to 128 ASCII letters"):
                call()
        for method in ("resolve", "load", "describe", "model_card"):
            with pytest.raises(ValueError, match="version ref .* is invalid; use a positive version number"):
                _readers(reg, NAME, ref=bad)[method]()
    seen += spy.paths
    assert seen and all(_inside(reg.root, p) for p in seen), [p for p in seen if not _inside(reg.root, p)]
    assert _snapshot(tmp) == before
    assert reg.resolve(NAME, "production") == 1 and reg.list_models() == [NAME]


@pytest.mark.parametrize("ref", BAD_REFS, ids=lambda r: shown(r)[:24])
def test_bad_version_refs_are_refused(reg_and_sentinel, ref):
    reg, tmp = reg_and_sentinel
    before = _snapshot(tmp)
    with pytest.raises(ValueError, match=r"(version|version ref) .* (invalid|out of range); use "):
        reg.resolve(NAME, ref)
    if not isinstance(ref, (bool, float, type(None), list, bytes)):
        with pytest.raises(ValueError, match="version"):
            reg.set_alias(NAME, "production", ref)
    assert _snapshot(tmp) == before


def test_path_components_cannot_leave_the_root(tmp_path):
    files = RegistryFiles(tmp_path / "reg")
    assert files.path("a", "versions", 3) == f"{tmp_path}/reg/a/versions/3"
    for part in ("..", ".", "", "a/b", "/etc", "a\\b", "a\x00", "\n", "x\x7f"):
        with pytest.raises(ValueError, match="path component .* is invalid"):
            files.path("ok", part)


def test_stray_directories_are_not_models_or_versions(reg_and_sentinel):
    reg, tmp = reg_and_sentinel
    root = tmp / "root" / "reg"
    (root / "bad name" / "versions" / "1").mkdir(parents=True)
    (root / NAME / "versions" / "\u00b2").mkdir()  # a Unicode digit: not a version, and no crash
    (root / NAME / "aliases" / "not an alias").mkdir()
    assert reg.list_models() == [NAME] and reg.list_versions(NAME) == [1]
    assert reg.aliases(NAME) == {"production": 1}


def _enospc_after(n: int, real):
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return flaky, calls


@pytest.mark.parametrize("level", ["os.write", "RegistryFiles.write"])
@pytest.mark.parametrize("object_store", [False, True], ids=["local", "object-store-path"])
@pytest.mark.parametrize("first", [False, True], ids=["second-version", "first-version"])
def test_a_register_cut_by_a_full_disk_leaves_nothing(tmp_path, task_bits, monkeypatch, level, object_store, first):
    reg = Registry(tmp_path / "reg")
    reg.files.atomic_dir_rename = not object_store
    if not first:
        assert _register(reg, task_bits) == 1
    expected = 1 if first else 2
    before = _snapshot(tmp_path)
    if level == "os.write":
        flaky, calls = _enospc_after(3, os.write)
        monkeypatch.setattr(os, "write", flaky)
    else:
        flaky, calls = _enospc_after(3, RegistryFiles.write)
        monkeypatch.setattr(RegistryFiles, "write", flaky)
    with pytest.raises(OSError) as err:
        _register(reg, task_bits, seed=1)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and calls[0] == 3
    # no temp files, no partial version: the same files as before (a first register may leave empty directories)
    after = _snapshot(tmp_path)
    assert {p for p in after if os.path.isfile(p)} == {p for p in before if os.path.isfile(p)}
    assert not [p for p in after if ".tmp-" in p] and not os.path.exists(tmp_path / "reg" / NAME / "versions" / "2")
    assert reg.list_versions(NAME) == ([] if first else [1]) and reg.list_models() == ([] if first else [NAME])
    with pytest.raises(ValueError, match="no (model named|version or alias)"):
        reg.resolve(NAME, expected)
    assert _register(reg, task_bits, seed=2) == expected
    assert reg.load(NAME, "latest").version == expected


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced descriptors through /proc")
def test_files_are_fsynced_before_the_rename_that_publishes_them(tmp_path, task_bits, monkeypatch):
    reg = Registry(tmp_path / "reg")
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace, real_link = os.fsync, os.rename, os.replace, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rec(kind, real):
        def f(src, dst, *a, **k):
            events.append((kind, f"{src} -> {dst}"))
            return real(src, dst, *a, **k)
        return f

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rec("rename", real_rename))
    monkeypatch.setattr(os, "replace", rec("replace", real_replace))
    monkeypatch.setattr(os, "link", rec("link", real_link))
    assert _register(reg, task_bits) == 1
    vdir = tmp_path / "reg" / NAME / "versions"
    renames = [i for i, (k, _) in enumerate(events) if k == "rename"]
    assert len(renames) == 1 and events[renames[0]][1].endswith(f"{vdir}/1")
    tmp = events[renames[0]][1].split(" -> ")[0]
    synced_before = {p for k, p in events[:renames[0]] if k == "fsync"}
    assert {f"{tmp}/{p.name}" for p in (vdir / "1").iterdir()} | {tmp} <= synced_before
    assert ("fsync", str(vdir)) in events[renames[0]:]
    # an alias move (create_exclusive: link) and a replace: file synced before, directory after
    for step, kind in ((lambda: reg.set_alias(NAME, "production", 1), "link"),
                       (lambda: reg.files.replace(reg.files.path(NAME, "state.json"), b"{}"), "replace")):
        events.clear()
        step()
        i = next(i for i, (k, _) in enumerate(events) if k == kind)
        src, dst = events[i][1].split(" -> ")
        assert ("fsync", src) in events[:i] and ("fsync", os.path.dirname(dst)) in events[i:]
    assert reg.files.read(reg.files.path(NAME, "state.json")) == b"{}"


@pytest.mark.parametrize("local", [True, False], ids=["local", "object-store-path"])
def test_failed_replace_and_exclusive_create_leave_no_temp_file(tmp_path, monkeypatch, local):
    import pyarrow.fs as pafs

    files = RegistryFiles(tmp_path / "reg")
    if not local:
        files.fs = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())
    files.make_dir(files.path("m"), recursive=True)
    target = files.path("m", "state.json")
    files.replace(target, b"old")
    flaky, _ = _enospc_after(1, RegistryFiles.write)
    monkeypatch.setattr(RegistryFiles, "write", flaky)
    with pytest.raises(OSError):
        files.replace(target, b"new")
    flaky, _ = _enospc_after(1, RegistryFiles.write)
    monkeypatch.setattr(RegistryFiles, "write", flaky)
    with pytest.raises(OSError):
        files.create_exclusive(files.path("m", "lease.json"), b"x")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "reg" / "m")) == ["state.json"]
    assert files.read(target) == b"old"
    assert files.create_exclusive(files.path("m", "lease.json"), b"x")
    assert not files.create_exclusive(files.path("m", "lease.json"), b"y")
    assert files.read(files.path("m", "lease.json")) == b"x"


def test_cli_refuses_bad_names_with_the_rule(tmp_path, task_bits):
    from typer.testing import CliRunner

    from raysys.cli import app

    reg = Registry(tmp_path / "registry")
    _register(reg, task_bits, name="raysys-student")  # the config's default model_name
    reg.set_alias("raysys-student", "production", 1)
    root = ["--root", str(tmp_path)]
    runner = CliRunner()
    for args in (["registry", "show", "../../etc"], ["registry", "show", "1", "--name", "../x"],
                 ["registry", "promote", "1", "--alias", "a#b"], ["registry", "rollback", "--alias", "..\\x"]):
        r = runner.invoke(app, [*args, *root])
        assert r.exit_code == 2 and "is invalid; use" in r.output, (args, r.output)
