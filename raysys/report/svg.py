"""matplotlib figures as deterministic inline SVG (no Ray, no network, no JavaScript).

The same figure drawn twice gives the same bytes: the Agg backend (no display), `svg.hashsalt` fixed (the
ids matplotlib gives clip paths and glyphs), no `Date` metadata, and the XML prologue dropped so the SVG can sit inside HTML. Text stays `<text>`
(`svg.fonttype: none`): smaller, selectable, and the tests can read the axis labels.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import matplotlib

matplotlib.use("Agg", force=True)

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

RC: dict[str, Any] = {
    "svg.hashsalt": "raysys-report",
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 72,
    "savefig.bbox": "tight",
    "axes.prop_cycle": matplotlib.cycler(color=["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]),
}
# what an SVG file carries that inline SVG in HTML does not need (the HTML parser knows the SVG and xlink
# namespaces): the XML declaration, the doctype, the RDF metadata and the namespace declarations; all of them
# name http:// URIs, and the page is to name none
_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.S)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_XMLNS = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')


@contextmanager
def figure(ncols: int = 1, *, width: float = 4.2, height: float = 3.0, nrows: int = 1) -> Iterator[tuple]:
    """`(fig, axes)` under the report's fixed style; the figure is closed afterwards."""
    with plt.rc_context(RC):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
        try:
            yield fig, axes.ravel().tolist()
        finally:
            plt.close(fig)


def to_svg(fig) -> str:
    """The figure as an `<svg>` element string, byte-identical for the same drawing."""
    buf = io.StringIO()
    with plt.rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = _METADATA.sub("", _PROLOGUE.sub("", buf.getvalue(), count=1), count=1)
    return _XMLNS.sub("", svg).strip()


def distinct_styles(n: int) -> list[dict[str, Any]]:
    """`n` line styles no two alike (ten colours, then the same colours dashed, then dotted)."""
    colors = RC["axes.prop_cycle"].by_key()["color"]
    dashes = ("-", "--", ":", "-.")
    return [{"color": colors[i % len(colors)], "linestyle": dashes[(i // len(colors)) % len(dashes)]}
            for i in range(n)]
