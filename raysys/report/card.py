"""The production student's model card (the registry's `model_card.md`), as HTML: headings, paragraphs,
lists and pipe tables; everything escaped, nothing linked."""

from __future__ import annotations

import re

from raysys.report.load import RunData
from raysys.report.parts import Section, esc

TITLE = "Model card"
_INLINE_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline(text: str) -> str:
    out = esc(text)
    out = _INLINE_CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<b>\1</b>", out)


def _table(lines: list[str]) -> str:
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    rows = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r if c)]
    if not rows:
        return ""
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(md: str) -> str:
    """The small Markdown subset the model card uses (headings, paragraphs, lists, pipe tables, fenced code)."""
    out, para, lines = [], [], md.splitlines()
    i = 0

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        ln = lines[i]
        if ln.lstrip().startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            out.append(f"<pre>{esc(chr(10).join(lines[i + 1:j]))}</pre>")
            i = j + 1
            continue
        if ln.lstrip().startswith("|"):
            flush()
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
            continue
        if m := re.match(r"^(#{1,6})\s+(.*)$", ln):
            flush()
            level = min(len(m.group(1)) + 2, 6)  # the card's "#" sits under the report's own headings
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif m := re.match(r"^\s*[-*]\s+(.*)$", ln):
            flush()
            out.append(f"<ul><li>{_inline(m.group(1))}</li></ul>")
        elif not ln.strip():
            flush()
        else:
            para.append(ln.strip())
        i += 1
    flush()
    return "\n".join(out).replace("</ul>\n<ul>", "\n")


def section(data: RunData) -> Section:
    s = data.student
    if s is None or not s.card_md:
        return Section.unavailable("model-card", TITLE, "no registered student with a model card")
    return Section("model-card", f"{TITLE}: {s.ref}", blocks=[f'<div class="card">{markdown_to_html(s.card_md)}</div>'])
