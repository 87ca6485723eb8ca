"""The loop's commands: `raysys train`, `distill`, `run` and `demo`."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from raysys.cli.common import (
    Address,
    ConfigFile,
    Preset,
    Root,
    absolute_config,
    console,
    guard,
    pipeline_config,
    setup_logging,
    start_ray,
    wait_forever,
)
from raysys.cli.progress import progress_extra, stage_progress
from raysys.cli.report import write_run_report
from raysys.config import PipelineConfig
from raysys.workflow.overrides import TEACHER_FAMILIES, TEACHER_SIZES, distill_overrides, train_overrides

log = logging.getLogger("raysys")
LOG_FILE = "raysys.log"  # under run_dir: the whole log of `raysys run`/`demo` (the console shows stage lines)


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
              "--teacher-size", help="tiny, small, base or large (teacher.size; implies ft_transformer).")] = None,
          gpu: Annotated[bool, typer.Option(
              "--gpu", help="One GPU per worker, bf16 by default (train.use_gpu; train.mixed_precision).")] = False):
    """Train and register the teacher with Ray Train (e.g. `raysys train --strategy zero3 --workers 4`)."""
    from raysys.workflow import stages

    for flag, value, allowed in (("--teacher-family", teacher_family, TEACHER_FAMILIES),
                                 ("--teacher-size", teacher_size, TEACHER_SIZES)):
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=flag)
    overrides = train_overrides(strategy, workers, dp, tp, pp, max_worker_memory_gb, teacher_family, teacher_size,
                                gpu=gpu)
    cfg = absolute_config(preset, config, root, overrides)
    setup_logging()
    start_ray(address)
    prep = guard(stages.stage_data, cfg)
    guard(stages.stage_quality, cfg, prep)
    _, version, metrics = guard(stages.stage_teacher, cfg, prep)
    console.print_json(json.dumps({"teacher_version": version, "test": metrics}))


def distill(preset: Preset = "demo", config: ConfigFile = None, root: Root = None, address: Address = None,
            teacher: Annotated[str, typer.Option(help="Teacher version or alias in the registry.")] = "latest",
            search: Annotated[str | None, typer.Option(help="grid, optuna or random (default from config).")] = None,
            num_samples: Annotated[int | None, typer.Option(help="Trials of an optuna/random search.")] = None,
            resume_sweep: Annotated[str | None, typer.Option(
                "--resume-sweep", help="Go on with this interrupted sweep (its directory under <root>/runs, "
                                       "named in the log when it started) instead of a new one.")] = None):
    """Distill the registered teacher with a Ray Tune sweep (ASHA + Optuna by default); register the chosen
    student (production) and its int8 variant (candidate), each with a model card."""
    from raysys.workflow.stages import load_teacher, stage_data, stage_distill, stage_quality

    cfg = absolute_config(preset, config, root, distill_overrides(search, num_samples))
    setup_logging()
    start_ray(address)
    prep = guard(stage_data, cfg)
    guard(stage_quality, cfg, prep)  # the teacher's run wrote the report: reused, for the student's card
    model, t_version, t_metrics = guard(load_teacher, cfg, teacher)
    version, metrics, best = guard(stage_distill, cfg, prep, model, t_version, t_metrics, resume_sweep=resume_sweep)
    keys = ("accuracy", "macro_f1", "num_parameters", "teacher_agreement", "teacher_accuracy", "int8_variant")
    console.print_json(json.dumps({"student_version": version, "best": best,
                                   "test": {k: metrics.get(k) for k in keys}}, default=str))
    console.print(f"model card: raysys registry show production --root {root or '.'}", highlight=False)


def run(preset: Preset = "demo", config: ConfigFile = None, root: Root = None, address: Address = None):
    """Data -> teacher -> distillation -> registry, without serving; then the HTML report (`raysys report`)."""
    from raysys.workflow.stages import absolute, run_pipeline

    cfg = pipeline_config(preset, config, root)
    setup_logging(_log_file(cfg))
    start_ray(address, quiet=True)
    with stage_progress(console):
        result = guard(run_pipeline, cfg)
    console.print_json(json.dumps(result.summary()))
    write_run_report(absolute(cfg))


def demo(preset: Preset = "demo", config: ConfigFile = None,
         root: Annotated[Path, typer.Option("--root", help="Directory for data, runs and registry.")] = Path("runs"),
         address: Address = None,
         port: Annotated[int | None, typer.Option(help="HTTP port (default 8000).")] = None,
         exit_: Annotated[bool, typer.Option("--exit", help="Stop once the report is printed.")] = False,
         fresh: Annotated[bool, typer.Option(help="Delete earlier runs under --root first (data is kept).")] = True):
    """The whole loop on an embedded local Ray: train, distill, register, serve, send normal then drifted
    traffic, print the monitor's report; keep the endpoint up until Ctrl-C (or --exit)."""
    from raysys.cli.serve import serve_endpoint
    from raysys.workflow.cluster import dashboard_url
    from raysys.workflow.stages import run_pipeline
    from raysys.workflow.traffic import exercise_endpoint

    cfg = absolute_config(preset, config, root)
    if fresh:
        _remove_earlier_runs(cfg)
    setup_logging(_log_file(cfg))
    t0 = time.perf_counter()
    ctx = start_ray(address, serving=True, quiet=True)
    with stage_progress(console):
        result = guard(run_pipeline, cfg)
    console.rule("pipeline")
    console.print_json(json.dumps(result.summary()), indent=None)
    with stage_progress(console):
        log.info("[serve] deploying the endpoint", extra=progress_extra("serve", "start"))
        url = guard(serve_endpoint, cfg, port)
        log.info("[serve] up at %s", url, extra=progress_extra("serve", "done"))
    traffic = exercise_endpoint(cfg, url)
    _print_traffic_reports(traffic)
    _record_monitor_reports(cfg, traffic)
    write_run_report(cfg)
    console.print(f"loop completed in {time.perf_counter() - t0:.0f}s")
    console.print(f"Ray dashboard: [bold]{dashboard_url(ctx)}[/]   HTTP endpoint: [bold]{url}[/]")
    example = json.dumps({"instances": _one_row(cfg)})
    console.print(f"try: curl -X POST {url}/v1/predict -H 'content-type: application/json'{_auth_flag()} "
                  f"-d '{example}'", highlight=False, soft_wrap=True)
    if not exit_ and not os.environ.get("CI"):
        wait_forever()


