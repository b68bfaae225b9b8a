"""Which hosts a task aims at: pure resolution of a target selector against known hosts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from opsplane.domain.errors import InvalidInput


@dataclass(frozen=True)
class Targets:
    """A selector: explicit host names, groups, hosts carrying every given label (``labels``,
    key → value), or the whole fleet. The selected hosts are the union of these."""

    hosts: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    all: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.hosts or self.groups or self.all or self.labels)


@dataclass(frozen=True)
class HostRef:
    """What targeting needs to know of a host. ``adhoc``: an SSH target a seed-000 request
    brought, not an inventory host: only its name selects it."""

    name: str
    groups: tuple[str, ...] = field(default=())
    labels: Mapping[str, str] = field(default_factory=dict)
    adhoc: bool = False


_ADHOC_HINT = (
    " (only ad-hoc SSH targets of seed-000 requests match, and those are selected by name "
    "only: name them, or add them to the inventory with `opsplane hosts add`)"
)


def resolve_targets(targets: Targets, known: Iterable[HostRef]) -> list[str]:
    """Host names selected by ``targets``, sorted, each once.

    Unknown host names and groups with no member are errors, so that a typo never turns into a
    silently smaller fleet. Ad-hoc hosts are selected by their name only: never by ``all``, a
    group or a label, so that a target somebody once sent a seed-000 request to does not
    become part of every later fleet-wide task.
    """
    if targets.is_empty():
        raise InvalidInput("targets select nothing: give hosts, groups, labels, or all=true")
    known = list(known)
    by_name = {h.name: h for h in known}
    inventory = [h for h in known if not h.adhoc]
    chosen: set[str] = set()
    if targets.all:
        chosen.update(h.name for h in inventory)
    missing = [name for name in targets.hosts if name not in by_name]
    if missing:
        raise InvalidInput(f"unknown host(s): {names_excerpt(sorted(missing))}")
    chosen.update(targets.hosts)
    if targets.groups:
        # One pass over the fleet for every group asked for (not one per group).
        by_group: dict[str, list[str]] = {group: [] for group in targets.groups}
        for host in inventory:
            for group in host.groups:
                members = by_group.get(group)
                if members is not None:
                    members.append(host.name)
        empty = sorted(group for group, members in by_group.items() if not members)
        if empty:
            adhoc_groups = {group for h in known if h.adhoc for group in h.groups}
            hint = _ADHOC_HINT if adhoc_groups.intersection(empty) else ""
            raise InvalidInput(f"unknown group (no host is a member): {names_excerpt(empty)}{hint}")
        for members in by_group.values():
            chosen.update(members)
    if targets.labels:

        def carries(host: HostRef) -> bool:
            return all(host.labels.get(k) == v for k, v in targets.labels.items())

        labelled = [h.name for h in inventory if carries(h)]
        if not labelled:
            wanted = ", ".join(f"{k}={v}" for k, v in sorted(targets.labels.items()))
            hint = _ADHOC_HINT if any(carries(h) for h in known) else ""
            raise InvalidInput(f"no host carries all of the labels {wanted}{hint}")
        chosen.update(labelled)
    if not chosen:
        raise InvalidInput("targets match no host: the fleet is empty")
    return sorted(chosen)


def check_host_name(name: str) -> str:
    """``name`` if it can be a host's name, else InvalidInput. Names are keys in the store and
    routing-key words on RabbitMQ: no control characters, whitespace, or AMQP wildcards."""
    if not name or len(name) > 255:
        raise InvalidInput("a host name must have 1 to 255 characters")
    bad = sorted({c for c in name if c.isspace() or not c.isprintable() or c in "*#/"})
    if bad:
        raise InvalidInput(f"host name {name!r} contains characters not allowed: {bad!r}")
    return name


def normalize_names(names: Sequence[str], what: str) -> tuple[str, ...]:
    """Strip and de-duplicate names (first occurrence kept, in order), rejecting blanks."""
    cleaned: dict[str, None] = {}
    for name in names:
        stripped = name.strip()
        if not stripped:
            raise InvalidInput(f"{what} names must not be blank")
        cleaned[stripped] = None
    return tuple(cleaned)


def names_excerpt(names: Sequence[str], limit: int = 10) -> str:
    """``a, b, c`` — at most ``limit`` names, then how many more: an error message names a
    few, never echoes a hundred thousand back."""
    shown = ", ".join(name if len(name) <= 64 else name[:64] + "…" for name in names[:limit])
    more = len(names) - limit
    return f"{shown} and {more:,} more" if more > 0 else shown
