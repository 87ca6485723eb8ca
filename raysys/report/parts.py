"""The pieces a report section is made of: plots (inline SVG), tables and notes, HTML-escaped here once."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

NOT_AVAILABLE = "not available"


@dataclass
class Plot:
    key: str  # stable id (the `id` of its <figure>, used by tests and benchmarks/report_check.py)
    title: str
    svg: str
    caption: str = ""


@dataclass
class Section:
    key: str
    title: str
    plots: list[Plot] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # HTML (tables, notes), already escaped
    missing: str | None = None  # set: the stage did not run / left nothing; the section says so

    @classmethod
    def unavailable(cls, key: str, title: str, why: str) -> Section:
        return cls(key, title, missing=f"{NOT_AVAILABLE}: {why}")


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers rounded for people (the same value always prints the same)."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else ("yes" if v else "no")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{round(v, digits)}"
    if isinstance(v, list | tuple):
        return "x".join(fmt(x, digits) for x in v)
    return str(v)


def table(headers: list[str], rows: list[list[Any]], *, caption: str = "", mark: set[int] | None = None) -> str:
    """An HTML table; rows whose index is in `mark` are highlighted."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="mark"' if mark and i in mark else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def key_values(d: dict[str, Any], *, caption: str = "") -> str:
    return table(["figure", "value"], [[k, v] for k, v in d.items()], caption=caption)
