"""What every `jobs/*.py` entrypoint shares: the repository on sys.path (the job's working dir copy),
the `--preset/--config/--root` flags, config loading and logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from raysys.config import PipelineConfig, load_config  # noqa: E402


def job_parser(doc: str | None, *, root_default: str | None = os.environ.get("RAYSYS_ROOT", "~/raysys"),
               root_help: str = "directory for data, runs and registry (default $RAYSYS_ROOT or ~/raysys)"
               ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="tiny, demo or large")
    p.add_argument("--config", default=None, help="YAML file overriding the preset")
    p.add_argument("--root", default=root_default, help=root_help)
    return p


def job_config(args: argparse.Namespace, overrides: dict | None = None) -> PipelineConfig:
    """Preset + YAML + overrides, rooted at `--root` when given. ValueError names the bad field."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config, preset_name=args.preset, overrides=overrides)
    return cfg.with_root(Path(args.root).expanduser()) if args.root else cfg
