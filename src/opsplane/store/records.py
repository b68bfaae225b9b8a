"""Copies of the store's rows as the domain's records (domain/records.py).

The services hand records, not rows, to their callers: a record cannot lazy-load, cannot be
flushed back by accident, and outlives the session that read it. One generic copier reads
the record's fields off the row by name, so a column added to both stays a one-line change.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from sqlalchemy import inspect

from opsplane.domain.paging import PageOf

R = TypeVar("R")


_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {}


def _field_names(kind: type[Any]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = tuple(field.name for field in fields(kind))
    return names


def record_of(kind: type[R], row: object) -> R:
    """A read-only copy of ``row`` as a ``kind`` record (the fields of ``kind``, by name).

    A column the query left out (a run's output, deferred unless asked for) is None in the
    copy: reading it would be a query per row, or fail once the session is gone."""
    state = inspect(row, raiseerr=False)
    unloaded = state.unloaded if state is not None else frozenset()
    return kind(
        **{name: None if name in unloaded else getattr(row, name) for name in _field_names(kind)}
    )


def records_of(kind: type[R], page: PageOf[Any]) -> PageOf[R]:
    """The same page with every row copied as a ``kind`` record."""
    return PageOf([record_of(kind, row) for row in page.items], page.total, page.next_cursor)
