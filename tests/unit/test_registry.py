"""Tier 1: the model registry on a temp dir (no Ray)."""

from __future__ import annotations

import json
import pickle
import threading

import numpy as np
import pytest
import torch

from raysys.config import DataConfig, ModelConfig
from raysys.data import Preprocessor, SyntheticTask
from raysys.models import build_model, model_spec
from raysys.registry import LoadedModel, Registry
from raysys.registry.files import RegistryFiles

NAME = "student"


@pytest.fixture(scope="module")
def task_bits():
    cfg = DataConfig(num_train_rows=400, num_val_rows=100, num_test_rows=100, num_numeric=4, num_categorical=2,
                     num_categories=3, num_classes=3, seed=7)
    task = SyntheticTask(cfg)
    schema = task.schema()
    table = task.sample(400, [7, 1])
    pre = Preprocessor.fit(schema, table)
    x_num, x_cat, _ = pre.transform_table(table)
    return schema, pre, x_num, x_cat


def _model(schema, seed: int):
    torch.manual_seed(seed)
    spec = model_spec(schema, ModelConfig(hidden_dims=[16], embed_dim=3))
    return spec, build_model(spec).eval()


def _register(reg: Registry, schema, pre, seed: int = 0, **extra) -> tuple[int, torch.nn.Module]:
    spec, model = _model(schema, seed)
    version = reg.register(
        NAME, state_dict=model.state_dict(), model_spec=spec, schema=schema, preprocessor=pre,
        metrics={"accuracy": np.float64(0.75), "confusion": np.eye(2)}, config={"lr": 0.01},
        lineage={"teacher": "runs/teacher/ckpt", "data_fingerprint": "abc123"}, **extra,
    )
    return version, model


def test_round_trip_aliases_and_resolve(tmp_path, task_bits):
    schema, pre, x_num, x_cat = task_bits
    reg = Registry(str(tmp_path / "reg"))
    assert reg.list_models() == [] and reg.list_versions(NAME) == []
    v1, m1 = _register(reg, schema, pre, seed=1, reference_profile={"kind": "test", "n": 3})
    v2, m2 = _register(reg, schema, pre, seed=2)
    assert (v1, v2) == (1, 2)
    assert reg.list_models() == [NAME] and reg.list_versions(NAME) == [1, 2]

    reg.set_alias(NAME, "production", 1)
    assert reg.get_alias(NAME, "production") == 1
    reg.set_alias(NAME, "production", 2)  # the alias moves
    reg.set_alias(NAME, "stable", 1)
    assert reg.aliases(NAME) == {"production": 2, "stable": 1}
    assert reg.get_alias(NAME, "canary") is None
    with pytest.raises(ValueError, match="no version 9"):
        reg.set_alias(NAME, "production", 9)
    with pytest.raises(ValueError, match="reserved"):
        reg.set_alias(NAME, "latest", 1)
    assert not [p for p in (tmp_path / "reg" / NAME / "aliases").iterdir() if ".tmp-" in p.name]

    assert reg.resolve(NAME, "production") == 2
    assert reg.resolve(NAME, "stable") == 1
    assert reg.resolve(NAME, "1") == 1 and reg.resolve(NAME, 2) == 2 and reg.resolve(NAME, "v1") == 1
    assert reg.resolve(NAME, "latest") == 2
    with pytest.raises(ValueError, match=r"'canary'.*versions are \[1, 2\].*production"):
        reg.resolve(NAME, "canary")
    with pytest.raises(ValueError, match="no version or alias 5"):
        reg.resolve(NAME, 5)
    with pytest.raises(ValueError, match="no model named 'other'"):
        reg.resolve("other", "latest")

    loaded = reg.load(NAME)  # "production" -> v2
    assert isinstance(loaded, LoadedModel) and loaded.version == 2 and not loaded.model.training
    xn, xc = torch.from_numpy(x_num), torch.from_numpy(x_cat)
    with torch.no_grad():
        assert torch.equal(loaded.model(xn, xc), m2(xn, xc))
        assert torch.equal(reg.load(NAME, 1).model(xn, xc), m1(xn, xc))
    assert loaded.schema == schema
    np.testing.assert_array_equal(loaded.preprocessor.mean, pre.mean)
    np.testing.assert_array_equal(loaded.preprocessor.std, pre.std)
    assert loaded.metrics["accuracy"] == 0.75 and loaded.metrics["confusion"] == [[1.0, 0.0], [0.0, 1.0]]
    assert loaded.config == {"lr": 0.01}
    assert loaded.lineage["teacher"] == "runs/teacher/ckpt" and loaded.lineage["data_fingerprint"] == "abc123"
    assert "created_at" in loaded.lineage and loaded.lineage["code_version"]
    assert loaded.reference_profile is None
    assert reg.load(NAME, 1).reference_profile == {"kind": "test", "n": 3}
    files = loaded.manifest["files"]
    assert set(files) == {"model.safetensors", "model.json", "schema.json", "preprocessor.json", "metrics.json",
                          "config.json", "lineage.json"}
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in files.values())

    d = reg.describe(NAME, "production")
    assert d["version"] == 2 and d["aliases"] == ["production"] and d["all_versions"] == [1, 2]
    assert d["num_parameters"] == sum(p.numel() for p in m2.parameters())
    assert d["features"] == [f.name for f in schema.features]
    json.dumps(d)  # printable as JSON


