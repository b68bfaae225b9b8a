"""Which hosts a caller may act on: the group rule for operators, without I/O.

An operator is granted groups; a host is inside the grant when any of its groups is granted.
A request that reaches any host outside is refused as a whole (never silently narrowed), and the
refusal names the hosts, so that the caller sees exactly what to ask for or leave out.
"""

from __future__ import annotations

from collections.abc import Iterable

from opsplane.domain.errors import Forbidden
from opsplane.domain.targeting import HostRef

# A refusal lists this many host names at most; a broadcast can reach 10,000.
_NAMED = 20


def hosts_outside(allowed_groups: frozenset[str] | None, hosts: Iterable[HostRef]) -> list[str]:
    """Names of ``hosts`` (sorted) in none of ``allowed_groups``; none when unrestricted (None)."""
    if allowed_groups is None:
        return []
    return sorted(h.name for h in hosts if not allowed_groups.intersection(h.groups))


def check_hosts_allowed(allowed_groups: frozenset[str] | None, hosts: Iterable[HostRef]) -> None:
    """Forbidden, naming the hosts, unless every host is in one of ``allowed_groups``."""
    outside = hosts_outside(allowed_groups, hosts)
    if not outside:
        return
    named = ", ".join(outside[:_NAMED])
    more = f" and {len(outside) - _NAMED} more" if len(outside) > _NAMED else ""
    granted = ", ".join(sorted(allowed_groups or ())) or "none"
    raise Forbidden(f"not allowed on host(s) outside your groups ({granted}): {named}{more}")
