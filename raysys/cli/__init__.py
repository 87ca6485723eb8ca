"""`raysys` command line.

Every command takes `--preset`, `--config` (YAML) and `--root` (where data, runs and the registry live)
and runs on the Ray cluster named by `--address` / `RAY_ADDRESS`, or on an embedded local Ray when there
is none. A wrong setting exits with status 2 and a message naming the field.
"""

from __future__ import annotations

from typing import Annotated

import typer

from raysys.cli import loop, report
from raysys.cli.common import VERBOSE, console, setup_logging, wait_forever
from raysys.cli.data import data_app
from raysys.cli.monitor import monitor
from raysys.cli.registry import registry_app
from raysys.cli.serve import serve_app

__all__ = ["app", "console", "main", "setup_logging", "wait_forever"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(data_app, name="data")
app.add_typer(registry_app, name="registry")
app.add_typer(serve_app, name="serve")
app.command("train")(loop.train)
app.command("distill")(loop.distill)
app.command("run")(loop.run)
app.command("monitor")(monitor)
app.command("demo")(loop.demo)
app.command("report")(report.report)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="DEBUG logs, and Ray Tune's own console tables in sweeps.")] = False) -> None:
    VERBOSE["on"] = verbose


def main() -> None:
    app()
