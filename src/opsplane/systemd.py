"""systemd service units for opsplane's processes: the text ``opsplane systemd-unit`` prints
and ``opsplane agents deploy`` installs (docs/operations.md, "Service units")."""

from __future__ import annotations

import shlex
from enum import StrEnum
from pathlib import Path


class Role(StrEnum):
    server = "server"
    agent = "agent"
    worker = "worker"


DESCRIPTIONS = {
    Role.server: "opsplane control plane",
    Role.agent: "opsplane agent",
    Role.worker: "opsplane SSH worker",
}


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
