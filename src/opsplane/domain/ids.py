"""Identifiers: time-ordered UUIDv7, so run and event tables stay index-friendly (DESIGN §7)."""

from __future__ import annotations

import uuid6


def new_id() -> str:
    """A new UUIDv7 as its canonical string."""
    return str(uuid6.uuid7())