def _log_file(cfg: PipelineConfig) -> Path | None:
    """Where `run`/`demo` keep their whole log (None for a remote run_dir: then the console gets all of it)."""
    return None if "://" in cfg.run_dir else Path(cfg.run_dir) / LOG_FILE


def _auth_flag() -> str:
    """The curl flag that sends the endpoint's key, when this process knows where it is."""
    from serve.apikey import API_TOKEN_ENV, API_TOKEN_FILE_ENV

    if os.environ.get(API_TOKEN_ENV):
        return f' -H "Authorization: Bearer ${API_TOKEN_ENV}"'
    if os.environ.get(API_TOKEN_FILE_ENV):
        return f' -H "Authorization: Bearer $(cat {os.environ[API_TOKEN_FILE_ENV]})"'
    return ""


def _remove_earlier_runs(cfg: PipelineConfig) -> None:
    import shutil

    for d in (cfg.run_dir, cfg.registry_uri):
        if "://" not in d and Path(d).exists():
            shutil.rmtree(d)
    if "://" not in cfg.registry_uri:  # the monitor reports of earlier demos belong to their (deleted) models
        from raysys.report.monitor_data import REPORTS_FILE

        (Path(cfg.registry_uri).parent / REPORTS_FILE).unlink(missing_ok=True)


def _record_monitor_reports(cfg: PipelineConfig, out: dict) -> None:
    """Keep the monitor's report after each traffic phase beside the run, for the HTML report's time series."""
    from raysys.report import record_monitor_report, run_root

    if (root := run_root(cfg.registry_uri)) is not None:
        record_monitor_report(root, out["normal_report"], "normal traffic")
        record_monitor_report(root, out["drift_report"], f"shifted {out['shift_sigma']} sigma on {out['drift_feature']}")


def _print_traffic_reports(out: dict) -> None:
    from raysys.workflow.traffic import REPORT_CELL_WIDTH, format_report

    console.rule("monitor after normal traffic")
    columns = max(1, console.width // REPORT_CELL_WIDTH)
    console.print(format_report(out["normal_report"], columns, flagged_only=True), highlight=False)
    console.rule(f"monitor after traffic shifted {out['shift_sigma']} sigma on {out['drift_feature']}")
    console.print(format_report(out["drift_report"], columns, flagged_only=True), highlight=False)
    console.rule("summary")
    console.print(f"bad request -> HTTP {out['bad_request']['status']}: {json.dumps(out['bad_request']['body'])}",
                  highlight=False)


def _one_row(cfg: PipelineConfig) -> list[dict]:
    from raysys.workflow.traffic import traffic_rows

    rows = traffic_rows(cfg, 1, seed=3)
    return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
