"""Agentless hosts as operators register them: how to reach each over SSH. No I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opsplane.domain.errors import InvalidInput
from opsplane.domain.targeting import check_host_name, normalize_names

# Never stored: these reach the link in memory for the request that brought them.
SECRET_FIELDS = frozenset(
    {"password", "private_key", "passphrase", "bastion_password", "bastion_private_key",
     "bastion_passphrase"}
)  # fmt: skip


@dataclass(frozen=True)
class SshHostRequest:
    name: str
    address: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    bastions: str = ""
    bastion_key_file: str | None = None
    groups: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)

    def validated(self) -> SshHostRequest:
        check_host_name(self.name)
        if not self.address.strip() or any(c.isspace() for c in self.address):
            raise InvalidInput(f"SSH address of {self.name} must be a host name or IP address")
        if not 0 < self.port < 65536:
            raise InvalidInput(f"SSH port must be within 1-65535, got {self.port}")
        unknown = set(self.secrets) - SECRET_FIELDS
        if unknown:
            raise InvalidInput(f"unknown secret fields: {', '.join(sorted(unknown))}")
        normalize_names(self.groups, "group")
        return self

    def stored(self) -> dict[str, Any]:
        """What the database keeps: everything but secrets."""
        return {
            "address": self.address,
            "port": self.port,
            "user": self.user,
            "key_file": self.key_file,
            "bastions": self.bastions,
            "bastion_key_file": self.bastion_key_file,
        }

    def for_link(self) -> dict[str, Any]:
        """What the link gets: the stored fields plus the in-memory secrets."""
        return {**self.stored(), **self.secrets}
