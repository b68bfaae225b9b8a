"""Settings of one agent daemon."""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Final

from opsplane.config import is_loopback, split_host_port
from opsplane.domain.errors import ConfigError

DEFAULT_SERVER: Final = "127.0.0.1:50051"
_FALLBACK_VERSION: Final = "0.1.0"

# Stands for "derive from the agent's name": the default spool directory depends on another
# field, which a dataclass default cannot express. A NUL byte makes it a path that can never
# be meant literally.
_DERIVED: Final = Path("\0derived")


def agent_version() -> str:
    """The installed opsplane version, as the agent reports it in its hello."""
    try:
        return metadata.version("opsplane")
    except metadata.PackageNotFoundError:
        return _FALLBACK_VERSION


def default_state_dir(name: str) -> Path:
    """Where an agent called ``name`` keeps its spool unless told otherwise."""
    return Path.home() / ".local" / "share" / "opsplane-agent" / name


def split_server(server: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into its parts, or raise ConfigError."""
    try:
        return split_host_port(server)
    except ValueError as e:
        raise ConfigError(f"server: {e}") from e


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent needs to know to join a control plane.

    ``state_dir`` defaults to ``~/.local/share/opsplane-agent/<name>``. Without ``tls_ca`` the
    agent connects in plaintext, which DESIGN §3.1 allows only to a loopback address unless
    ``allow_plaintext`` says otherwise; ``tls_cert``/``tls_key`` add a client certificate.
    """

    server: str = DEFAULT_SERVER
    name: str = field(default_factory=socket.gethostname)
    groups: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    state_dir: Path = _DERIVED
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_plaintext: bool = False
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    kill_grace: float = 5.0
    output_cap: int = 64 * 1024
    version: str = field(default_factory=agent_version)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in {".", ".."} or "\0" in self.name:
            raise ConfigError(f"agent name must be a plain host name, got {self.name!r}")
        if self.state_dir == _DERIVED:
            object.__setattr__(self, "state_dir", default_state_dir(self.name))
        host, _ = split_server(self.server)
        if self.tls_ca is None and not self.allow_plaintext and not is_loopback(host):
            raise ConfigError(
                f"refusing plaintext to {self.server}: set tls_ca, or allow_plaintext "
                "if the network in between is trusted"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ConfigError("a client certificate needs tls_ca as well")
        if not (0 < self.reconnect_initial <= self.reconnect_max) or not math.isfinite(
            self.reconnect_max
        ):
            raise ConfigError(
                "need 0 < reconnect_initial <= reconnect_max, got "
                f"{self.reconnect_initial} and {self.reconnect_max}"
            )
        if not (self.kill_grace >= 0 and math.isfinite(self.kill_grace)):
            raise ConfigError(f"kill_grace must be zero or more seconds, got {self.kill_grace}")
        if self.output_cap <= 0:
            raise ConfigError(f"output_cap must be a positive byte count, got {self.output_cap}")

    @property
    def host(self) -> str:
        """The control plane's host, without the port."""
        return split_server(self.server)[0]
