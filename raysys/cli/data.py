"""`raysys data ...`: generate the synthetic dataset, import your own, check its quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from raysys.cli.common import ConfigFile, Preset, Root, console, fail, guard, pipeline_config

data_app = typer.Typer(no_args_is_help=True, help="Generate or import datasets.")


@data_app.command("generate")
def data_generate(preset: Preset = "demo", config: ConfigFile = None, root: Root = None,
                  force: Annotated[bool, typer.Option(help="Regenerate even if the data exists.")] = False):
    """Generate the synthetic dataset (Parquet shards + schema.json)."""
    import shutil

    from raysys.data import ensure_dataset, fingerprint

    cfg = pipeline_config(preset, config, root)
    if force and Path(cfg.data.root).exists():
        shutil.rmtree(cfg.data.root)
    schema = guard(ensure_dataset, cfg.data)
    console.print(f"dataset at {cfg.data.root}: {len(schema.features)} features, classes {schema.classes}, "
                  f"fingerprint {fingerprint(cfg.data.root)[:12]}")


@data_app.command("import")
def data_import(
    source: Annotated[Path, typer.Argument(help="A Parquet file or directory of Parquet files.")],
    label: Annotated[str, typer.Option(help="Name of the label column.")],
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")],
    val_fraction: Annotated[float, typer.Option(help="Share of rows for validation.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of rows for test.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    missing: Annotated[str, typer.Option(help="Nulls in a feature: 'impute' (train median / most frequent "
                                              "category, plus an is-missing indicator for numbers) or 'refuse'.")
                       ] = "impute",
):
    """Bring your own data: infer a schema, split into train/validation/test and write the raysys layout."""
    import warnings

    from raysys.data.byod import import_parquet

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schema = guard(import_parquet, source, out, label=label, val_fraction=val_fraction,
                       test_fraction=test_fraction, seed=seed, missing=missing)
    for w in caught:
        console.print(f"warning: {w.message}", style="yellow", highlight=False)
    console.print(f"imported {source} -> {out}: {len(schema.numeric)} numeric, {len(schema.categorical)} "
                  f"categorical features, classes {schema.classes}"
                  + (f"; nullable (imputed): {[f.name for f in schema.features if f.nullable]}"
                     if any(f.nullable for f in schema.features) else ""))
    console.print(f"train on it with: raysys run --config <file with data: {{root: {out}, source: parquet}}>")


@data_app.command("check")
def data_check(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory (schema.json + train/validation/test).")],
    preset: Preset = "demo", config: ConfigFile = None,
    out: Annotated[Path | None, typer.Option(help="Report JSON path (default: DATASET/data_quality.json).")] = None,
):
    """Data quality report: duplicates, train/test leakage, class balance, label issues, constant and
    predictive features, unseen categories, outliers, nulls. Exits 2 when a check refuses the data."""
    from rich.table import Table

    from raysys.data.quality import REPORT_FILE, check_dataset, refusal_message, table_rows, write_report

    cfg = pipeline_config(preset, config, None)
    report = guard(check_dataset, dataset, cfg.quality)
    path = write_report(report, out or dataset / REPORT_FILE)
    table = Table(title=f"data quality: {dataset} ({report['status']})")
    for col in ("check", "value", "level", "warn", "refuse", "seconds", "finding"):
        table.add_column(col, overflow="fold")
    styles = {"refuse": "bold red", "warn": "yellow"}
    for row in table_rows(report):
        table.add_row(*row, style=styles.get(row[2]))
    console.print(table)
    for f in report["findings"]:
        console.print(f"[{styles[f['level']]}]{f['level']}[/] {f['check']}: example rows {f['examples'][:5]}",
                      highlight=False)
    console.print(f"report written to {path} ({report['seconds']['total']:.1f}s)")
    msg = refusal_message(report)
    if msg:
        raise fail(msg)
