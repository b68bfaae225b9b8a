"""How to reach an SSH host: endpoints, bastion chains and the host-key policy (DESIGN §3.4).

Plain values without I/O, so that the engine, the API and the config can build them. Secrets
(password, private key text, passphrase) never appear in ``repr`` or ``str``: these values end
up in log lines and error messages.
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsplane.domain.errors import InvalidInput

DEFAULT_PORT = 22

# "user@host:port", "host", "[v6addr]:port", "user@[v6addr]"; an optional ssh:// prefix.
_SPEC = re.compile(
    r"^(?:ssh://)?(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]\s]+)\]|(?P<host>[^:@\s\[\]]+))"
    r"(?::(?P<port>\d+))?/?$"
)


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        # A container may run as a uid without a passwd entry and without $USER.
        return "root"


@dataclass(frozen=True)
class SshEndpoint:
    """One SSH server to log in to: a target, or one hop of a bastion chain.

    Credentials: ``key_file`` (a path, read when first used) or ``private_key`` (PEM/OpenSSH
    text), with ``passphrase`` if the key is encrypted, and/or ``password``. With none of
    them, the default keys of the running user (``~/.ssh/id_*``) and a running ssh-agent
    (``SSH_AUTH_SOCK``) are tried, like ``ssh`` does.
    """

    host: str
    port: int = DEFAULT_PORT
    username: str = field(default_factory=_current_user)
    password: str | None = field(default=None, repr=False)
    key_file: str | None = None
    private_key: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host):
            raise InvalidInput(f"invalid SSH host {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise InvalidInput(f"SSH port must be an integer, got {self.port!r}")
        if not 0 < self.port < 65536:
            raise InvalidInput(f"SSH port must be within 1-65535, got {self.port}")
        if not self.username:
            raise InvalidInput(f"SSH user for {self.host} must not be empty")
        if self.key_file is not None and self.private_key is not None:
            raise InvalidInput(f"give {self.address} a key_file or a private_key, not both")

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets), the form used in messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """How this server is named in a known_hosts file (``[host]:port`` off port 22)."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    @property
    def auth_methods(self) -> str:
        """What will be offered at login, for error messages (never the secrets themselves)."""
        offered = []
        if self.key_file is not None:
            offered.append(f"key file {self.key_file}")
        if self.private_key is not None:
            offered.append("inline private key")
        if self.password is not None:
            offered.append("password")
        if not offered:
            offered.append("default keys and ssh-agent")
        return ", ".join(offered)

    def __str__(self) -> str:
        return f"{self.username}@{self.address}"

    def __repr__(self) -> str:
        secrets = [
            name
            for name in ("password", "private_key", "passphrase")
            if getattr(self, name) is not None
        ]
        shown = f"SshEndpoint(host={self.host!r}, port={self.port}, username={self.username!r}"
        if self.key_file is not None:
            shown += f", key_file={self.key_file!r}"
        if secrets:
            shown += f", secrets=<{','.join(secrets)}>"
        return shown + ")"

    @classmethod
    def parse(cls, spec: str, **options: Any) -> SshEndpoint:
        """``[user@]host[:port]`` (``[v6addr]`` in brackets); ``options`` are further fields.

        A user or port given in ``options`` is a default that the spec overrides, so that
        ``parse("web-7", username="ops")`` and ``parse("root@web-7", username="ops")`` both
        do what they say.
        """
        match = _SPEC.match(spec.strip())
        if match is None:
            raise InvalidInput(f"invalid SSH address {spec!r}, expected [user@]host[:port]")
        fields = dict(options)
        fields["host"] = match["v6"] or match["host"]
        if match["user"]:
            fields["username"] = match["user"]
        if match["port"]:
            fields["port"] = int(match["port"])
        try:
            return cls(**fields)
        except TypeError as e:
            raise InvalidInput(f"invalid SSH endpoint options: {e}") from e

    @classmethod
    def parse_chain(cls, spec: str, **options: Any) -> tuple[SshEndpoint, ...]:
        """A ProxyJump-style chain ``ops@edge:22,ops@inner``, outermost first.

        ``options`` (credentials, a default user) apply to every hop; use
        ``dataclasses.replace`` for hops that differ. An empty spec is an empty chain.
        """
        hops = [part.strip() for part in spec.split(",")] if spec.strip() else []
        if any(not hop for hop in hops):
            raise InvalidInput(f"invalid bastion chain {spec!r}: empty hop")
        return tuple(cls.parse(hop, **options) for hop in hops)


@dataclass(frozen=True)
class SshTarget:
    """A host as the engine names it, and how to reach it: through ``bastions`` in order."""

    name: str
    endpoint: SshEndpoint
    bastions: tuple[SshEndpoint, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInput("an SSH target needs a name")
        # A list would make the value unhashable and mutable behind the pool's back.
        object.__setattr__(self, "bastions", tuple(self.bastions))

    @property
    def chain(self) -> tuple[SshEndpoint, ...]:
        """Every hop, outermost bastion first, the target itself last."""
        return (*self.bastions, self.endpoint)

    def __str__(self) -> str:
        via = f" via {','.join(str(b) for b in self.bastions)}" if self.bastions else ""
        return f"{self.name} ({self.endpoint}{via})"


@dataclass(frozen=True)
class HostKeyPolicy:
    """How server host keys are checked, on every hop (bastions too).

    ``known_hosts`` is an OpenSSH known_hosts file (``None``: ``~/.ssh/known_hosts`` of the
    running user); a missing file trusts nothing. With ``trust_on_first_use`` a server that
    has no entry at all is accepted and its key appended to the file; a server whose entry
    lists other keys (a changed key) is always refused. There is no way to accept any key.
    """

    known_hosts: Path | None = None
    trust_on_first_use: bool = False

    @property
    def path(self) -> Path:
        if self.known_hosts is not None:
            return Path(self.known_hosts).expanduser()
        return Path.home() / ".ssh" / "known_hosts"
