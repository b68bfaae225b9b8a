"""``opsplane systemd-unit server|agent|worker``: a systemd service unit for each process,
printed for the operator to install (docs/operations.md, "Service units")."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from opsplane.systemd import Role, unit_text


def systemd_unit(
    role: Annotated[Role, typer.Argument(help="server, agent or worker")],
    config: Annotated[
        Path, typer.Option("--config", help="the settings file the unit passes")
    ] = Path("/etc/opsplane/opsplane.yaml"),
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="data directory (the agent's state directory); default /var/lib/opsplane, "
            "for the agent /var/lib/opsplane-agent"
        ),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            help="the account it runs as [opsplane; root for the agent, which runs "
            "commands as other users]"
        ),
    ] = None,
    python: Annotated[
        Path, typer.Option(help="the Python that has opsplane installed [this one]")
    ] = Path(sys.executable),
) -> None:
    """Print a systemd unit for the server, an agent or a worker.

    It restarts on failure with growing delays; SIGTERM drains (no new work, running commands
    spooled or finished, writes committed) before the process ends."""
    agent = role is Role.agent
    text = unit_text(
        role,
        config=config,
        data_dir=data_dir or Path("/var/lib/opsplane-agent" if agent else "/var/lib/opsplane"),
        user=user or ("root" if agent else "opsplane"),
        python=python,
    )
    typer.echo(text, nl=False)
