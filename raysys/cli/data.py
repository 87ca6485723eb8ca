"""`raysys data ...`: generate the synthetic dataset or import your own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from raysys.cli.common import ConfigFile, Preset, Root, console, guard, pipeline_config

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
):
    """Bring your own data: infer a schema, split into train/validation/test and write the raysys layout."""
    from raysys.data.byod import import_parquet

    schema = guard(import_parquet, source, out, label=label, val_fraction=val_fraction,
                   test_fraction=test_fraction, seed=seed)
    console.print(f"imported {source} -> {out}: {len(schema.numeric)} numeric, {len(schema.categorical)} "
                  f"categorical features, classes {schema.classes}")
    console.print(f"train on it with: raysys run --config <file with data: {{root: {out}, source: parquet}}>")