def test_relative_path_made_absolute(tmp_path, task_bits, monkeypatch):
    schema, pre, *_ = task_bits
    monkeypatch.chdir(tmp_path)
    reg = Registry("rel/reg")
    assert reg.root == str(tmp_path / "rel" / "reg")
    _register(reg, schema, pre)
    assert Registry(f"file://{tmp_path}/rel/reg").list_versions(NAME) == [1]


@pytest.mark.parametrize("victim", ["model.safetensors", "schema.json", "metrics.json"])
def test_tampered_file_is_refused(tmp_path, task_bits, victim):
    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "reg")
    _register(reg, schema, pre)
    path = tmp_path / "reg" / NAME / "versions" / "1" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"file {victim} does not match its sha256"):
        reg.load(NAME, 1)


def test_missing_file_is_refused(tmp_path, task_bits):
    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "reg")
    _register(reg, schema, pre)
    (tmp_path / "reg" / NAME / "versions" / "1" / "preprocessor.json").unlink()
    with pytest.raises(ValueError, match="preprocessor.json is missing"):
        reg.load(NAME, "latest")


class _Boom:
    """Unpickling this runs code: proof that a pickled file must never be loaded."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['BOOM_FILE']).write_text('pwned')",))


def test_pickled_weights_are_refused(tmp_path, task_bits, monkeypatch):
    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "reg")
    _register(reg, schema, pre)
    boom = tmp_path / "boom"
    monkeypatch.setenv("BOOM_FILE", str(boom))
    vdir = tmp_path / "reg" / NAME / "versions" / "1"
    payload = pickle.dumps({"state_dict": _Boom()})
    # (a) the weights replaced by a pickle, manifest rewritten to list it with a correct sha256
    (vdir / "model.safetensors").unlink()
    (vdir / "model.pt").write_bytes(payload)
    manifest = json.loads((vdir / "manifest.json").read_text())
    entry = manifest["files"].pop("model.safetensors")
    manifest["files"]["model.pt"] = entry | {"size": len(payload),
                                             "sha256": __import__("hashlib").sha256(payload).hexdigest()}
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="pickle"):
        reg.load(NAME, 1)
    # (b) the manifest left alone: the weights are simply missing, a .pt sits beside them
    del manifest["files"]["model.pt"]
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"model.pt.*pickle"):
        reg.load(NAME, 1)
    # (c) a pickle under the safetensors name, with a matching sha256, is still not unpickled
    (vdir / "model.pt").unlink()
    (vdir / "model.safetensors").write_bytes(payload)
    manifest["files"]["model.safetensors"] = {"size": len(payload),
                                              "sha256": __import__("hashlib").sha256(payload).hexdigest()}
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        reg.load(NAME, 1)
    assert not boom.exists()


def test_versions_are_immutable_and_numbering_survives_a_race(tmp_path, task_bits, monkeypatch):
    schema, pre, x_num, x_cat = task_bits
    reg = Registry(tmp_path / "reg")
    _register(reg, schema, pre, seed=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "reg" / NAME / "versions" / "1").iterdir()}

    # a second writer that saw the same stale listing (both think the next number is 1) must not
    # overwrite version 1: its rename fails and it moves on to 2
    real = Registry._numeric_version_dirs
    monkeypatch.setattr(Registry, "_numeric_version_dirs", lambda self, name: [])
    v2, m2 = _register(reg, schema, pre, seed=2)
    assert v2 == 2
    # the narrowest race: the target looked free at the check and was taken before the rename; the
    # rename refuses the non-empty directory and the writer retries with the next number
    real_exists = RegistryFiles.exists
    lied: list[str] = []

    def exists_once_stale(self, path):
        if path.endswith("/versions/1") and not lied:
            lied.append(path)
            return False
        return real_exists(self, path)

    monkeypatch.setattr(RegistryFiles, "exists", exists_once_stale)
    v3, _ = _register(reg, schema, pre, seed=3)
    monkeypatch.setattr(RegistryFiles, "exists", real_exists)
    monkeypatch.setattr(Registry, "_numeric_version_dirs", real)
    assert lied and v3 == 3
    after = {p.name: p.read_bytes() for p in (tmp_path / "reg" / NAME / "versions" / "1").iterdir()}
    assert after == before
    with torch.no_grad():
        assert torch.equal(reg.load(NAME, 2).model(torch.from_numpy(x_num), torch.from_numpy(x_cat)),
                           m2(torch.from_numpy(x_num), torch.from_numpy(x_cat)))
    # no temp dirs left behind
    assert not [p for p in (tmp_path / "reg" / NAME / "versions").iterdir() if p.name.startswith(".tmp-")]


def test_concurrent_registers_get_distinct_versions(tmp_path, task_bits):
    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "reg")
    out: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def work(seed: int) -> None:
        try:
            barrier.wait()
            out.append(_register(Registry(tmp_path / "reg"), schema, pre, seed=seed)[0])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(out) == [1, 2, 3, 4, 5, 6]
    assert reg.list_versions(NAME) == [1, 2, 3, 4, 5, 6]
    for v in out:
        reg.load(NAME, v)


def test_object_store_path_writes_manifest_last(tmp_path, task_bits):
    """The path used where directories cannot be renamed (s3://, gs://), exercised on a local dir."""
    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "reg")
    reg.files.atomic_dir_rename = False
    assert _register(reg, schema, pre, seed=1)[0] == 1
    # a crashed writer left version 2 without a manifest: it is not listed, and its number is not reused
    (tmp_path / "reg" / NAME / "versions" / "2").mkdir()
    assert reg.list_versions(NAME) == [1]
    assert _register(reg, schema, pre, seed=2)[0] == 3
    assert reg.list_versions(NAME) == [1, 3]
    assert reg.load(NAME, "latest").version == 3


