"""`raysys` command line.

Every command takes `--preset`, `--config` (YAML) and `--root` (where data, runs and the registry live)
and runs on the Ray cluster named by `--address` / `RAY_ADDRESS`, or on an embedded local Ray when there
is none. A wrong setting exits with status 2 and a message naming the field.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from raysys.config import PipelineConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Generate or import datasets.")
registry_app = typer.Typer(no_args_is_help=True, help="Inspect the model registry and move aliases.")
app.add_typer(data_app, name="data")
serve_app = typer.Typer(no_args_is_help=True, help="Deploy the endpoint; roll versions out and back without downtime.")
app.add_typer(registry_app, name="registry")
app.add_typer(serve_app, name="serve")
console = Console()

Preset = Annotated[str, typer.Option("--preset", help="Preset to start from: tiny, demo or large.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file overriding the preset.")]
Root = Annotated[Path | None, typer.Option("--root", help="Directory for data, runs and registry.")]
Address = Annotated[str | None, typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS or local).")]


_VERBOSE = {"on": False}


@app.callback()
def _root(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="DEBUG logs, and Ray Tune's own console tables in sweeps.")] = False) -> None:
    _VERBOSE["on"] = verbose


def _setup_logging() -> None:
    logging.basicConfig(level=logging.DEBUG if _VERBOSE["on"] else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, markup=False)], force=True)


def _fail(msg: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    return typer.Exit(code)


def _config(preset: str, config: Path | None, root: Path | None, overrides: dict | None = None) -> PipelineConfig:
    try:
        cfg = load_config(config, preset_name=preset, overrides=overrides)
    except ValueError as e:
        raise _fail(str(e)) from None
    if root is not None:
        cfg = cfg.with_root(root)
    return cfg


def _guard(fn, *args, **kwargs):
    """Run a stage; a user error (ValueError) exits 2 with its message instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise _fail(str(e)) from None


@data_app.command("generate")
def data_generate(preset: Preset = "demo", config: ConfigFile = None, root: Root = None,
                  force: Annotated[bool, typer.Option(help="Regenerate even if the data exists.")] = False):
    """Generate the synthetic dataset (Parquet shards + schema.json)."""
    import shutil

    from raysys.data import ensure_dataset, fingerprint

    cfg = _config(preset, config, root)
    if force and Path(cfg.data.root).exists():
        shutil.rmtree(cfg.data.root)
    schema = _guard(ensure_dataset, cfg.data)
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

    schema = _guard(import_parquet, source, out, label=label, val_fraction=val_fraction,
                    test_fraction=test_fraction, seed=seed)
    console.print(f"imported {source} -> {out}: {len(schema.numeric)} numeric, {len(schema.categorical)} "
                  f"categorical features, classes {schema.classes}")
    console.print(f"train on it with: raysys run --config <file with data: {{root: {out}, source: parquet}}>")


def _start(address: str | None):
    from raysys.pipeline import dashboard_url, init_ray

    ctx = init_ray(address)
    url = dashboard_url(ctx)
    console.print(f"Ray dashboard: [bold]{url or 'not available'}[/]")
    return ctx


TEACHER_FAMILIES = ("mlp", "ft_transformer")
TEACHER_SIZES = ("tiny", "small", "base", "large")


def train_overrides(strategy: str | None = None, workers: int | None = None, dp: int | None = None,
                    tp: int | None = None, pp: int | None = None, max_worker_memory_gb: float | None = None,
                    teacher_family: str | None = None, teacher_size: str | None = None) -> dict | None:
    """`train:` and `teacher:` config overrides from the flags shared by `raysys train` and
    jobs/train_teacher.py. A `teacher_size` without a family means ft_transformer (the family with sizes)."""
    out: dict = {}
    teacher: dict = {}
    if teacher_family:
        teacher["family"] = teacher_family
    if teacher_size:
        teacher["size"] = teacher_size
        teacher.setdefault("family", "ft_transformer")
    if teacher:
        out["teacher"] = teacher
    train: dict = {}
    if strategy:
        train["strategy"] = strategy
    if workers:
        train["num_workers"] = workers
    parallel = {k: v for k, v in (("dp", dp), ("tp", tp), ("pp", pp)) if v}
    if parallel:
        train["parallel"] = parallel
    if max_worker_memory_gb:
        train["max_worker_memory_gb"] = max_worker_memory_gb
    if train:
        out["train"] = train
    return out or None


