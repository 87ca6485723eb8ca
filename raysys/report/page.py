"""The HTML page: one file, inline CSS and SVG, no JavaScript, no external resource, no timestamp of its own
(the same run renders to the same bytes)."""

from __future__ import annotations

from pathlib import Path

from raysys.report import card, evaluation, monitoring, quality, sweep, training
from raysys.report.load import RunData, load_run
from raysys.report.parts import Section, esc, note

SECTIONS = (quality.section, training.section, sweep.section, evaluation.section, evaluation.slices_section,
            card.section, monitoring.section)
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1300px;padding:0 1.5em 3em;
color:#1b1b1b;background:#fff}
h1{margin:.8em 0 .2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav ol{columns:2;font-size:.95em}
figure{margin:1em 0;padding:.5em;border:1px solid #e4e4e4;border-radius:4px;display:inline-block;max-width:100%}
figure svg{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555;margin-top:.3em}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em;display:block;overflow-x:auto;max-width:100%}caption{text-align:left;font-weight:600;padding:.2em 0}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}th{background:#f4f4f4}
tr.mark td{background:#fff3cd}.missing{color:#8a6d3b;background:#fcf8e3;padding:.5em .8em;border-radius:4px}
.note{color:#444;font-size:.9em}.card{border-left:4px solid #ddd;padding-left:1em;overflow-wrap:anywhere}
pre{background:#f7f7f7;padding:.5em;overflow:auto;font-size:.8em;white-space:pre-wrap;word-break:break-all}
"""


def _section_html(sec: Section) -> str:
    parts = [f'<section id="{esc(sec.key)}"><h2>{esc(sec.title)}</h2>']
    if sec.missing:
        parts.append(f'<p class="missing">{esc(sec.missing)}</p>')
    for plot in sec.plots:
        cap = f"{esc(plot.title)}. {esc(plot.caption)}" if plot.caption else esc(plot.title)
        parts.append(f'<figure id="plot-{esc(plot.key)}" class="plot">{plot.svg}<figcaption>{cap}</figcaption></figure>')
    parts.extend(sec.blocks)
    parts.append("</section>")
    return "\n".join(parts)


def _header(data: RunData, sections: list[Section]) -> str:
    s = data.student
    facts = [f"run directory <code>{esc(data.root)}</code>"]
    if s is not None:
        facts.append(f"production student <b>{esc(s.ref)}</b> (test accuracy {s.test.get('accuracy', 0):.4f})")
    if data.teachers:
        facts.append(f"teacher {esc(data.teachers[-1].ref)}")
    toc = "".join(f'<li><a href="#{esc(x.key)}">{esc(x.title)}</a>{" (not available)" if x.missing else ""}</li>'
                  for x in sections)
    return f"<h1>raysys run report</h1><p>{' &middot; '.join(facts)}</p><nav><ol>{toc}</ol></nav>"


def render(data: RunData) -> str:
    """The report of `data` as one HTML document (a str)."""
    sections = [fn(data) for fn in SECTIONS]
    problems = note("files that could not be read: " + "; ".join(data.problems)) if data.problems else ""
    body = "\n".join([_header(data, sections), problems, *(_section_html(s) for s in sections)])
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>raysys report: {esc(data.model_name or data.root)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_report(root: str | Path, out: str | Path | None = None, **where) -> Path:
    """Render the run directory `root` to `out` (default `<root>/report.html`); returns the path.
    `where`: `registry`, `snapshot_uri`, `traffic_uri` overrides (see `load_run`)."""
    data = load_run(root, **where)
    path = Path(out) if out is not None else Path(data.root) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(data), encoding="utf-8")
    return path


def run_root(registry_uri: str) -> Path | None:
    """The run directory of a run whose registry is `registry_uri` (its parent), None for a remote registry."""
    return None if "://" in registry_uri else Path(registry_uri).parent


def write_run_report(registry_uri: str) -> Path | None:
    """The report of the run around `registry_uri`, at `<root>/report.html`; None, with a warning, when it
    cannot be written (a remote registry, or any error: a report must never fail the run it describes)."""
    import logging

    log = logging.getLogger("raysys")
    root = run_root(registry_uri)
    if root is None:
        log.warning("report: the registry is remote (%s); run `raysys report` against a local copy", registry_uri)
        return None
    try:
        return write_report(root, registry=registry_uri)
    except Exception as e:  # noqa: BLE001 (reported, not raised: the run itself succeeded)
        log.warning("report: could not be written: %s", e)
        return None
