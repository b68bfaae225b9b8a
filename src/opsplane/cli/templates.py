"""``opsplane templates``: list, show, create and launch job templates (docs/templates.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
import yaml
from rich.table import Table
from rich.text import Text

from opsplane.cli.client import ApiClient, CliError, Json
from opsplane.cli.output import dump_json, make_console, reporting_errors
from opsplane.cli.run import client_options

app = typer.Typer(no_args_is_help=True, help="List, show, create and launch job templates.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="NAME=VALUE (repeatable); reaches the command as "
                 "$PARAM_<NAME>, never as command text."),
]  # fmt: skip
HostOpt = Annotated[list[str] | None, typer.Option("--host", help="A target host (repeatable).")]
GroupOpt = Annotated[
    list[str] | None, typer.Option("--group", "-g", help="A target group (repeatable).")
]


def seg(value: str) -> str:
    return quote(value, safe="")


def parse_params(pairs: list[str] | None) -> dict[str, str]:
    """``NAME=VALUE`` pairs; the value may hold ``=`` and anything else, as it is."""
    params: dict[str, str] = {}
    for pair in pairs or []:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise CliError(f"--param takes NAME=VALUE, got {pair!r}")
        params[name] = value
    return params


def parse_param_spec(text: str) -> Json:
    """``NAME[:TYPE][=DEFAULT]``; a choice lists its values: ``mode:choice(soft|hard)=soft``."""
    head, equals, default = text.partition("=")
    name, _colon, kind = head.partition(":")
    spec: Json = {"name": name, "type": kind or "string"}
    if kind.startswith("choice(") and kind.endswith(")"):
        spec["type"] = "choice"
        spec["choices"] = kind[len("choice(") : -1].split("|")
    if equals:
        spec["default"] = default
    return spec


def targets(hosts: list[str] | None, groups: list[str] | None) -> Json | None:
    if not hosts and not groups:
        return None
    return {"hosts": hosts or [], "groups": groups or []}


def _items(result: Json | None) -> list[Json]:
    return [i for i in (result or {}).get("items", []) if isinstance(i, dict)]


def _targets_text(selector: Any) -> str:
    if not isinstance(selector, dict):
        return "-"
    parts = [*(f"host {h}" for h in selector.get("hosts") or [])]
    parts += [f"group {g}" for g in selector.get("groups") or []]
    parts += [f"{k}={v}" for k, v in (selector.get("labels") or {}).items()]
    if selector.get("all"):
        parts.append("all")
    return ", ".join(parts) or "-"


@app.command("list")
def list_templates(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the templates: name, version, parameters, default targets."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        result = api.call("GET", "/templates")
    if as_json:
        typer.echo(dump_json(result))
        return
    items = _items(result)
    if not items:
        err.print(Text("no templates yet: opsplane templates create NAME --command …", "dim"))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "VERSION", "PARAMETERS", "TARGETS", "DESCRIPTION"):
        table.add_column(column, no_wrap=column in ("NAME", "VERSION"))
    for item in items:
        params = ", ".join(f"{p['name']}:{p['type']}" for p in item.get("parameters") or [])
        table.add_row(
            str(item["name"]),
            str(item["version"]),
            params or "-",
            _targets_text(item.get("targets")),
            str(item.get("description") or ""),
        )
    make_console().print(table)


@app.command("show")
def show_template(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The template's name.")],
    version: Annotated[int | None, typer.Option("--version", help="An earlier version.")] = None,
) -> None:
    """Print a template's definition (its current version, or --version) as JSON."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        result = api.call("GET", f"/templates/{seg(name)}", params={"version": version})
    typer.echo(dump_json(result))


@app.command("create")
def create_template(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The template's name.")],
    command: Annotated[
        str | None, typer.Option("--command", "-c", help='Shell text; use "$PARAM_<NAME>".')
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="The whole definition (the API's body), YAML or JSON."),
    ] = None,
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="NAME[:TYPE][=DEFAULT]; TYPE string, int, secret or choice(a|b) (repeatable).",
        ),
    ] = None,
    host: HostOpt = None,
    group: GroupOpt = None,
    timeout: Annotated[int | None, typer.Option("--timeout", help="Seconds per run.")] = None,
    update: Annotated[
        bool, typer.Option("--update", help="Save as the next version of an existing template.")
    ] = False,
) -> None:
    """Create a template (or with --update, its next version)."""
    err = make_console(stderr=True)
    with reporting_errors(err):
        body: Json = {}
        if from_file is not None:
            loaded = yaml.safe_load(from_file.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise CliError(f"{from_file}: expected a mapping (the template's definition)")
            body.update(loaded)
        body["name"] = name
        if command is not None:
            body["command"] = command
        if "command" not in body:
            raise CliError("give --command or --file")
        if description:
            body["description"] = description
        if param:
            body["parameters"] = [parse_param_spec(p) for p in param]
        chosen = targets(host, group)
        if chosen is not None:
            body["targets"] = chosen
        if timeout is not None:
            body["timeout"] = timeout
        with ApiClient(client_options(ctx)) as api:
            if update:
                result = api.call("PUT", f"/templates/{seg(name)}", body=body)
            else:
                result = api.call("POST", "/templates", body=body)
    assert result is not None
    make_console().print(f"template {result['name']} version {result['version']} saved")


@app.command("launch")
def launch_template(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The template's name.")],
    param: ParamOpt = None,
    host: HostOpt = None,
    group: GroupOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Launch a template; prints the task's id (follow it with opsplane tasks show ID)."""
    err = make_console(stderr=True)
    with reporting_errors(err):
        body: Json = {"params": parse_params(param)}
        chosen = targets(host, group)
        if chosen is not None:
            body["targets"] = chosen
        with ApiClient(client_options(ctx)) as api:
            task = api.call("POST", f"/templates/{seg(name)}/launch", body=body)
    assert task is not None
    if as_json:
        typer.echo(json.dumps(task, indent=2))
        return
    typer.echo(task["id"])
