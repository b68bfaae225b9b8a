"""``opsplane doctor``: check the settings' database, broker, keys, certificates, clock and
disk, one line each; the exit status is the worst line's (0 ok, 1 warn, 2 fail)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from opsplane.config import load_settings
from opsplane.domain.errors import ConfigError

EXIT_STATUS = {"ok": 0, "warn": 1, "fail": 2}
COLOURS = {"ok": "green", "warn": "yellow", "fail": "red"}


def doctor(
    config: Annotated[
        Path | None,
        typer.Option("--config", envvar="OPSPLANE_CONFIG_FILE", help="YAML settings file"),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="data directory")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL")] = None,
    amqp_url: Annotated[str | None, typer.Option(help="RabbitMQ URL")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per check")] = False,
) -> None:
    """Check the database, RabbitMQ, keys, certificates, clock and disk.

    The database reachable and its schema current, RabbitMQ reachable with its exchanges,
    keys present and mode 0600, TLS certificates not near expiry, the clock within 2 s of the
    database's, free disk in the data directory; exit status 0 ok, 1 warn, 2 fail."""
    from opsplane.doctor import examine, worst

    try:
        settings = load_settings(
            config_file=config, data_dir=data_dir, database_url=database_url, amqp_url=amqp_url
        )
    except ConfigError as e:
        typer.secho(f"fail  settings  {e}", fg="red", err=True)
        raise typer.Exit(EXIT_STATUS["fail"]) from e
    findings = asyncio.run(examine(settings))
    for finding in findings:
        if as_json:
            typer.echo(json.dumps(finding.__dict__))
            continue
        typer.secho(
            f"{finding.level:<5} {finding.check:<9} {finding.detail}", fg=COLOURS[finding.level]
        )
        if finding.hint and finding.level != "ok":
            typer.echo(f"{'':<15} → {finding.hint}")
    raise typer.Exit(EXIT_STATUS[worst(findings)])
