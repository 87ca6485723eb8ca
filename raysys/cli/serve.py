"""`raysys serve ...`: deploy the endpoint; roll versions out and back without downtime."""

from __future__ import annotations

import shlex
import time
from typing import Annotated

import typer

from raysys.cli.common import (
    Address,
    ConfigFile,
    Preset,
    Root,
    absolute_config,
    console,
    fail,
    find_cluster_token,
    guard,
    setup_logging,
    start_ray,
    wait_forever,
)
from raysys.config import PipelineConfig

serve_app = typer.Typer(no_args_is_help=True, help="Deploy the endpoint; roll versions out and back without downtime.")

Dashboard = Annotated[str | None, typer.Option(
    "--address", help="Ray dashboard URL of the cluster (default: RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265); "
                      "the cluster's auth token is read where Ray stores it (~/.ray/auth_token).")]
AppName = Annotated[str, typer.Option("--app", help="Serve application name.")]


def serve_endpoint(cfg: PipelineConfig, port: int | None) -> str:
    """Deploy the production student (on `port` when given); returns the endpoint's URL."""
    from serve.app import deploy

    if port is not None:
        cfg.serve.port = port
    url = deploy(cfg)
    console.print(f"HTTP endpoint: [bold]{url}[/]  (POST {url}/v1/predict, GET {url}/v1/monitor)")
    console.print(api_key_note(url), highlight=False, soft_wrap=True)
    return url


def api_key_note(url: str) -> str:
    """Where the endpoint's key is and how to send it, as far as this process knows."""
    import os

    from serve.apikey import API_TOKEN_ENV, API_TOKEN_FILE_ENV, key_usage

    if os.environ.get(API_TOKEN_ENV):
        return f"API key: ${API_TOKEN_ENV} (send 'Authorization: Bearer <key>' with every /v1/* request)"
    if os.environ.get(API_TOKEN_FILE_ENV):
        return key_usage(os.environ[API_TOKEN_FILE_ENV], url)
    return (f"API key: whatever the cluster's replicas read from ${API_TOKEN_ENV} / ${API_TOKEN_FILE_ENV} (they "
            f"refuse to start without one when they listen beyond loopback, unless serve.network: private)")


@serve_app.command("deploy")
def serve_deploy(preset: Preset = "demo", config: ConfigFile = None, root: Root = None, address: Address = None,
                 port: Annotated[int | None, typer.Option(help="HTTP port (default from config: 8000).")] = None,
                 detach: Annotated[bool, typer.Option(help="Return once deployed (cluster keeps serving).")] = False):
    """Deploy the production student behind the HTTP endpoint (declaratively, through Serve's REST API, so
    that `canary`, `promote` and `rollback` can update it in place)."""
    cfg = absolute_config(preset, config, root)
    setup_logging()
    start_ray(address, serving=True)
    guard(serve_endpoint, cfg, port)
    if not detach:
        wait_forever()


def _rollout(fn, *args, **kwargs) -> dict:
    """Apply one rollout step through Serve's REST API and print what the application serves after it."""
    from serve.rollout import ServeAdmin

    def run():
        find_cluster_token()
        return fn(ServeAdmin(kwargs.pop("address")), *args, **kwargs)

    t0 = time.perf_counter()
    try:
        user = guard(run)
    except typer.Exit:
        raise
    except RuntimeError as e:  # the Serve REST API refused the change (its message says why)
        raise fail(f"Serve refused the change: {str(e)[:2000]}", code=1) from None
    console.print(f"applied in {time.perf_counter() - t0:.1f}s: stable {user.get('model_ref')}, canary "
                  f"{user.get('candidate_ref') or 'none'} at {user.get('canary_percent', 0):g}%", highlight=False)
    return user


@serve_app.command("canary")
def serve_canary(version: Annotated[str, typer.Option(help="Candidate version or alias (e.g. 4, candidate).")],
                 percent: Annotated[float, typer.Option(help="Share of requests the candidate scores, 0-100.")],
                 app_name: AppName = "raysys", address: Dashboard = None):
    """Send PERCENT% of requests to a candidate version, the rest to the stable one (in place, no restart)."""
    from serve.rollout import canary

    ref: str | int = int(version) if version.isdigit() else version
    _rollout(canary, app_name, ref, percent, address=address)


@serve_app.command("promote")
def serve_promote(app_name: AppName = "raysys", address: Dashboard = None,
                  alias: Annotated[str, typer.Option(help="Registry alias to move to it.")] = "production"):
    """Make the canary's version the stable one for all traffic and move the registry alias to it."""
    from serve.rollout import promote

    _rollout(promote, app_name, alias=alias, address=address)


@serve_app.command("rollback")
def serve_rollback(app_name: AppName = "raysys", address: Dashboard = None,
                   alias: Annotated[str, typer.Option(help="Registry alias to move back.")] = "production"):
    """Stop a running canary; without one, go back to the previous production version."""
    from serve.rollout import rollback

    _rollout(rollback, app_name, alias=alias, address=address)


@serve_app.command("env")
def serve_env():
    """Print the environment for `ray start` that turns on raysys's fast Serve ingress (HAProxy + direct
    ingress): `eval "$(raysys serve env)" && ray start --head ...`. An embedded local Ray sets it itself."""
    from serve.ingress import ingress_env

    for key, value in guard(ingress_env).items():
        print(f"export {key}={shlex.quote(value)}")


@serve_app.command("status")
def serve_status(app_name: AppName = "raysys", address: Dashboard = None):
    """The application's state and the versions it serves."""
    from serve.rollout import ServeAdmin, current_rollout

    def run():
        find_cluster_token()
        admin = ServeAdmin(address)
        _, app_conf, user = current_rollout(admin, app_name)
        return (admin.details().get("applications") or {}).get(app_name, {}), user

    details, user = guard(run)
    console.print(f"{app_name}: {details.get('status')}  stable {user.get('model_ref')}  canary "
                  f"{user.get('candidate_ref') or 'none'} at {user.get('canary_percent', 0):g}%", highlight=False)
