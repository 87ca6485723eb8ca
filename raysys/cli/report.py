"""`raysys report RUN_DIR -o report.html`: the run as one self-contained HTML page (plots inline)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from raysys.cli.common import console, fail
from raysys.config import PipelineConfig

log = logging.getLogger("raysys")


def report(run_dir: Annotated[Path, typer.Argument(help="The run's --root (holds registry/ and runs/).")],
           out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default RUN_DIR/report.html).")]
           = None,
           registry: Annotated[Path | None, typer.Option(help="Registry dir (default RUN_DIR/registry).")] = None,
           snapshot_uri: Annotated[str | None, typer.Option(
               "--snapshot-uri", help="Monitor snapshots (default: the model's monitor.snapshot_uri, else "
                                      "RUN_DIR/monitor/snapshots).")] = None,
           traffic_uri: Annotated[str | None, typer.Option(
               "--traffic-uri", help="Monitor's stored traffic (default: monitor.traffic_uri, else "
                                     "RUN_DIR/monitor/traffic).")] = None):
    """Write one HTML file (no JavaScript, nothing fetched) with the data quality, training curves, the sweep,
    evaluation, per-slice metrics, the model card and the monitor's drift/latency/accuracy over time.
    A stage the run did not reach is shown as "not available"."""
    from raysys.report import write_report

    if not run_dir.is_dir():
        raise fail(f"RUN_DIR: {run_dir} is not a directory")
    path = write_report(run_dir, out, registry=registry, snapshot_uri=snapshot_uri, traffic_uri=traffic_uri)
    console.print(f"report: {path}", highlight=False)


def write_run_report(cfg: PipelineConfig) -> Path | None:
    """The report of the run `cfg` describes, at `<root>/report.html` (root: the registry's parent); None,
    with a warning, when it cannot be written (a report must never fail the run it describes)."""
    from raysys.report import write_report

    if "://" in cfg.registry_uri:
        log.warning("report: the registry is remote (%s); run `raysys report` against a local copy",
                    cfg.registry_uri)
        return None
    root = Path(cfg.registry_uri).parent
    try:
        path = write_report(root, registry=cfg.registry_uri)
    except Exception as e:  # noqa: BLE001 (reported, not raised: the run itself succeeded)
        log.warning("report: could not be written: %s", e)
        return None
    console.print(f"report: {path}", highlight=False)
    return path