def test_register_validates_inputs(tmp_path, task_bits):
    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "reg")
    spec, model = _model(schema, 0)
    common = dict(schema=schema, preprocessor=pre, metrics={}, config={}, lineage={})
    bad_spec = dict(spec, hidden_dims=[8])
    with pytest.raises(ValueError, match="does not fit model_spec"):
        reg.register(NAME, state_dict=model.state_dict(), model_spec=bad_spec, **common)
    with pytest.raises(ValueError, match="model name"):
        reg.register("../evil", state_dict=model.state_dict(), model_spec=spec, **common)
    assert reg.list_versions(NAME) == []
    # an nn.Module is accepted in place of its state dict
    assert reg.register(NAME, state_dict=model, model_spec=spec, **common) == 1


# ----- alias history and rollback, model cards, quantized variants -----


def test_alias_history_and_rollback(tmp_path, task_bits):
    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "reg")
    for s in range(3):
        _register(reg, schema, pre, seed=s)
    with pytest.raises(ValueError, match="no alias 'production'"):
        reg.rollback(NAME)
    reg.set_alias(NAME, "production", 1)
    with pytest.raises(ValueError, match="no earlier version"):
        reg.rollback(NAME)
    reg.set_alias(NAME, "production", 2)
    reg.set_alias(NAME, "production", 2)  # no-op move: no duplicate history entry
    reg.set_alias(NAME, "production", 3)
    reg.set_alias(NAME, "candidate", 3)
    assert reg.alias_history(NAME, "production") == [1, 2, 3]
    assert reg.rollback(NAME) == 2 and reg.get_alias(NAME, "production") == 2
    assert reg.alias_history(NAME, "production") == [1, 2]
    assert reg.rollback(NAME, "production") == 1 and reg.load(NAME).version == 1
    assert reg.get_alias(NAME, "candidate") == 3  # other aliases untouched
    # every move created the next generation file of its alias (the no-op move wrote none); no temp files left
    adir = tmp_path / "reg" / NAME / "aliases"
    assert sorted(p.name for p in adir.iterdir()) == ["candidate", "production"]
    gens = sorted(p.name for p in (adir / "production").iterdir())
    assert gens == [f"{g:012d}.json" for g in range(1, 6)]  # 1, 2, 3, rollback, rollback
    state = json.loads((adir / "production" / gens[-1]).read_text())
    assert state["version"] == 1 and state["rolled_back_from"] == 2 and state["generation"] == 5
    d = reg.describe(NAME, "production")
    assert d["alias_history"]["production"] == [1]


