"""The flags every job takes (`--preset/--config/--root`) and the config they make."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from raysys.config import PipelineConfig, load_config


def job_parser(doc: str | None, *, root_default: str | None = os.environ.get("RAYSYS_ROOT", "~/raysys"),
               root_help: str = "directory for data, runs and registry (default $RAYSYS_ROOT or ~/raysys)"):
    """An argument parser with the `--preset/--config/--root` flags; `doc` is its description."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="tiny, demo or large")
    p.add_argument("--config", default=None, help="YAML file overriding the preset")
    p.add_argument("--root", default=root_default, help=root_help)
    return p


def job_config(args, overrides: dict | None = None) -> PipelineConfig:
    """Preset + YAML + overrides, rooted at `--root` when given; sets up logging. ValueError names the field."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config, preset_name=args.preset, overrides=overrides)
    return cfg.with_root(Path(args.root).expanduser()) if args.root else cfg
