"""The raysys_* metrics as the code defines them, and the PromQL of deploy/prometheus's rules and
deploy/grafana's dashboard: parsed once for the static checks (tests/unit/test_deploy.py) and the live scrape
(tests/integration/test_soak_ray.py)."""

from __future__ import annotations

import ast
import json
import re

import yaml

from helpers import REPO

PROM = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana" / "raysys.json"


def _names_in(node: ast.AST) -> dict[str, tuple]:
    """Tuple-of-strings assignments in a function or module body (`feat, ver = ("feature",), (...)`)."""
    out: dict[str, tuple] = {}
    for n in ast.walk(node):
        if isinstance(n, ast.Assign) and len(n.targets) == 1:
            t, v = n.targets[0], n.value
            pairs = zip(t.elts, v.elts) if isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple) else [(t, v)]
            for tn, vn in pairs:
                if isinstance(tn, ast.Name) and isinstance(vn, ast.Tuple):
                    try:
                        out[tn.id] = tuple(ast.literal_eval(vn))
                    except ValueError:
                        pass
    return out


def defined_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Every `Counter/Gauge/Histogram("raysys_...", tag_keys=...)` in raysys/ and serve/: name -> (kind, tags)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for path in sorted([*REPO.glob("raysys/**/*.py"), *REPO.glob("serve/**/*.py")]):
        tree = ast.parse(path.read_text())
        names = _names_in(tree)
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                    and call.func.id in ("Counter", "Gauge", "Histogram") and call.args
                    and isinstance(call.args[0], ast.Constant) and str(call.args[0].value).startswith("raysys_")):
                continue
            tags: tuple = ()
            for kw in call.keywords:
                if kw.arg == "tag_keys":
                    tags = names[kw.value.id] if isinstance(kw.value, ast.Name) else tuple(ast.literal_eval(kw.value))
            name = call.args[0].value
            assert name not in out or out[name] == (call.func.id, frozenset(tags)), f"{name} defined twice"
            out[name] = (call.func.id, frozenset(tags))
    return out


SERIES = re.compile(r"\bray_(raysys_[a-z0-9_]+)")
AGG_LABELS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _series(expr: str, metrics) -> list[tuple[str, frozenset[str]]]:
    """(defined metric, the labels its selector names) for each `ray_raysys_*` series in a PromQL expression;
    fails on a series raysys does not define."""
    out = []
    for m in SERIES.finditer(expr):
        name, labels = m.group(1), set()
        base = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in metrics:
                base = name.removesuffix(suffix)
                assert metrics[base][0] == "Histogram", name
                if suffix == "_bucket":
                    labels.add("le")
        assert base in metrics, f"{m.group(0)} in {expr!r}: raysys defines no metric {base}"
        rest = expr[m.end():]
        if rest.startswith("{"):
            labels |= {s.split("=")[0].strip().rstrip("!~") for s in rest[1:rest.index("}")].split(",") if s.strip()}
        out.append((base, frozenset(labels)))
    assert out, f"no raysys series in {expr!r}"
    return out


def _check_expr(expr: str, metrics, extra_labels=()) -> set[str]:
    """Every label the expression uses is a tag key of the metrics it reads; returns the metrics."""
    found = _series(expr, metrics)
    for base, labels in found:
        tags = metrics[base][1] | ({"le"} if metrics[base][0] == "Histogram" else set())
        assert labels <= tags, f"{base}: labels {sorted(labels - tags)} are not among its tag keys {sorted(tags)}"
    grouped = {lab.strip() for g in AGG_LABELS.findall(expr) for lab in g.split(",") if lab.strip()}
    for lab in grouped | set(extra_labels):
        owners = [b for b, _ in found if lab in metrics[b][1] or (lab == "le" and metrics[b][0] == "Histogram")]
        assert owners, f"label {lab!r} in {expr!r} belongs to none of {[b for b, _ in found]}"
    return {b for b, _ in found}


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "raysys-rules.yml").read_text())["groups"] for r in g["rules"]]


def panel_queries() -> list[tuple[str, set[str]]]:
    """(PromQL, the labels its legend names) of every Grafana panel target."""
    dash = json.loads(GRAFANA.read_text())
    return [(t["expr"], set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", ""))))
            for panel in dash["panels"] for t in panel["targets"]]


def used_labels(expr: str) -> dict[str, set[str]]:
    """Exported series name (`ray_raysys_...`, suffix kept) -> the labels the expression selects or groups
    by on it (a grouping label is charged to every series of the expression)."""
    grouped = {lab.strip() for g in AGG_LABELS.findall(expr) for lab in g.split(",") if lab.strip()}
    out: dict[str, set[str]] = {}
    for m in SERIES.finditer(expr):
        rest = expr[m.end():]
        labels = set(grouped)
        if rest.startswith("{"):
            labels |= {s.split("=")[0].strip().rstrip("!~") for s in rest[1:rest.index("}")].split(",") if s.strip()}
        out.setdefault(m.group(0), set()).update(labels)
    return out