def test_alias_moves_are_atomic_for_concurrent_readers(tmp_path, task_bits, monkeypatch):
    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "reg")
    for s in range(2):
        _register(reg, schema, pre, seed=s)
    reg.set_alias(NAME, "production", 1)
    # a writer that dies after writing its temp file but before the exclusive create leaves the alias as it was
    import raysys.registry.files as files_mod

    def no_link(*args):
        raise OSError("killed before the link")

    monkeypatch.setattr(files_mod.os, "link", no_link)
    with pytest.raises(OSError):
        reg.set_alias(NAME, "production", 2)
    monkeypatch.undo()
    assert reg.get_alias(NAME, "production") == 1 and reg.aliases(NAME) == {"production": 1}
    seen: list[int | None] = []
    stop = threading.Event()

    def reader():
        r = Registry(tmp_path / "reg")
        while not stop.is_set():
            seen.append(r.get_alias(NAME, "production"))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(30):
        reg.set_alias(NAME, "production", 1 + i % 2)
    stop.set()
    t.join()
    assert seen and set(seen) <= {1, 2}  # never missing, never half-written


def _move_many(root: str, worker: int, moves: int, versions: list[int], start) -> None:
    """One concurrent mover (thread or process): moves `production` to its own distinct versions."""
    from raysys.registry.aliases import AliasStore

    store = AliasStore(RegistryFiles(root))
    start.wait()
    for j in range(moves):
        store.move(NAME, "production", worker * moves + j + 1, versions)


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_concurrent_alias_moves_lose_no_history_entry(tmp_path, kind):
    # read-modify-write of one alias file: two movers read the same history, the later rename drops the
    # other's entry. Every mover's entry must land, and the alias must be the last history entry
    import multiprocessing as mp

    from raysys.registry.aliases import AliasStore

    workers, moves = 4, 12  # 48 distinct versions <= MAX_ALIAS_HISTORY, so nothing is trimmed
    versions = list(range(1, workers * moves + 1))
    root = str(tmp_path / "reg")
    if kind == "threads":
        start = threading.Barrier(workers)
        runners = [threading.Thread(target=_move_many, args=(root, w, moves, versions, start)) for w in range(workers)]
    else:
        ctx = mp.get_context("spawn")
        start = ctx.Barrier(workers)
        runners = [ctx.Process(target=_move_many, args=(root, w, moves, versions, start)) for w in range(workers)]
    for r in runners:
        r.start()
    for r in runners:
        r.join(timeout=300)
    if kind == "processes":
        assert [r.exitcode for r in runners] == [0] * workers
    store = AliasStore(RegistryFiles(root))
    history = store.history(NAME, "production")
    assert sorted(history) == versions  # exactly N*M entries, none lost, none doubled
    for w in range(workers):  # each mover's own moves landed in its order
        mine = [v for v in history if (v - 1) // moves == w]
        assert mine == sorted(mine)
    assert store.get(NAME, "production") == history[-1]
    assert store.all(NAME) == {"production": history[-1]}


def test_alias_file_of_an_older_registry_is_read_and_moved_on(tmp_path):
    from raysys.registry.aliases import AliasStore

    adir = tmp_path / "reg" / NAME / "aliases"
    adir.mkdir(parents=True)
    (adir / "production.json").write_text(json.dumps({"version": 2, "previous": 1, "history": [1, 2]}))
    store = AliasStore(RegistryFiles(str(tmp_path / "reg")))
    assert store.get(NAME, "production") == 2 and store.all(NAME) == {"production": 2}
    store.move(NAME, "production", 3, [1, 2, 3])
    assert store.history(NAME, "production") == [1, 2, 3] and store.all(NAME) == {"production": 3}
    store.delete(NAME, "production")
    assert store.all(NAME) == {} and store.get(NAME, "production") is None


def test_model_card_stored_verified_and_rendered(tmp_path, task_bits):
    from raysys.registry.modelcard import build_model_card, render_markdown

    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "reg")
    metrics = {"accuracy": 0.9, "macro_f1": 0.88, "num_parameters": 100, "num_samples": 50,
               "per_class": {"precision": [0.9, 0.8, 1.0], "recall": [1.0, 0.7, 0.9], "f1": [0.95, 0.75, 0.95],
                             "support": [20, 20, 10]},
               "confusion_matrix": [[20, 0, 0], [5, 14, 1], [0, 1, 9]],
               "calibration": {"ece": 0.08, "mce": 0.2, "bins": [{"lower": 0.5, "upper": 1.0, "count": 50,
                                                                    "confidence": 0.8, "accuracy": 0.9}]},
               "slices": {"slices": [{"feature": "c0", "kind": "categorical", "slice": "c0 = a", "num_rows": 40,
                                      "accuracy": 0.7, "macro_f1": 0.6, "worst": True}],
                          "worst": {"slice": "c0 = a", "accuracy": 0.7, "num_rows": 40}}}
    card = build_model_card(name=NAME, kind="student", schema=schema, data_fingerprint="f" * 64, metrics=metrics,
                            teacher_metrics={"accuracy": 0.92, "num_parameters": 5000},
                            distillation={"sweep_id": "distill-x", "selection_rule": "smallest within 0.01"},
                            lineage={"parent_teacher": "t:v1", "sweep_id": "distill-x"})
    assert card["metrics"]["compared_to_teacher"]["retention"] == pytest.approx(0.9 / 0.92, abs=1e-4)
    assert card["metrics"]["compared_to_teacher"]["param_ratio"] == pytest.approx(0.02)
    assert any("c0 = a" in x for x in card["limitations"]) and any("ECE" in x for x in card["limitations"])
    spec, model = _model(schema, 0)
    v = reg.register(NAME, state_dict=model.state_dict(), model_spec=spec, schema=schema, preprocessor=pre,
                     metrics=metrics, config={}, lineage={"parent_teacher": "t:v1"}, model_card=card)
    version, stored, md = reg.model_card(NAME, v)
    assert version == v and stored["lineage"]["parent_teacher"] == "t:v1"
    assert stored["lineage"]["code_version"] and stored["lineage"]["created_at"]
    assert stored["data"]["fingerprint"] == "f" * 64 and stored["data"]["schema"]["label"] == schema.label
    for section in ("## Intended use", "## Metrics (test split)", "## Slices", "WORST", "## Limitations",
                    "## Data", "## Distillation", "## Lineage", "retention"):
        assert section in md, section
    assert sorted(md.splitlines()) == sorted(render_markdown(stored).splitlines())
    assert reg.load(NAME, v).model_card == stored
    # the card is in the manifest: tampering with it is caught like tampering with the weights
    path = tmp_path / "reg" / NAME / "versions" / str(v) / "model_card.md"
    path.write_text(md.replace("student", "STUDENT"))
    with pytest.raises(ValueError, match="model_card.md does not match its sha256"):
        reg.model_card(NAME, v)


