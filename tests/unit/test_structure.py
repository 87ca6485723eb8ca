"""The house stays easy to see (tier 1, no Ray): short files, short functions, no import circle, and every
import arrow pointing down the layers that docs/ARCHITECTURE.md draws.

The import graph is read from the source (`ast`), lazy imports inside functions included: a lazy import
hides a circle from the interpreter at import time, not from a reader. Run it alone with
`.venv/bin/pytest -q tests/unit/test_structure.py`; a failure names the file, function or the modules of the
circle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import REPO

ROOT = REPO
PACKAGES = ("raysys", "serve")
CHECKED_DIRS = ("raysys", "serve", "jobs")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

# Who may import whom (first match wins; a module prefix names a module and its submodules). Third-party
# imports are not restricted here except Ray where the layer must not touch it (RAY_FREE).
CORE = ("raysys.config", "raysys.data", "raysys.models", "raysys.parallel", "raysys.evaluate", "raysys.registry",
        "raysys.statefile", "raysys.sigint", "raysys.trust")
ENGINES = ("raysys.train", "raysys.distill", "raysys.monitor")
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("raysys.sigint", ()),
    ("raysys.statefile", ()),
    ("raysys.config", ("raysys.config",)),
    ("raysys.data", ("raysys.config", "raysys.data")),
    ("raysys.models", ("raysys.config", "raysys.data.schema", "raysys.models")),
    ("raysys.parallel", ("raysys.parallel",)),
    ("raysys.evaluate", ("raysys.config", "raysys.models")),
    ("raysys.registry", ("raysys.data", "raysys.models", "raysys.registry")),
    ("raysys.trust", ("raysys.config", "raysys.models", "raysys.trust")),
    # raysys.trust.dp: DP-SGD's per-row clipping and accounting, for the teacher loop and the student trials
    ("raysys.train", ("raysys.config", "raysys.data", "raysys.models", "raysys.parallel", "raysys.sigint",
                      "raysys.statefile", "raysys.trust.dp", "raysys.train")),
    ("raysys.distill", ("raysys.config", "raysys.data", "raysys.models", "raysys.evaluate", "raysys.sigint",
                        "raysys.statefile", "raysys.trust.dp", "raysys.distill")),
    ("raysys.monitor", ("raysys.config", "raysys.data", "raysys.monitor")),
    ("serve", ("raysys.config", "raysys.data", "raysys.models", "raysys.registry", "raysys.monitor", "serve")),
    # the HTML report reads files only: core, never Ray (the monitor's own modules would load Ray on import)
    ("raysys.report", CORE + ("raysys.report",)),
    ("raysys.tracking", CORE + ("raysys.report", "raysys.tracking")),
    ("raysys.workflow", CORE + ENGINES + ("serve",)),
    ("raysys.jobs", CORE + ENGINES + ("serve", "raysys.workflow", "raysys.report", "raysys.tracking", "raysys.jobs")),
    ("raysys.cli", CORE + ENGINES + ("serve", "raysys.workflow", "raysys.report", "raysys.tracking", "raysys.cli")),
]
# the layers that must not import Ray at all
RAY_FREE = ("raysys.config", "raysys.data", "raysys.models", "raysys.parallel", "raysys.evaluate",
            "raysys.registry", "raysys.statefile", "raysys.report", "raysys.tracking", "raysys.trust")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _imported_names(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative import: resolve against the importing module's package
        parts = module.split(".")
        if MODULES[module].name != "__init__.py":
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _own_module(name: str) -> str | None:
    """The project module an imported name lives in (None for third-party)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _all_imports(module: str) -> list[str]:
    """Every dotted name `module` imports anywhere in its source (top level and inside functions)."""
    tree = ast.parse(MODULES[module].read_text())
    return [n for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
            for n in _imported_names(module, node)]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        for name in _all_imports(module):
            target = _own_module(name)
            # a submodule importing its own package's __init__ is how packages re-export: not an arrow
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; the components with more than one module are the circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in sorted(MODULES):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def _python_files() -> list[Path]:
    return sorted(p for d in CHECKED_DIRS for p in (ROOT / d).rglob("*.py"))


def test_the_checks_see_the_project():
    """Guards the guards: a wrong root or glob would make every check below pass on nothing."""
    assert {"raysys.config", "raysys.registry", "serve.app"} <= set(MODULES)
    unplaced = sorted(m for m in MODULES if m not in ("raysys", "serve") and _layer(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/ARCHITECTURE.md): {unplaced}"
    assert len(_python_files()) > 40
    assert import_graph()["serve.app"], "serve.app imports nothing of the project?"


def test_the_circle_finder_finds_a_circle():
    graph = defaultdict(set, {"raysys.config": {"raysys.data"}, "raysys.data": {"raysys.config"}})
    assert strongly_connected(graph) == [["raysys.config", "raysys.data"]]


def test_no_file_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in _python_files()
            if (n := p.read_text().count("\n")) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by concern): {long}"


def test_no_function_is_too_long():
    long = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split into named steps): {long}"


def test_no_import_circle():
    circles = strongly_connected(import_graph())
    assert not circles, f"import circles (lazy imports count): {circles}"


def _layer(module: str) -> tuple[str, tuple[str, ...]] | None:
    for prefix, allowed in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, allowed
    return None


def test_every_arrow_points_down_the_layers():
    wrong = []
    for module, targets in import_graph().items():
        layer = _layer(module)
        if layer is None:
            continue
        prefix, allowed = layer
        for target in targets:
            if not any(target == a or target.startswith(a + ".") for a in allowed + (prefix,)):
                wrong.append(f"{module} -> {target}")
    assert not wrong, f"imports against docs/ARCHITECTURE.md's layers: {sorted(wrong)}"


def test_ray_free_layers_do_not_import_ray():
    wrong = [f"{m} -> {n}" for m in MODULES if any(m == p or m.startswith(p + ".") for p in RAY_FREE)
             for n in _all_imports(m) if n == "ray" or n.startswith("ray.")]
    assert not wrong, f"these layers must stay Ray-free: {wrong}"


@pytest.mark.parametrize("module, must_not_load", [
    # every Serve replica loads models through the registry: it must not drag in the sweep stack
    ("raysys.registry", ("ray.tune", "raysys.distill", "raysys.train")),
    ("raysys.models", ("ray", "raysys.parallel")),
    ("raysys.report", ("ray", "torch", "raysys.monitor", "raysys.train", "raysys.distill")),
    # start-up of every process that runs them (~1 s each): scipy.signal is for the monitor actor's detector
    # alone; torch's ZeroRedundancyOptimizer (which pulls in FSDP and DTensor) for zero1 whole_params alone
    ("serve.endpoint", ("scipy.signal", "torch.distributed.optim", "raysys.train", "raysys.distill")),
    ("raysys.train.loop", ("scipy.signal", "torch.distributed.optim", "torch.distributed.fsdp", "ray.data")),
])
def test_importing_a_layer_does_not_load_the_layers_above(module, must_not_load):
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    bad = sorted(m for m in loaded for p in must_not_load if m == p or m.startswith(p + "."))
    assert not bad, f"import {module} loads {bad}"


def test_test_file_names_are_unique_across_tiers():
    # tests/ has no __init__.py: pytest imports each test file by its basename, so a unit and an integration
    # test of one name make collection fail ("import file mismatch") on a fresh clone
    names = defaultdict(list)
    for f in (REPO / "tests").rglob("test_*.py"):
        names[f.name].append(str(f.relative_to(REPO)))
    assert not {n: p for n, p in names.items() if len(p) > 1}
