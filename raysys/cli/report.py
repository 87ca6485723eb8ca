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
                                     "RUN_DIR/monitor/traffic).")] = None,
           mlflow: Annotated[bool, typer.Option(
               "--mlflow", help="Also copy the run into MLflow (needs raysys[mlflow]); default store "
                                "sqlite:///RUN_DIR/mlflow.db.")] = False,
           mlflow_uri: Annotated[str | None, typer.Option(
               "--mlflow-uri", help="MLflow tracking URI (implies --mlflow).")] = None,
           experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "raysys"):
    """Write one HTML file (no JavaScript, nothing fetched) with the data quality, training curves, the sweep,
    evaluation, per-slice metrics, the model card and the monitor's drift/latency/accuracy over time.
    A stage the run did not reach is shown as "not available"."""
    from raysys.report import write_report

    if not run_dir.is_dir():
        raise fail(f"RUN_DIR: {run_dir} is not a directory")
    path = write_report(run_dir, out, registry=registry, snapshot_uri=snapshot_uri, traffic_uri=traffic_uri)
    console.print(f"report: {path}", highlight=False)
    if mlflow or mlflow_uri:
        from raysys.tracking import log_run

        try:
            got = log_run(run_dir, mlflow_uri, experiment=experiment, report=path, registry=registry)
        except ValueError as e:
            raise fail(str(e)) from None
        console.print(f"mlflow: {got['uri']} experiment {experiment!r}, run {got['run_id']}, "
                      f"aliases {got['aliases']}", highlight=False)


def write_run_report(cfg: PipelineConfig) -> Path | None:
    """Write `<root>/report.html` for the run `cfg` describes and print its path (see
    `raysys.report.write_run_report`: never raises)."""
    from raysys.report import write_run_report as write

    path = write(cfg.registry_uri)
    if path is not None:
        console.print(f"report: {path}", highlight=False)
    if cfg.tracking.enabled:
        _track(cfg, path)
    return path


def _track(cfg: PipelineConfig, report: Path | None) -> None:
    """`tracking.mlflow`: copy the finished run into MLflow; a failure is reported, not raised (the run and
    its registry entries are done, and `raysys report RUN_DIR --mlflow` can log it again)."""
    from raysys.report import run_root
    from raysys.tracking import log_run

    root = run_root(cfg.registry_uri)
    if root is None:
        console.print("[yellow]mlflow: the registry is remote; log a local copy with `raysys report --mlflow`[/]")
        return
    try:
        got = log_run(root, cfg.tracking.mlflow_uri, experiment=cfg.tracking.experiment, report=report,
                      registry=cfg.registry_uri)
    except Exception as e:  # noqa: BLE001
        console.print(f"[yellow]mlflow: not logged: {e}[/]", highlight=False)
        return
    console.print(f"mlflow: {got['uri']} run {got['run_id']} (aliases {got['aliases']})", highlight=False)
