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
    pipeline_config,
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


Pct = Annotated[float | None, typer.Option("--percent", help="Share of requests the candidate takes, 0-100 "
                                                           "(default: canary.percent of the config, 10).")]


@serve_app.command("canary")
def serve_canary(version: Annotated[str, typer.Option(help="Candidate version or alias (e.g. 4, candidate).")],
                 percent: Pct = None, app_name: AppName = "raysys", address: Dashboard = None,
                 gate: Annotated[bool, typer.Option(help="Watch the candidate's live figures and promote or roll "
                                                         "it back by itself (--no-gate: start it and return).")] = True,
                 shadow: Annotated[bool, typer.Option(help="The candidate scores a copy; users get stable's "
                                                           "answers.")] = False,
                 promote: Annotated[bool, typer.Option(help="Promote when the gate passes (--no-promote: stop "
                                                            "the canary after the verdict either way).")] = True,
                 config: ConfigFile = None,
                 interval_s: Annotated[float | None, typer.Option(help="Seconds between checks.")] = None,
                 intervals: Annotated[int | None, typer.Option(help="Passing checks needed to promote.")] = None,
                 min_rows: Annotated[int | None, typer.Option(help="Rows before a check counts.")] = None,
                 min_agreement: Annotated[float | None, typer.Option(
                     help="Share of rows where candidate and stable must agree (lower it for a candidate "
                          "retrained after the labels' rule changed).")] = None,
                 endpoint: Annotated[str | None, typer.Option(help="The endpoint's base URL, where the gate reads "
                                                                   "/v1/monitor (default: found through Serve).")] = None,
                 alias: Annotated[str, typer.Option(help="Registry alias a promotion moves.")] = "production"):
    """Send PERCENT% of requests to a candidate version, the rest to the stable one (in place, no restart),
    behind the metric gate of the config's `canary:` section: at every check the candidate needs enough
    rows, a non-5xx ratio >= 99%, no more refused requests than stable, p99 scoring time within 2x stable's,
    >= 75% agreement with stable and (once labels arrive) accuracy within 2 points of stable's. It is
    promoted after `intervals` passing checks and rolled back after `failure_threshold` failed ones, naming
    the check; exit 0 when promoted, 1 when rolled back."""
    from serve.rollout import canary

    ref: str | int = int(version) if version.isdigit() else version
    if not gate:
        cfg = _gate_config(config, percent, shadow, None, None, None, None)
        _rollout(canary, app_name, ref, cfg.percent, address=address, shadow=cfg.shadow)
        return
    cfg = _gate_config(config, percent, shadow, interval_s, intervals, min_rows, min_agreement)
    result = _gated(app_name, ref, cfg, address, endpoint, promote, alias)
    raise typer.Exit(0 if result.passed else 1)


def _gate_config(config, percent, shadow, interval_s, intervals, min_rows, min_agreement):
    from pydantic import ValidationError

    from raysys.config import CanaryConfig

    base = pipeline_config("demo", config, None).canary if config else CanaryConfig()
    given = {"percent": percent, "interval_s": interval_s, "intervals": intervals, "min_rows": min_rows,
             "min_agreement": min_agreement}
    changes = {k: v for k, v in given.items() if v is not None}
    if shadow:
        changes["shadow"] = True
    try:
        return CanaryConfig.model_validate({**base.model_dump(), **changes})
    except ValidationError as e:
        err = e.errors()[0]
        raise fail(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} (got {err.get('input')!r})") from None


def _gated(app_name, ref, cfg, address, endpoint, promote, alias):
    from serve.apikey import client_api_key
    from serve.canary import endpoint_url, http_report_reader, run_canary
    from serve.rollout import ServeAdmin

    def on_check(n, verdict):
        if verdict is None:
            console.print(f"check {n}: waiting (no monitor report)", highlight=False)
        else:
            console.print(f"check {n}: {verdict.state}: {verdict.describe()}", highlight=False)

    def run():
        find_cluster_token()
        admin = ServeAdmin(address)
        reader = http_report_reader(endpoint or endpoint_url(admin, app_name), client_api_key())
        return run_canary(admin, app_name, ref, cfg, reader, alias=alias, promote=promote, on_check=on_check)

    result = guard(run)
    for line in result.reconciled:
        console.print(f"reconciled first: {line}", highlight=False)
    verdict = "promoted" if result.promoted else ("passed (not promoted)" if result.passed else "rolled back")
    console.print(f"v{result.version} {verdict} after {result.seconds:.0f}s: {result.why}", highlight=False)
    return result


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
    """The application's state and the versions it serves; first finishes or undoes a rollout that an
    earlier command or job left half-done (a promotion cut before the alias moved, an orphaned canary)."""
    from serve.rollout import ServeAdmin, status

    def run():
        find_cluster_token()
        return status(ServeAdmin(address), app_name)

    st = guard(run)
    user = st["user_config"]
    for line in st["reconciled"]:
        console.print(f"reconciled: {line}", highlight=False)
    if st["in_progress"]:
        console.print(st["in_progress"], highlight=False)
    mode = "shadow" if user.get("shadow") else "canary"
    console.print(f"{app_name}: {st['status']}  stable v{st['stable_version']} ({user.get('model_ref')})  {mode} "
                  f"{user.get('candidate_ref') or 'none'} at {user.get('canary_percent', 0):g}%  production alias "
                  f"v{st['production_alias']}", highlight=False)
    if st["production_alias"] != st["stable_version"] and not st["in_progress"]:
        console.print(f"note: the registry alias 'production' (v{st['production_alias']}) is not the version served "
                      f"(v{st['stable_version']}); `raysys serve canary --version {st['production_alias']}` rolls it "
                      "out", highlight=False)