@app.command("train")
def train(preset: Preset = "demo", config: ConfigFile = None, root: Root = None, address: Address = None,
          workers: Annotated[int | None, typer.Option("--workers", help="Ray Train workers.")] = None,
          strategy: Annotated[str | None, typer.Option(
              "--strategy", help="ddp, zero1, zero2, zero3, pipeline or tensor (train.strategy).")] = None,
          dp: Annotated[int | None, typer.Option("--dp", help="Data-parallel degree (train.parallel.dp).")] = None,
          tp: Annotated[int | None, typer.Option("--tp", help="Tensor-parallel degree (train.parallel.tp).")] = None,
          pp: Annotated[int | None, typer.Option("--pp", help="Pipeline stages (train.parallel.pp).")] = None,
          max_worker_memory_gb: Annotated[float | None, typer.Option(
              "--max-worker-memory-gb", help="Per-worker budget for params + grads + optimizer state.")] = None,
          teacher_family: Annotated[str | None, typer.Option(
              "--teacher-family", help="mlp or ft_transformer (teacher.family).")] = None,
          teacher_size: Annotated[str | None, typer.Option(
              "--teacher-size", help="tiny, small, base or large (teacher.size; implies ft_transformer).")] = None):
    """Train and register the teacher with Ray Train (e.g. `raysys train --strategy zero3 --workers 4`)."""
    from raysys.pipeline import absolute, stage_data, stage_teacher

    for flag, value, allowed in (("--teacher-family", teacher_family, TEACHER_FAMILIES),
                                 ("--teacher-size", teacher_size, TEACHER_SIZES)):
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=flag)
    overrides = train_overrides(strategy, workers, dp, tp, pp, max_worker_memory_gb, teacher_family, teacher_size)
    cfg = absolute(_config(preset, config, root, overrides))
    _setup_logging()
    _start(address)
    prep = _guard(stage_data, cfg)
    _, version, metrics = _guard(stage_teacher, cfg, prep)
    console.print_json(json.dumps({"teacher_version": version, "test": metrics}))


@app.command("distill")
def distill(preset: Preset = "demo", config: ConfigFile = None, root: Root = None, address: Address = None,
            teacher: Annotated[str, typer.Option(help="Teacher version or alias in the registry.")] = "latest",
            search: Annotated[str | None, typer.Option(help="grid, optuna or random (default from config).")] = None,
            num_samples: Annotated[int | None, typer.Option(help="Trials of an optuna/random search.")] = None,
            resume_sweep: Annotated[str | None, typer.Option(
                "--resume-sweep", help="Go on with this interrupted sweep (its directory under <root>/runs, "
                                       "named in the log when it started) instead of a new one.")] = None):
    """Distill the registered teacher with a Ray Tune sweep (ASHA + Optuna by default); register the chosen
    student (production) and its int8 variant (candidate), each with a model card."""
    from raysys.pipeline import absolute, load_teacher, stage_data, stage_distill

    over: dict = {}
    if search is not None:
        over["search"] = search
    if num_samples is not None:
        over["num_samples"] = num_samples
    cfg = absolute(_config(preset, config, root, {"distill": over} if over else None))
    _setup_logging()
    _start(address)
    prep = _guard(stage_data, cfg)
    model, t_version, t_metrics = _guard(load_teacher, cfg, teacher)
    version, metrics, best = _guard(stage_distill, cfg, prep, model, t_version, t_metrics, resume_sweep=resume_sweep)
    keys = ("accuracy", "macro_f1", "num_parameters", "teacher_agreement", "teacher_accuracy", "int8_variant")
    console.print_json(json.dumps({"student_version": version, "best": best,
                                   "test": {k: metrics.get(k) for k in keys}}, default=str))
    console.print(f"model card: raysys registry show production --root {root or '.'}", highlight=False)


