"""`raysys report RUN_DIR -o report.html`: the run as one self-contained HTML page (plots inline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from raysys.cli.common import console, fail
from raysys.config import PipelineConfig


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
    """Write `<root>/report.html` for the run `cfg` describes and print its path (see
    `raysys.report.write_run_report`: never raises)."""
    from raysys.report import write_run_report as write

    path = write(cfg.registry_uri)
    if path is not None:
        console.print(f"report: {path}", highlight=False)
    return path
