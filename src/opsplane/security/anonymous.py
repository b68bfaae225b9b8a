"""Anonymous seed clients (``compat_anonymous``): who an unauthenticated call to a seed API's
route is, if anyone. No I/O.

Off unless configured. A call that carries no credential at all, to a route of a seed API named
in ``compat_anonymous``, from a source address inside ``compat_anonymous_networks``, runs as the
configured principal (its name, role and groups), marked ``anonymous`` so that the audit trail
tells it from a login of the same name. Anything else is decided as before: no credential is a
401, a wrong credential is a 401 even where anonymous calls are allowed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from opsplane.security.roles import Principal, normalize_groups, parse_role

# The seed APIs that may be opened, and the routes of each (for the start-up warning and docs).
SEED_ROUTES = {
    "seed000": "/api/ssh/task*, /api/upload/task*",
    "seed003": "POST /tasks, GET /tasks/{id}, GET /tasks/{id}/logs",
    "seed004": "/list, /sync/…, /async/…, POST /{cluster-type}/{name}",
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def from_browser(headers: Mapping[str, str]) -> bool:
    """Whether a request was made by a web browser: it carries ``Origin`` or a ``Sec-Fetch-*``
    header, which browsers set themselves and pages cannot remove, and which the seeds' clients
    (curl, scripts) never send. A browser's request is never anonymous: any page the operator
    visits could otherwise make one to a loopback port (cross-site forms, DNS rebinding)."""
    names = (name.lower() for name in headers)
    return any(name == "origin" or name.startswith("sec-fetch-") for name in names)


@dataclass(frozen=True)
class AnonymousAccess:
    """The configured anonymous access: which seeds, as whom, from where."""

    seeds: frozenset[str]
    name: str
    role: str
    groups: frozenset[str] | None
    networks: tuple[Network, ...]

    @classmethod
    def build(
        cls,
        seeds: Iterable[str],
        *,
        name: str,
        role: str,
        groups: list[str],
        networks: Iterable[str],
    ) -> AnonymousAccess:
        the_role = parse_role(role)
        kept = normalize_groups(the_role, list(groups))
        return cls(
            seeds=frozenset(seeds),
            name=name,
            role=the_role.value,
            groups=frozenset(kept) if kept is not None else None,
            networks=tuple(ipaddress.ip_network(n, strict=False) for n in networks),
        )

    def covers(self, seed: str) -> bool:
        return seed in self.seeds

    def allows_source(self, source_ip: str | None) -> bool:
        """Whether a call from ``source_ip`` may be anonymous: inside a listed network. An
        unknown or unparsable source (no peer address, a Unix socket) never is."""
        if not source_ip:
            return False
        try:
            address = ipaddress.ip_address(source_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        return any(address in network for network in self.networks)

    def principal_for(
        self, seed: str | None, source_ip: str | None, *, browser: bool = False
    ) -> Principal | None:
        """The principal of a call without credentials to a route of ``seed`` (None: not a
        seed API's route) from ``source_ip``; None when it may not be anonymous, which a
        ``browser``'s call (``from_browser``) never may."""
        if browser or seed is None or not self.covers(seed):
            return None
        if not self.allows_source(source_ip):
            return None
        return Principal(
            name=self.name,
            role=self.role,
            groups=self.groups,
            via=f"anonymous:{seed}",
            anonymous=True,
        )

    def warnings(self) -> list[str]:
        """One line per opened seed API, logged at every start while the setting is on."""
        groups = ", ".join(sorted(self.groups)) if self.groups is not None else "every group"
        networks = ", ".join(str(n) for n in self.networks) or "nowhere"
        return [
            f"compat_anonymous: {seed}'s routes ({SEED_ROUTES[seed]}) answer calls WITHOUT "
            f"credentials from {networks} as {self.name!r} (role {self.role}, groups: "
            f"{groups}); every such call is audited as anonymous"
            for seed in sorted(self.seeds)
        ]