@app.command("run")
def run(preset: Preset = "demo", config: ConfigFile = None, root: Root = None, address: Address = None):
    """Data -> teacher -> distillation -> registry, without serving."""
    from raysys.pipeline import run_pipeline

    cfg = _config(preset, config, root)
    _setup_logging()
    _start(address)
    result = _guard(run_pipeline, cfg)
    console.print_json(json.dumps(result.summary()))


def _serve(cfg: PipelineConfig, port: int | None) -> str:
    from serve.app import deploy

    if port is not None:
        cfg.serve.port = port
    url = deploy(cfg)
    console.print(f"HTTP endpoint: [bold]{url}[/]  (POST {url}/v1/predict, GET {url}/v1/monitor)")
    return url


def _wait_forever() -> None:
    stop = {"flag": False}
    # whatever SIGINT handler a library left installed (raysys.sigint puts back the ones Ray Train's and Tune's
    # fit() leave, but not every library's), one Ctrl-C here must stop the wait. The handlers go in before the
    # prompt: a Ctrl-C right after "press Ctrl-C" must not reach the stale handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    try:
        console.print("endpoint is up; press Ctrl-C to stop")
        while not stop["flag"]:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


@serve_app.command("deploy")
def serve_deploy(preset: Preset = "demo", config: ConfigFile = None, root: Root = None, address: Address = None,
                 port: Annotated[int | None, typer.Option(help="HTTP port (default from config: 8000).")] = None,
                 detach: Annotated[bool, typer.Option(help="Return once deployed (cluster keeps serving).")] = False):
    """Deploy the production student behind the HTTP endpoint (declaratively, through Serve's REST API, so
    that `canary`, `promote` and `rollback` can update it in place)."""
    from raysys.pipeline import absolute

    cfg = absolute(_config(preset, config, root))
    _setup_logging()
    _start(address)
    _guard(_serve, cfg, port)
    if not detach:
        _wait_forever()


Dashboard = Annotated[str | None, typer.Option(
    "--address", help="Ray dashboard URL of the cluster (default: RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265); "
                      "export RAY_AUTH_MODE=token for a token-auth cluster.")]
AppName = Annotated[str, typer.Option("--app", help="Serve application name.")]


def _rollout(fn, *args, **kwargs) -> dict:
    from raysys.serving import ServeAdmin

    def run():
        return fn(ServeAdmin(kwargs.pop("address")), *args, **kwargs)

    t0 = time.perf_counter()
    try:
        user = _guard(run)
    except typer.Exit:
        raise
    except RuntimeError as e:  # the Serve REST API refused the change (its message says why)
        raise _fail(f"Serve refused the change: {str(e)[:2000]}", code=1) from None
    console.print(f"applied in {time.perf_counter() - t0:.1f}s: stable {user.get('model_ref')}, canary "
                  f"{user.get('candidate_ref') or 'none'} at {user.get('canary_percent', 0):g}%", highlight=False)
    return user


@serve_app.command("canary")
def serve_canary(version: Annotated[str, typer.Option(help="Candidate version or alias (e.g. 4, candidate).")],
                 percent: Annotated[float, typer.Option(help="Share of requests the candidate scores, 0-100.")],
                 app_name: AppName = "raysys", address: Dashboard = None):
    """Send PERCENT% of requests to a candidate version, the rest to the stable one (in place, no restart)."""
    from raysys.serving import canary

    ref: str | int = int(version) if version.isdigit() else version
    _rollout(canary, app_name, ref, percent, address=address)


@serve_app.command("promote")
def serve_promote(app_name: AppName = "raysys", address: Dashboard = None,
                  alias: Annotated[str, typer.Option(help="Registry alias to move to it.")] = "production"):
    """Make the canary's version the stable one for all traffic and move the registry alias to it."""
    from raysys.serving import promote

    _rollout(promote, app_name, alias=alias, address=address)


@serve_app.command("rollback")
def serve_rollback(app_name: AppName = "raysys", address: Dashboard = None,
                   alias: Annotated[str, typer.Option(help="Registry alias to move back.")] = "production"):
    """Stop a running canary; without one, go back to the previous production version."""
    from raysys.serving import rollback

    _rollout(rollback, app_name, alias=alias, address=address)


