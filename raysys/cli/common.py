"""What every `raysys` command shares: the console, the `--preset/--config/--root/--address` options,
logging, loading the config, turning a user error into exit status 2, starting Ray, waiting for Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from raysys.config import PipelineConfig, load_config


def _console_width() -> int | None:
    """None (the terminal's width) on a terminal; otherwise 160 columns unless COLUMNS says: Rich's default of 80
    for a pipe or CI log wraps each log line (time, level, message) over two to four lines."""
    return None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160


console = Console(width=_console_width())

Preset = Annotated[str, typer.Option("--preset", help="Preset to start from: tiny, demo or large.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file overriding the preset.")]
Root = Annotated[Path | None, typer.Option("--root", help="Directory for data, runs and registry.")]
Address = Annotated[str | None, typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS or local).")]

VERBOSE = {"on": False}  # set by `raysys --verbose`, read when a command sets up logging


def setup_logging(log_file: str | Path | None = None) -> None:
    """INFO (DEBUG with --verbose) to the console. With `log_file` (the loop's commands, not --verbose) the whole
    log goes to that file and the console shows the stage lines, warnings and a progress line now and then
    (`raysys.cli.progress.ConsoleFilter`)."""
    quiet = log_file is not None and "://" not in str(log_file) and not VERBOSE["on"]
    # a quiet console leaves the times to the file and keeps its width for the messages
    handler = RichHandler(console=console, show_path=False, markup=False, show_time=not quiet)
    handlers: list[logging.Handler] = [handler]
    if quiet:
        from raysys.cli.progress import ConsoleFilter

        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(path)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(ConsoleFilter())
        handlers.append(to_file)
        console.print(f"full log: {path}", highlight=False)
    logging.basicConfig(level=logging.DEBUG if VERBOSE["on"] else logging.INFO, format="%(message)s",
                        handlers=handlers, force=True)


def fail(msg: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    return typer.Exit(code)


def pipeline_config(preset: str, config_file: Path | None, root: Path | None,
                    overrides: dict | None = None) -> PipelineConfig:
    """Preset + YAML + overrides, rooted at `root` when given; a wrong setting exits 2 naming the field."""
    try:
        cfg = load_config(config_file, preset_name=preset, overrides=overrides)
    except ValueError as e:
        raise fail(str(e)) from None
    if root is not None:
        cfg = cfg.with_root(root)
    return cfg


def absolute_config(preset: str, config_file: Path | None, root: Path | None,
                    overrides: dict | None = None) -> PipelineConfig:
    """`pipeline_config` with absolute storage paths (what Ray Train/Tune and the registry need)."""
    from raysys.workflow.stages import absolute

    return absolute(pipeline_config(preset, config_file, root, overrides))


def guard(fn, *args, **kwargs):
    """Run a stage; a user error (ValueError) exits 2 with its message instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise fail(str(e)) from None


def find_cluster_token() -> None:
    """Before any Ray client call: use the cluster's auth token where Ray stored it (~/.ray/auth_token),
    so no command needs RAY_AUTH_MODE=token exported by hand."""
    from raysys.workflow.cluster import use_cluster_token

    use_cluster_token()


def start_ray(address: str | None, *, serving: bool = False, quiet: bool = False):
    """Join `address` or start an embedded local Ray (`serving`: one that will run the endpoint, so it gets
    an API key, see `raysys.workflow.cluster.init_ray`). `quiet` (the loop's commands, unless `--verbose`): the
    console keeps raysys's own lines, Ray's workers' output stays in its logs (`quiet_ray_console`)."""
    from raysys.workflow.cluster import dashboard_url, init_ray

    if address or os.environ.get("RAY_ADDRESS"):  # joining a running cluster: use its token
        find_cluster_token()
    ctx = init_ray(address, serving=serving, quiet=quiet and not VERBOSE["on"])
    url = dashboard_url(ctx)
    console.print(f"Ray dashboard: [bold]{url or 'not available'}[/]")
    return ctx


def wait_forever() -> None:
    """Wait until one Ctrl-C or SIGTERM. Ray Train's and Tune's fit() (and other libraries) can leave their
    own SIGINT handlers installed, so the default one goes back in, before the prompt: a Ctrl-C right
    after "press Ctrl-C" must not reach a stale handler."""
    stop = {"flag": False}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    try:
        console.print("endpoint is up; press Ctrl-C to stop")
        while not stop["flag"]:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
