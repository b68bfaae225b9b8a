"""``opsplane config``: the effective settings and the settings reference (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from opsplane.config import load_settings
from opsplane.config_report import reference_markdown, shown_settings
from opsplane.domain.errors import ConfigError

app = typer.Typer(no_args_is_help=True)


@app.command("show")
def show(
    config: Annotated[
        Path | None,
        typer.Option("--config", envvar="OPSPLANE_CONFIG_FILE", help="YAML settings file"),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data directory")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per setting")] = False,
) -> None:
    """Every setting's effective value and where it came from (flag, env, file, default);
    passwords in URLs and tokens are masked."""
    flags = {"config_file": config, "data_dir": data_dir, "database_url": database_url}
    try:
        settings = load_settings(**flags)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    rows = shown_settings(settings, flags)
    if as_json:
        for row in rows:
            typer.echo(json.dumps({"name": row.name, "value": row.value, "source": row.source}))
        return
    width = max(len(row.name) for row in rows)
    for row in rows:
        typer.echo(f"{row.name:<{width}}  {row.source:<7}  {row.value}")


@app.command("reference")
def reference() -> None:
    """Print docs/configuration.md: every setting, its variable, type, default and meaning."""
    typer.echo(reference_markdown(), nl=False)
