"""The data-quality summary (the data check's JSON, when the run has one): its headline figures and findings
as tables; any shape of JSON renders, the report does not depend on the check's exact fields."""

from __future__ import annotations

from typing import Any

from raysys.report.load import RunData
from raysys.report.parts import Section, esc, fmt, note, table

TITLE = "Data quality"
MAX_ROWS = 50


def _scalars(d: dict[str, Any]) -> list[list[Any]]:
    return [[k, v] for k, v in d.items() if v is None or isinstance(v, str | int | float | bool)]


def _block(name: str, value: Any) -> str | None:
    if isinstance(value, dict):
        rows = _scalars(value)
        nested = {k: v for k, v in value.items() if isinstance(v, dict | list)}
        parts = [table(["figure", "value"], rows, caption=name)] if rows else []
        parts += [f"<details><summary>{esc(name)}.{esc(k)}</summary><pre>{esc(_short(v))}</pre></details>"
                  for k, v in nested.items()]
        return "".join(parts) or None
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        cols = sorted({k for r in value for k in r if not isinstance(r[k], dict | list)})
        return table(cols, [[r.get(c) for c in cols] for r in value[:MAX_ROWS]],
                     caption=f"{name} ({len(value)}{', first ' + str(MAX_ROWS) if len(value) > MAX_ROWS else ''})")
    if isinstance(value, list):
        return f"<p><b>{esc(name)}</b>: {esc(', '.join(fmt(v) for v in value[:MAX_ROWS]))}</p>"
    return None


def _short(v: Any) -> str:
    import json

    text = json.dumps(v, indent=1, sort_keys=True, default=str)
    return text if len(text) < 4000 else text[:4000] + "\n..."


def section(data: RunData) -> Section:
    q = data.data_quality
    if not q:
        return Section.unavailable("data-quality", TITLE, "the run directory holds no data-quality result "
                                   "(the data check did not run)")
    sec = Section("data-quality", TITLE, blocks=[note(f"from {data.data_quality_path}")])
    head = _scalars(q)
    if head:
        sec.blocks.append(table(["figure", "value"], head, caption="summary"))
    for k, v in q.items():
        block = _block(k, v)
        if block:
            sec.blocks.append(block)
    return sec
