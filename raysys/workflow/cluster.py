"""Join a Ray cluster, or start a local one, for the CLI and the jobs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("raysys")


def use_cluster_token() -> bool:
    """Turn on token auth for this process (RAY_AUTH_MODE=token) when RAY_AUTH_MODE is unset and a token is
    where Ray keeps it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (where a new local
    `ray.init()` cluster, such as `make demo`'s, stores it). `ray.init(address=...)` does the same for
    itself, but Serve's REST client (`raysys serve status|canary|promote|rollback`) does not: without this a
    second terminal fails with "Token authentication is enabled but no authentication token was found".
    Returns whether token auth is on. An explicit RAY_AUTH_MODE (e.g. "disabled") is left alone."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN", "").strip()) or (
        Path(path).expanduser().is_file() if path else (Path.home() / ".ray" / "auth_token").is_file())
    if not has_token:
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config; refresh it as ray._private.authentication does when it enables token auth
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # an older Ray reads the environment when it first needs it
        pass
    return True


# Ray's own loggers on this (driver) process that `quiet_ray_console` lowers to WARNING
QUIET_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.serve")


def quiet_ray_console(*, serving: bool = False) -> dict[str, Any]:
    """Keep a CLI console to raysys's own lines (`raysys demo`/`run`, not `--verbose`): returns the `ray.init`
    options that stop the workers' output from being forwarded to this console (their logs stay in Ray's session
    dir and on the dashboard; an error still reaches the driver as the exception it raises) and lower Ray's
    driver-side INFO chatter; turns off Ray Data's progress bars (logged line by line when stdout is not a
    terminal) and its INFO lines, here and in the processes the local Ray starts later (environment); `serving`:
    Serve's driver-side INFO lines too (the CLI prints the endpoint's address itself). Ray
    Train's LoggingConfig and Tune's verbosity are already quiet (raysys.train.trainer, distill.sweep.tuner)."""
    import warnings

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # read each time Ray Data (re)configures its loggers
    # Tune's new console output prints the experiment's header and paths even at verbose=0; the classic
    # reporter prints nothing at 0 (distill.sweep.tuner asks for 0 unless --verbose)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in (*QUIET_LOGGERS, "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR if name == "ray.data" else logging.WARNING)
    if serving:  # Serve sets its driver logger to INFO when first imported: import it first, then lower it
        import ray.serve  # noqa: F401

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:  # the sweep's search: optuna sets its own logger's level when it first logs, so ask it
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\..*")  # actor pool sizing hints
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()  # datasets made from here on carry it to their workers
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
    except ImportError:  # ray[data] not installed: nothing of it to quiet
        pass
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True,
             serving: bool = False, quiet: bool = False):
    """Connect to `address` (or RAY_ADDRESS) when given ("auto" joins the cluster `ray start` made on this
    machine); otherwise start an embedded local Ray, even when another cluster runs here.

    The local cluster gets more logical CPUs than cores: Tune's trial drivers and Ray Train's workers
    reserve CPUs while mostly waiting on each other. Token auth stays on (Ray 2.60's default). `serving`: the
    local Ray will run the endpoint, so it gets an API key (`serve.apikey.ensure_api_key`: the one the
    environment names, else ~/.raysys/api_key, generated once) in its processes' environment. `quiet`: see
    `quiet_ray_console`.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    options = quiet_ray_console(serving=serving) if quiet else {}
    if address:
        use_cluster_token()  # a job script run by hand against a token cluster finds the token as the CLI does
        return ray.init(address=address, **options)
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    from serve.ingress import apply_ingress_env

    apply_ingress_env()  # Serve's fast HAProxy ingress: read by the processes the local Ray starts
    if serving:
        _provide_api_key()
    return ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                    **options)


def _provide_api_key() -> None:
    """The endpoint's key into os.environ before the local Ray starts (its replicas inherit it)."""
    from serve.apikey import ensure_api_key

    key_file, created = ensure_api_key()
    if key_file is not None:
        log.info("raysys: %s the endpoint's API key at %s (mode 0600); clients send it as 'Authorization: Bearer "
                 "<key>'", "generated" if created else "using", key_file)


def dashboard_url(ctx: Any) -> str | None:
    """The Ray dashboard's URL from `init_ray`'s context (None when the cluster runs none)."""
    url = getattr(ctx, "dashboard_url", None)
    if url:
        return url if url.startswith("http") else f"http://{url}"
    try:
        import ray

        url = ray.worker.get_dashboard_url()  # type: ignore[attr-defined]
        return f"http://{url}" if url and not url.startswith("http") else url
    except Exception:
        return None
