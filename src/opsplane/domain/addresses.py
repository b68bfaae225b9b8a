"""Network addresses as settings spell them (``HOST:PORT``): pure parsing, no I/O.

Here rather than in ``config.py`` so that the agent can check its ``--server`` without
importing the control plane's settings (pydantic-settings and its sources): see docs/scale.md,
"Agent footprint".
"""

from __future__ import annotations

import ipaddress
from typing import Final
from urllib.parse import urlsplit

# Where an agent dials unless told otherwise: the control plane's default gRPC endpoint.
DEFAULT_GRPC_ENDPOINT: Final = "127.0.0.1:50051"


def split_host_port(value: str) -> tuple[str, int]:
    """``"127.0.0.1:8000"`` → ``("127.0.0.1", 8000)``, with a clear error for anything else."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``******``: what may appear in a log line, an
    error or ``opsplane config show`` (database, RabbitMQ and webhook URLs alike)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        # Where the password sits in a string that is not a URL is anyone's guess.
        return "<unparsable URL>"
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:******@{host}").geturl()
