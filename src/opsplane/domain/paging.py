"""Pages of a list: what a caller asks for (a cursor, or an offset) and what it gets back.

A cursor is opaque to clients: the sort key of the last row a page held, tagged with the list
it belongs to, as base64url JSON. The next page starts strictly after that key, so rows
inserted or removed meanwhile never shift it (no duplicates, no gaps: keyset pagination).
An offset (``page``/``size``) is kept for the clients that use it; it is exact only while the
list does not change.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from opsplane.domain.errors import InvalidInput

T = TypeVar("T")
KeyValue = str | int | datetime | None
_MAX_CURSOR = 2048


@dataclass(frozen=True)
class PageRequest:
    """Either a ``cursor`` (the rows after it) or an ``offset``; at most ``limit`` rows."""

    limit: int
    cursor: str | None = None
    offset: int = 0

    @classmethod
    def of(cls, *, page: int, size: int, cursor: str | None) -> PageRequest:
        """From the API's ``page``, ``size`` and ``cursor``; both a page past the first and a
        cursor is refused (they name two different starting points)."""
        if cursor is not None and page != 1:
            raise InvalidInput("give either cursor or page, not both")
        return cls(limit=size, cursor=cursor or None, offset=0 if cursor else (page - 1) * size)


@dataclass(frozen=True)
class PageOf(Generic[T]):
    """One page: its rows, how many match in all, and the cursor of the next page (None after
    the last one)."""

    items: list[T]
    total: int
    next_cursor: str | None


def encode_cursor(kind: str, key: Sequence[KeyValue]) -> str:
    values = [value.isoformat() if isinstance(value, datetime) else value for value in key]
    text = json.dumps([kind, *values], separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str, types: Sequence[type]) -> tuple[KeyValue, ...]:
    """The key a cursor of list ``kind`` holds, one value per type in ``types``; InvalidInput
    (422) for anything this API did not hand out for that list."""
    problem = (
        f"cursor is not a cursor of this list ({kind}): pass the next_cursor of a previous "
        "answer unchanged, or leave it out for the first page"
    )
    if len(cursor) > _MAX_CURSOR:
        raise InvalidInput(problem)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(problem) from e
    if not isinstance(decoded, list) or len(decoded) != len(types) + 1 or decoded[0] != kind:
        raise InvalidInput(problem)
    key: list[KeyValue] = []
    for value, wanted in zip(decoded[1:], types, strict=True):
        key.append(_typed(value, wanted, problem))
    return tuple(key)


def _typed(value: object, wanted: type, problem: str) -> KeyValue:
    if value is None:
        return None
    if wanted is datetime and isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as e:
            raise InvalidInput(problem) from e
        if parsed.tzinfo is None:
            raise InvalidInput(problem)
        return parsed
    # An int within what every database's BIGINT holds.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if wanted is int and is_int and -(2**63) <= value < 2**63:  # type: ignore[operator]
        return value  # type: ignore[return-value]
    if wanted is str and isinstance(value, str) and "\x00" not in value and len(value) <= 255:
        return value
    raise InvalidInput(problem)
