"""Reading a `raysys report` page back with the standard library's `html.parser`: its plots (each `<figure
id="plot-...">`, the SVG paths drawn in it and its text), its sections, and anything that would make a
browser load something (scripts, URLs, external references)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

URL = re.compile(r"(?i)\b(?:https?|ftp)://|//[a-z0-9.-]+\.[a-z]{2,}/")
# attributes through which a page loads or links something
REF_ATTRS = {"src", "href", "xlink:href", "srcset", "action", "data", "poster", "background"}


@dataclass
class PlotInfo:
    key: str
    paths: int = 0  # <path> elements with a non-empty `d`
    texts: list[str] = field(default_factory=list)
    svgs: int = 0


@dataclass
class Page:
    plots: dict[str, PlotInfo] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)  # id -> text of the section
    tags: set[str] = field(default_factory=set)
    external: list[str] = field(default_factory=list)  # attribute values that point outside the page
    text: str = ""


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._plot: PlotInfo | None = None
        self._depth = 0  # nesting of <figure> elements since the plot's own
        self._section: str | None = None
        self._chunks: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.page.tags.add(tag)
        a = dict(attrs)
        for k, v in attrs:
            if v and (k in REF_ATTRS or k.startswith("on")) and not (k in ("href", "xlink:href") and v.startswith("#")):
                self.page.external.append(f"{tag}[{k}]={v[:80]}")
            if k == "style" and v and "url(" in v and "url(#" not in v:
                self.page.external.append(f"{tag}[style]={v[:80]}")
        if tag == "section":
            self._section = a.get("id")
            self.page.sections[self._section] = ""
        if tag == "figure" and (a.get("id") or "").startswith("plot-"):
            self._plot = self.page.plots.setdefault(a["id"][5:], PlotInfo(a["id"][5:]))
            self._depth = 0
        elif tag == "figure" and self._plot is not None:
            self._depth += 1
        if self._plot is not None:
            if tag == "svg":
                self._plot.svgs += 1
            if tag == "path" and (a.get("d") or "").strip():
                self._plot.paths += 1

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "figure" and self._plot is not None:
            if self._depth == 0:
                self._plot = None
            else:
                self._depth -= 1
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        self._chunks.append(data)
        if self._plot is not None and data.strip():
            self._plot.texts.append(data.strip())
        if self._section is not None:
            self.page.sections[self._section] += data


def parse_report(html_text: str) -> Page:
    p = _Parser()
    p.feed(html_text)
    p.close()
    p.page.text = "".join(p._chunks)
    return p.page


def offline_problems(html_text: str, page: Page) -> list[str]:
    """Everything that would make a browser run code or fetch: scripts, URLs, external references."""
    problems = [f"<{t}>" for t in ("script", "iframe", "object", "embed", "link", "img", "base") if t in page.tags]
    problems += [f"URL {m.group(0)!r}" for m in URL.finditer(html_text)]
    problems += page.external
    if re.search(r"(?i)@import|javascript:", html_text):
        problems.append("@import or javascript:")
    return problems
