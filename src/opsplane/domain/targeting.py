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
    """What targeting needs to know of a host."""

    name: str
    groups: tuple[str, ...] = field(default=())
    labels: Mapping[str, str] = field(default_factory=dict)


def resolve_targets(targets: Targets, known: Iterable[HostRef]) -> list[str]:
    """Host names selected by ``targets``, sorted, each once.

    Unknown host names and groups with no member are errors, so that a typo never turns into a
    silently smaller fleet.
    """
    if targets.is_empty():
        raise InvalidInput("targets select nothing: give hosts, groups, labels, or all=true")
    hosts = list(known)
    by_name = {h.name: h for h in hosts}
    chosen: set[str] = set()
    if targets.all:
        chosen.update(by_name)
    missing = [name for name in targets.hosts if name not in by_name]
    if missing:
        raise InvalidInput(f"unknown host(s): {', '.join(sorted(missing))}")
    chosen.update(targets.hosts)
    for group in targets.groups:
        members = [h.name for h in hosts if group in h.groups]
        if not members:
            raise InvalidInput(f"unknown group (no host is a member): {group}")
        chosen.update(members)
    if targets.labels:
        labelled = [
            h.name for h in hosts if all(h.labels.get(k) == v for k, v in targets.labels.items())
        ]
        if not labelled:
            wanted = ", ".join(f"{k}={v}" for k, v in sorted(targets.labels.items()))
            raise InvalidInput(f"no host carries all of the labels {wanted}")
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
    """Strip and de-duplicate names, rejecting blanks."""
    cleaned: list[str] = []
    for name in names:
        stripped = name.strip()
        if not stripped:
            raise InvalidInput(f"{what} names must not be blank")
        if stripped not in cleaned:
            cleaned.append(stripped)
    return tuple(cleaned)
