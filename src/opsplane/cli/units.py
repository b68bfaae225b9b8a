"""``opsplane systemd-unit server|agent|worker``: a systemd service unit for each process,
printed for the operator to install (docs/operations.md, "Service units")."""

from __future__ import annotations

import shlex
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Role(StrEnum):
    server = "server"
    agent = "agent"
    worker = "worker"


DESCRIPTIONS = {
    Role.server: "opsplane control plane",
    Role.agent: "opsplane agent",
    Role.worker: "opsplane SSH worker",
}


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


def unit_text(role: Role, *, config: Path, data_dir: Path, user: str, python: Path) -> str:
    quote = shlex.quote
    if role is Role.agent:
        # The agent's flags come from its environment file (OPSPLANE_AGENT_SERVER, _NAME, …):
        # docs/agent-policy.md; it keeps its key and spool in the state directory.
        command = f"{quote(str(python))} -m opsplane agent"
        environment = (
            "EnvironmentFile=-/etc/opsplane/agent.env\n"
            f"Environment=OPSPLANE_AGENT_STATE_DIR={quote(str(data_dir))}\n"
        )
    elif role is Role.worker:
        # The worker reads the broker from OPSPLANE_AMQP_URL (the environment file): no
        # settings file, no data directory.
        command = f"{quote(str(python))} -m opsplane worker"
    else:
        command = (
            f"{quote(str(python))} -m opsplane server --config {quote(str(config))} "
            f"--data-dir {quote(str(data_dir))}"
        )
    if role is not Role.agent:
        environment = "EnvironmentFile=-/etc/opsplane/opsplane.env\n"
    # systemd creates (and hands to User=) a state directory under /var/lib only.
    state = f"StateDirectory={data_dir.name}\n" if data_dir.parent == Path("/var/lib") else ""
    return f"""[Unit]
Description={DESCRIPTIONS[role]}
After=network-online.target
Wants=network-online.target
# Never give up restarting: an agent must come back after any outage.
StartLimitIntervalSec=0

[Service]
Type=exec
User={user}
{environment}ExecStart={command}
Restart=on-failure
RestartSec=2s
# systemd 254+: the delay grows from 2 s to 60 s over 5 restarts (older versions ignore these).
RestartSteps=5
RestartMaxDelaySec=60s
# SIGTERM drains; whatever is left after the timeout is killed with the whole group.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=90s
{state}NoNewPrivileges={"no" if role is Role.agent else "yes"}
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
"""
