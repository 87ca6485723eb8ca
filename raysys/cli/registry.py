"""`raysys registry ...`: inspect the model registry and move aliases."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from raysys.cli.common import ConfigFile, Preset, Root, absolute_config, console, fail, guard

registry_app = typer.Typer(no_args_is_help=True, help="Inspect the model registry and move aliases.")

ModelName = Annotated[str | None, typer.Option("--name", help="Model name (default from config).")]


def _registry(preset: str, config, root):
    """(the configured registry, the config's model name)."""
    from raysys.registry import Registry

    cfg = absolute_config(preset, config, root)
    return Registry(cfg.registry_uri), cfg.model_name


@registry_app.command("list")
def registry_list(preset: Preset = "demo", config: ConfigFile = None, root: Root = None):
    """Models, their versions and aliases."""
    reg, _ = _registry(preset, config, root)
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
                  name: ModelName = None,
                  as_json: Annotated[bool, typer.Option("--json", help="Print the full JSON description.")] = False,
                  preset: Preset = "demo", config: ConfigFile = None, root: Root = None):
    """One version's model card (Markdown), or with --json its metrics, lineage, card and files."""
    from rich.markdown import Markdown

    reg, default_name = _registry(preset, config, root)
    model = name or default_name
    if as_json:
        desc = guard(reg.describe, model, ref)
        console.print_json(json.dumps(desc, default=str))
        return
    version, _, md = guard(reg.model_card, model, ref)
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
                     name: ModelName = None,
                     preset: Preset = "demo", config: ConfigFile = None, root: Root = None):
    """Point an alias (default production) at a version; the move is atomic and kept in the alias history."""
    reg, default_name = _registry(preset, config, root)
    model = name or default_name
    target = guard(reg.resolve, model, version)
    guard(reg.set_alias, model, alias, target)
    console.print(f"{model}: {alias} -> v{target}  (history {reg.alias_history(model, alias)})", highlight=False)


@registry_app.command("rollback")
def registry_rollback(alias: Annotated[str, typer.Option(help="Alias to move back.")] = "production",
                      name: ModelName = None,
                      preset: Preset = "demo", config: ConfigFile = None, root: Root = None):
    """Move an alias (default production) back to the version it pointed at before the current one."""
    reg, default_name = _registry(preset, config, root)
    model = name or default_name
    before = guard(reg.get_alias, model, alias)  # an invalid name or alias exits 2 with the rule
    target = guard(reg.rollback, model, alias)
    console.print(f"{model}: {alias} v{before} -> v{target}  (history {reg.alias_history(model, alias)})",
                  highlight=False)


@registry_app.command("export")
def registry_export(ref: Annotated[str, typer.Argument(help="Version number or alias to export.")] = "production",
                    mlflow: Annotated[bool, typer.Option(
                        "--mlflow", help="As an MLflow pyfunc model (needs raysys[mlflow]).")] = False,
                    mlflow_uri: Annotated[str | None, typer.Option(
                        "--mlflow-uri", help="MLflow tracking URI (implies --mlflow; default tracking.mlflow_uri, "
                                             "else sqlite:///<root>/mlflow.db).")] = None,
                    experiment: Annotated[str | None, typer.Option(
                        help="MLflow experiment of the export run (default tracking.experiment).")] = None,
                    name: ModelName = None,
                    preset: Preset = "demo", config: ConfigFile = None, root: Root = None):
    """Export a version as an MLflow model loadable with `mlflow.pyfunc.load_model` (models from code: safetensors
    weights + JSON spec, schema and preprocessor, no pickle), registered under the model's name with the
    version's aliases. The raysys registry stays the source of truth: exporting again reuses the MLflow version."""
    if not (mlflow or mlflow_uri):
        raise fail("export: name the target format: --mlflow (or --mlflow-uri URI)")
    from raysys.tracking.mlflow_export import export_version

    cfg = absolute_config(preset, config, root)
    model = name or cfg.model_name
    got = guard(export_version, cfg.registry_uri, model, ref, mlflow_uri or cfg.tracking.mlflow_uri,
                experiment=experiment or cfg.tracking.experiment)
    console.print(f"{model} v{got['version']} -> MLflow {got['uri']}: {got['model_uri']}"
                  + (f"  aliases: {', '.join(got['aliases'])}" if got["aliases"] else ""), highlight=False,
                  soft_wrap=True)
    console.print(f"load it: mlflow.pyfunc.load_model('{got['model_uri']}')", highlight=False, soft_wrap=True)