def test_quantized_variant_stores_float_weights_and_requantizes(tmp_path, task_bits):
    from raysys.models.quantize import DYNAMIC_INT8, quantize_dynamic_int8

    schema, pre, x_num, x_cat = task_bits
    reg = Registry(tmp_path / "reg")
    spec, model = _model(schema, 3)
    v = reg.register(NAME, state_dict=model.state_dict(), model_spec={**spec, "quantization": DYNAMIC_INT8},
                     schema=schema, preprocessor=pre, metrics={}, config={}, lineage={})
    files = json.loads((tmp_path / "reg" / NAME / "versions" / str(v) / "manifest.json").read_text())["files"]
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".pt", ".pkl", ".bin"))]
    loaded = reg.load(NAME, v)
    assert loaded.quantization == DYNAMIC_INT8 and loaded.model_spec["quantization"] == DYNAMIC_INT8
    xn, xc = torch.from_numpy(x_num), torch.from_numpy(x_cat)
    with torch.no_grad():
        assert torch.equal(loaded.model(xn, xc), quantize_dynamic_int8(model)(xn, xc))
    with pytest.raises(ValueError, match="quantization"):
        reg.register(NAME, state_dict=model.state_dict(), model_spec={**spec, "quantization": "int3"},
                     schema=schema, preprocessor=pre, metrics={}, config={}, lineage={})


