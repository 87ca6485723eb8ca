"""The benchmark scripts still import: they run by hand (never in CI), so a refactor of a module they use
can break one silently (benchmarks/sweep.py imported a function benchmarks/distill.py no longer had)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from helpers import REPO

BENCH = REPO / "benchmarks"
# the user-facing scripts; the `_` helpers are imported by them (`_plain_fastapi` is a uvicorn app that
# loads a registered model from its environment at import, `_evidently_peer` runs in its own environment)
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


def test_every_benchmark_script_is_listed():
    assert {"distill", "sweep", "train_scaling", "serve_load", "drift"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports_and_has_a_main(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_import_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    assert callable(getattr(mod, "main", None)), f"benchmarks/{name}.py has no main()"
