"""Settings of one agent daemon."""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import SplitResult, urlsplit

from opsplane import __version__
from opsplane.agent.policy import CommandPolicy, RunAsPolicy, resolve_run_as
from opsplane.domain.addresses import DEFAULT_GRPC_ENDPOINT, is_loopback, split_host_port
from opsplane.domain.addresses import mask_url as mask_url
from opsplane.domain.errors import ConfigError, InvalidInput
from opsplane.execution.environment import check_passthrough
from opsplane.security.signing import load_public_key

DEFAULT_SERVER: Final = DEFAULT_GRPC_ENDPOINT

# Stands for "derive from the agent's name": the default spool directory depends on another
# field, which a dataclass default cannot express. A NUL byte makes it a path that can never
# be meant literally.
_DERIVED: Final = Path("\0derived")


def agent_version() -> str:
    """The opsplane version, as the agent reports it in its hello."""
    return __version__


def default_state_dir(name: str) -> Path:
    """Where an agent called ``name`` keeps its spool unless told otherwise."""
    return Path.home() / ".local" / "share" / "opsplane-agent" / name


def _split_amqp_url(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ConfigError(f"amqp_url: {e} in {mask_url(url)}") from e
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ConfigError(f"amqp_url must be amqp://… or amqps://…, got {mask_url(url)}")
    return parts


def _routing_word(value: str) -> bool:
    """Whether ``value`` can be a part of a topic routing key (and of a binding) as itself."""
    return bool(value) and not ({"*", "#"} & set(value)) and len(value.encode()) <= 200


def split_servers(servers: str) -> tuple[str, ...]:
    """The ``HOST:PORT`` entries of a comma-separated list (several control-plane
    instances, tried in turn), each checked; ConfigError for an empty or bad entry."""
    entries = tuple(entry.strip() for entry in servers.split(","))
    if not entries or any(not entry for entry in entries):
        raise ConfigError(f"server: expected HOST:PORT[,HOST:PORT...], got {servers!r}")
    for entry in entries:
        split_server(entry)
    return entries


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

    With ``amqp_url`` the agent talks to the control plane through RabbitMQ (DESIGN §3.2,
    docs/amqp.md) instead of dialing ``server``, which is then unused. That link needs
    ``control_plane_key`` (the pinned public key commands are verified with: base64 text or a
    file), refuses commands whose ``timestamp`` is more than ``replay_window`` seconds off,
    and beats every ``heartbeat_interval`` seconds (there is no welcome to learn it from, so it
    must match the control plane's setting). ``amqp://`` is plaintext and follows the same
    loopback rule as gRPC; ``amqps://`` is TLS.

    ``deny`` and ``allow`` are regular expressions over command text, ``run_as`` the user
    commands run as and ``allowed_run_as`` the others a command may ask for
    (``agent/policy.py``, docs/agent-policy.md); all are checked here, so that a bad pattern
    or an unknown user stops the agent from starting.
    """

    server: str = DEFAULT_SERVER
    name: str = field(default_factory=socket.gethostname)
    groups: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    state_dir: Path = _DERIVED
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # TLS (docs/tls.md): the name the server's certificate is checked against, if not the
    # host of ``server``; the CA and client certificate for an amqps:// ``amqp_url``.
    tls_server_name: str | None = None
    amqp_tls_ca: Path | None = None
    amqp_tls_cert: Path | None = None
    amqp_tls_key: Path | None = None
    allow_plaintext: bool = False
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    kill_grace: float = 5.0
    output_cap: int = 64 * 1024
    # Output kept on disk until the control plane has it, all runs together (agent/outbox.py).
    output_spool_bytes: int = 256 * 1024 * 1024
    version: str = field(default_factory=agent_version)
    amqp_url: str | None = None
    control_plane_key: str | None = None
    replay_window: float = 300.0
    heartbeat_interval: float = 10.0
    # Agent-side policy (issue 9).
    deny: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    run_as: str | None = None
    # The accounts a command may ask for besides the default (seed 002's ``user``); None:
    # any, for a root agent without run_as (docs/agent-policy.md, "Asked accounts").
    allowed_run_as: tuple[str, ...] | None = None
    # Variables of the agent's own environment that commands inherit beyond PATH, HOME,
    # LANG, LC_*, TZ… (names, or prefixes ending in '*'; never OPSPLANE_*): the agent's
    # environment may hold OPSPLANE_TOKEN and other credentials (docs/security.md).
    env_passthrough: tuple[str, ...] = ()
    # The directories uploads may write under (docs/filepush.md); none: uploads are refused.
    upload_roots: tuple[Path, ...] = ()
    # A ``.part`` file of an interrupted upload untouched this long (seconds) is deleted
    # when the agent starts; younger ones are kept for the push to resume from.
    upload_part_max_age: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in {".", ".."} or "\0" in self.name:
            raise ConfigError(f"agent name must be a plain host name, got {self.name!r}")
        if self.state_dir == _DERIVED:
            object.__setattr__(self, "state_dir", default_state_dir(self.name))
        if self.amqp_url is not None:
            self._check_amqp()
        else:
            for server in split_servers(self.server):
                host, _ = split_server(server)
                if self.tls_ca is None and not self.allow_plaintext and not is_loopback(host):
                    raise ConfigError(
                        f"refusing plaintext to {server}: set tls_ca, or allow_plaintext "
                        "if the network in between is trusted"
                    )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ConfigError("a client certificate needs tls_ca as well")
        if self.tls_server_name is not None and self.tls_ca is None:
            raise ConfigError("tls_server_name needs tls_ca: it names the certificate to verify")
        if self.amqp_tls_ca or self.amqp_tls_cert or self.amqp_tls_key:
            # Imported here: certificate handling is for amqps:// agents only.
            from opsplane.security.tls import amqp_ssl_context

            # Builds the context once now: a missing file or a bad pairing fails at start.
            amqp_ssl_context(
                self.amqp_url or "", self.amqp_tls_ca, self.amqp_tls_cert, self.amqp_tls_key
            )
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
        if self.output_spool_bytes <= 0:
            raise ConfigError(
                f"output_spool_bytes must be a positive byte count, got {self.output_spool_bytes}"
            )
        if not (self.replay_window > 0 and math.isfinite(self.replay_window)):
            raise ConfigError(f"replay_window must be positive seconds, got {self.replay_window}")
        if not (self.heartbeat_interval > 0 and math.isfinite(self.heartbeat_interval)):
            raise ConfigError(
                f"heartbeat_interval must be positive seconds, got {self.heartbeat_interval}"
            )
        self._check_policy()

    def _check_policy(self) -> None:
        # Lists (from YAML, say) become the tuples the type promises; a lone string is one
        # pattern, not one pattern per character.
        for key in ("deny", "allow"):
            value = getattr(self, key)
            object.__setattr__(self, key, (value,) if isinstance(value, str) else tuple(value))
        CommandPolicy(self.deny, self.allow)
        value = self.env_passthrough
        names = (value,) if isinstance(value, str) else tuple(value)
        try:
            object.__setattr__(self, "env_passthrough", check_passthrough(names))
        except InvalidInput as e:
            raise ConfigError(str(e)) from e
        default = resolve_run_as(self.run_as) if self.run_as is not None else None
        allowed = self.allowed_run_as
        if allowed is not None:
            allowed = (allowed,) if isinstance(allowed, str) else tuple(allowed)
            object.__setattr__(self, "allowed_run_as", allowed)
        RunAsPolicy.of(default, allowed)

    def run_as_policy(self) -> RunAsPolicy:
        """Which accounts commands may ask for, from ``run_as`` and ``allowed_run_as``."""
        default = resolve_run_as(self.run_as) if self.run_as is not None else None
        return RunAsPolicy.of(default, self.allowed_run_as)

    def _check_amqp(self) -> None:
        assert self.amqp_url is not None
        parts = _split_amqp_url(self.amqp_url)
        if (
            parts.scheme == "amqp"
            and not self.allow_plaintext
            and not is_loopback(parts.hostname or "")
        ):
            raise ConfigError(
                f"refusing plaintext AMQP to {parts.hostname}: use amqps://, or allow_plaintext "
                "if the network in between is trusted"
            )
        if not self.control_plane_key:
            # Without a pinned key anybody who can publish to sys_cmd_exchange could run
            # commands here: there is no unsafe default to fall back to.
            raise ConfigError(
                "amqp_url needs control_plane_key: the control plane's public key (base64 or "
                "a file), so that the agent can verify the commands it receives"
            )
        # Fails now, with a clear message, rather than at the first command.
        load_public_key(self.control_plane_key)
        # Names become words of topic routing keys: a wildcard would bind to other hosts'
        # commands, so it is refused here rather than filtered later.
        for word in (self.name, *self.groups):
            if not _routing_word(word):
                raise ConfigError(
                    f"{word!r} cannot be a host or group name on RabbitMQ: it must be "
                    "non-empty, without '*' or '#', and at most 200 bytes"
                )

    @property
    def link(self) -> str:
        """Which link the agent uses: ``amqp`` or ``grpc``."""
        return "grpc" if self.amqp_url is None else "amqp"

    @property
    def endpoint(self) -> str:
        """Where the agent connects, fit for a log line (an AMQP password is masked)."""
        return self.server if self.amqp_url is None else mask_url(self.amqp_url)

    @property
    def servers(self) -> tuple[str, ...]:
        """The control-plane instances to dial, in the order they are tried."""
        return split_servers(self.server)

    @property
    def host(self) -> str:
        """The first control plane's host, without the port."""
        return split_server(self.servers[0])[0]