def test_registry_cli_list_show_promote_rollback(tmp_path, task_bits, monkeypatch):
    from typer.testing import CliRunner

    from raysys import cli
    from raysys.cli import app
    from raysys.registry.modelcard import build_model_card

    schema, pre, *_ = task_bits
    reg = Registry(tmp_path / "registry")
    name = "raysys-student"  # the config's default model_name
    for seed in range(2):
        spec, model = _model(schema, seed)
        card = build_model_card(name=name, kind="student", schema=schema, data_fingerprint="abc",
                                metrics={"accuracy": 0.5 + seed / 10, "num_parameters": 7, "num_samples": 10})
        reg.register(name, state_dict=model.state_dict(), model_spec=spec, schema=schema, preprocessor=pre,
                     metrics={}, config={}, lineage={"sweep_id": f"s{seed}"}, model_card=card)
    runner = CliRunner()
    monkeypatch.setattr(cli.console, "width", 200)  # the table would be cut to the runner's 80 columns
    root = ["--root", str(tmp_path)]
    r = runner.invoke(app, ["registry", "promote", "1", *root])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["registry", "promote", "2", *root])
    assert r.exit_code == 0 and "production -> v2" in r.output
    r = runner.invoke(app, ["registry", "list", *root])
    assert r.exit_code == 0 and "0.6000" in r.output and "production" in r.output
    r = runner.invoke(app, ["registry", "show", "production", *root])
    assert r.exit_code == 0, r.output
    assert "v2" in r.output and "Model card" in r.output and "Intended use" in r.output
    r = runner.invoke(app, ["registry", "show", "production", "--json", *root])
    assert r.exit_code == 0 and json.loads(r.output)["version"] == 2
    r = runner.invoke(app, ["registry", "rollback", *root])
    assert r.exit_code == 0 and "v2 -> v1" in r.output
    assert reg.get_alias(name, "production") == 1
    r = runner.invoke(app, ["registry", "rollback", *root])
    assert r.exit_code == 2 and "no earlier version" in r.output
    r = runner.invoke(app, ["registry", "show", "nope", *root])
    assert r.exit_code == 2


def test_exclusive_create_on_a_non_local_filesystem(tmp_path):
    # object stores take the check-then-write path (pyarrow.fs has no conditional put): a taken name is refused
    import pyarrow.fs as pafs

    from raysys.registry.aliases import AliasStore

    files = RegistryFiles(str(tmp_path / "reg"))
    files.fs = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())  # type_name "subtree", not "local"
    assert files.fs.type_name != "local"
    files.fs.create_dir(files.path("x"), recursive=True)
    assert files.create_exclusive(files.path("x", "a.json"), b"1")
    assert not files.create_exclusive(files.path("x", "a.json"), b"2")
    assert files.read(files.path("x", "a.json")) == b"1"
    store = AliasStore(files)
    for v in (1, 2, 3):
        store.move(NAME, "production", v, [1, 2, 3])
    assert store.history(NAME, "production") == [1, 2, 3] and store.roll_back(NAME, "production", [1, 2, 3]) == 2
