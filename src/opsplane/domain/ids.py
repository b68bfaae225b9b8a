"""Identifiers: time-ordered UUIDv7, so run and event tables stay index-friendly (DESIGN §7)."""

from __future__ import annotations

import hashlib
import uuid

import uuid6

_TIME_BITS = 48
_REST_BITS = 128 - _TIME_BITS


def new_id() -> str:
    """A new UUIDv7 as its canonical string."""
    return str(uuid6.uuid7())


def run_id_for(task_id: str, host: str, attempt: int) -> str:
    """The id of ``host``'s run of ``task_id`` at ``attempt``: the same on the control plane and
    on the agent, so a group or broadcast message need not carry one id per host (docs/amqp.md).

    A UUIDv7 in shape: the task's 48-bit time prefix (runs sort with their task), then bits of
    a SHA-256 of the three parts, with the version and variant bits of a UUIDv7.
    """
    digest = hashlib.sha256(f"{task_id}\x00{host}\x00{attempt}".encode()).digest()
    rest = int.from_bytes(digest[: _REST_BITS // 8], "big")
    try:
        prefix = uuid.UUID(task_id).int >> _REST_BITS
    except ValueError:
        # Not one of our ids (a hand-made task id): the hash stands in for the time.
        prefix = int.from_bytes(digest[-_TIME_BITS // 8 :], "big")
    value = (prefix << _REST_BITS) | rest
    value &= ~(0xF << 76)
    value |= 0x7 << 76  # version 7
    value &= ~(0x3 << 62)
    value |= 0x2 << 62  # RFC 4122 variant
    return str(uuid.UUID(int=value))