@serve_app.command("env")
def serve_env():
    """Print the environment for `ray start` that turns on raysys's fast Serve ingress (HAProxy + direct
    ingress): `eval "$(raysys serve env)" && ray start --head ...`. An embedded local Ray sets it itself."""
    from raysys.serving import ingress_env

    for key, value in _guard(ingress_env).items():
        print(f"export {key}={shlex.quote(value)}")


@serve_app.command("status")
def serve_status(app_name: AppName = "raysys", address: Dashboard = None):
    """The application's state and the versions it serves."""
    from raysys.serving import ServeAdmin, current_rollout

    def run():
        admin = ServeAdmin(address)
        _, app_conf, user = current_rollout(admin, app_name)
        return (admin.details().get("applications") or {}).get(app_name, {}), user

    details, user = _guard(run)
    console.print(f"{app_name}: {details.get('status')}  stable {user.get('model_ref')}  canary "
                  f"{user.get('candidate_ref') or 'none'} at {user.get('canary_percent', 0):g}%", highlight=False)


@app.command("monitor")
def monitor(url: Annotated[str, typer.Option(help="Endpoint base URL.")] = "http://127.0.0.1:8000",
            as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON report.")] = False):
    """Print the live drift and latency report of a running endpoint."""
    import requests

    from raysys.pipeline import format_report

    try:
        r = requests.get(f"{url.rstrip('/')}/v1/monitor", timeout=10)
    except requests.RequestException as e:
        raise _fail(f"--url: cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise _fail(f"{url}/v1/monitor answered {r.status_code}: {r.text[:300]}", code=1)
    console.print_json(r.text) if as_json else console.print(format_report(r.json()), highlight=False)


@app.command("demo")
def demo(preset: Preset = "demo", config: ConfigFile = None,
         root: Annotated[Path, typer.Option("--root", help="Directory for data, runs and registry.")] = Path("runs"),
         address: Address = None,
         port: Annotated[int | None, typer.Option(help="HTTP port (default 8000).")] = None,
         exit_: Annotated[bool, typer.Option("--exit", help="Stop once the report is printed.")] = False,
         fresh: Annotated[bool, typer.Option(help="Delete earlier runs under --root first (data is kept).")] = True):
    """The whole loop on an embedded local Ray: train, distill, register, serve, send normal then drifted
    traffic, print the monitor's report; keep the endpoint up until Ctrl-C (or --exit)."""
    import shutil

    from raysys.pipeline import absolute, exercise_endpoint, format_report, run_pipeline

    cfg = absolute(_config(preset, config, root))
    if fresh:
        for d in (cfg.run_dir, cfg.registry_uri):
            if "://" not in d and Path(d).exists():
                shutil.rmtree(d)
    _setup_logging()
    t0 = time.perf_counter()
    ctx = _start(address)
    result = _guard(run_pipeline, cfg)
    console.rule("pipeline")
    console.print_json(json.dumps(result.summary()))
    url = _guard(_serve, cfg, port)
    out = exercise_endpoint(cfg, url)
    console.rule("monitor after normal traffic")
    console.print(format_report(out["normal_report"]), highlight=False)
    console.rule(f"monitor after traffic shifted {out['shift_sigma']} sigma on {out['drift_feature']}")
    console.print(format_report(out["drift_report"]), highlight=False)
    console.rule("summary")
    console.print(f"bad request -> HTTP {out['bad_request']['status']}: {json.dumps(out['bad_request']['body'])}",
                  highlight=False)
    console.print(f"loop completed in {time.perf_counter() - t0:.0f}s")
    from raysys.pipeline import dashboard_url

    console.print(f"Ray dashboard: [bold]{dashboard_url(ctx)}[/]   HTTP endpoint: [bold]{url}[/]")
    example = json.dumps({"instances": _one_row(cfg)})
    console.print(f"try: curl -X POST {url}/v1/predict -H 'content-type: application/json' -d '{example}'",
                  highlight=False, soft_wrap=True)
    if not exit_ and not os.environ.get("CI"):
        _wait_forever()


def _one_row(cfg: PipelineConfig) -> list[dict]:
    from raysys.pipeline import traffic_rows

    rows = traffic_rows(cfg, 1, seed=3)
    return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


@registry_app.command("list")
def registry_list(preset: Preset = "demo", config: ConfigFile = None, root: Root = None):
    """Models, their versions and aliases."""
    from raysys.pipeline import absolute
    from raysys.registry import Registry

    cfg = absolute(_config(preset, config, root))
    reg = Registry(cfg.registry_uri)
    table = Table("model", "version", "kind", "accuracy", "parameters", "aliases", "created")
    for name in reg.list_models():
        aliases = reg.aliases(name)
        for v in reg.list_versions(name):
            try:
                _, card, _ = reg.model_card(name, v)
            except ValueError as e:  # a damaged version is listed, not fatal
                card = {"kind": f"unreadable: {e}"[:40]}
            test = ((card or {}).get("metrics") or {}).get("test") or {}
            acc = test.get("accuracy")
            table.add_row(name, str(v), (card or {}).get("kind", ""), f"{acc:.4f}" if acc is not None else "",
                          str(test.get("num_parameters", "")), ", ".join(a for a, av in aliases.items() if av == v),
                          str(((card or {}).get("lineage") or {}).get("created_at", "")))
    console.print(table)


@registry_app.command("show")
def registry_show(ref: Annotated[str, typer.Argument(help="Version number or alias.")] = "production",
                  name: Annotated[str | None, typer.Option(help="Model name (default from config).")] = None,
                  as_json: Annotated[bool, typer.Option("--json", help="Print the full JSON description.")] = False,
                  preset: Preset = "demo", config: ConfigFile = None, root: Root = None):
    """One version's model card (Markdown), or with --json its metrics, lineage, card and files."""
    from rich.markdown import Markdown

    from raysys.pipeline import absolute
    from raysys.registry import Registry

    cfg = absolute(_config(preset, config, root))
    reg = Registry(cfg.registry_uri)
    model = name or cfg.model_name
    if as_json:
        desc = _guard(reg.describe, model, ref)
        console.print_json(json.dumps(desc, default=str))
        return
    version, _, md = _guard(reg.model_card, model, ref)
    aliases = [a for a, v in reg.aliases(model).items() if v == version]
    console.print(f"{model} v{version}" + (f"  aliases: {', '.join(aliases)}" if aliases else ""), highlight=False)
    if md is None:
        console.print("(this version has no model card; --json shows its metrics and lineage)")
        return
    console.print(Markdown(md) if console.is_terminal else md, highlight=False, soft_wrap=True)


@registry_app.command("promote")
def registry_promote(version: Annotated[str, typer.Argument(help="Version (or alias, e.g. candidate) to point "
                                                                 "the alias at.")],
                     alias: Annotated[str, typer.Option(help="Alias to move.")] = "production",
                     name: Annotated[str | None, typer.Option(help="Model name (default from config).")] = None,
                     preset: Preset = "demo", config: ConfigFile = None, root: Root = None):
    """Point an alias (default production) at a version; the move is atomic and kept in the alias history."""
    from raysys.pipeline import absolute
    from raysys.registry import Registry

    cfg = absolute(_config(preset, config, root))
    reg = Registry(cfg.registry_uri)
    model = name or cfg.model_name
    target = _guard(reg.resolve, model, version)
    _guard(reg.set_alias, model, alias, target)
    console.print(f"{model}: {alias} -> v{target}  (history {reg.alias_history(model, alias)})", highlight=False)


@registry_app.command("rollback")
def registry_rollback(alias: Annotated[str, typer.Option(help="Alias to move back.")] = "production",
                      name: Annotated[str | None, typer.Option(help="Model name (default from config).")] = None,
                      preset: Preset = "demo", config: ConfigFile = None, root: Root = None):
    """Move an alias (default production) back to the version it pointed at before the current one."""
    from raysys.pipeline import absolute
    from raysys.registry import Registry

    cfg = absolute(_config(preset, config, root))
    reg = Registry(cfg.registry_uri)
    model = name or cfg.model_name
    before = reg.get_alias(model, alias)
    target = _guard(reg.rollback, model, alias)
    console.print(f"{model}: {alias} v{before} -> v{target}  (history {reg.alias_history(model, alias)})",
                  highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
