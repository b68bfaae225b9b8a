"""Keyset pagination in SQL: one helper for every list endpoint (domain.paging holds the
cursor format)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import and_, func, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from opsplane.domain.paging import KeyValue, PageOf, PageRequest, decode_cursor, encode_cursor

R = TypeVar("R")


@dataclass(frozen=True)
class Keyset:
    """The order of a list: unique, non-null columns, all ascending or all descending, and the
    Python type of each (for the cursor). ``kind`` names the list in its cursors, so that a
    cursor of one list is refused by another."""

    kind: str
    columns: Sequence[Any]  # mapped attributes or column expressions
    types: Sequence[type]
    descending: bool = False

    def order_by(self) -> list[ColumnElement[Any]]:
        return [column.desc() if self.descending else column.asc() for column in self.columns]

    def after(self, key: Sequence[KeyValue]) -> ColumnElement[bool]:
        """Rows strictly after ``key`` in this order. Spelled as ``a > x OR (a = x AND b > y)``
        rather than a row-value comparison, which MySQL plans poorly."""
        branches = []
        for i, column in enumerate(self.columns):
            equal = [self.columns[j] == key[j] for j in range(i)]
            beyond = column < key[i] if self.descending else column > key[i]
            branches.append(and_(*equal, beyond))
        return or_(*branches)


async def keyset_page(
    session: AsyncSession,
    stmt: Any,  # a Select (its row type varies)
    keyset: Keyset,
    request: PageRequest,
    key_of: Callable[[Any], Sequence[KeyValue]],
    *,
    scalars: bool = True,
    count: bool = True,
) -> PageOf[Any]:
    """A page of ``stmt`` (filters applied, no ORDER BY) in ``keyset`` order: after the
    request's cursor, or at its offset. One extra row is read to know whether a next page
    exists; ``total`` counts every match (one ``COUNT(*)`` with the same filters), or is -1
    when ``count`` is false. ``key_of`` gives a result row's key."""
    total = -1
    if count:
        counting = stmt.with_only_columns(func.count(), maintain_column_froms=True).order_by(None)
        total = int((await session.execute(counting)).scalar_one())
    page = stmt.order_by(*keyset.order_by())
    if request.cursor is not None:
        page = page.where(keyset.after(decode_cursor(keyset.kind, request.cursor, keyset.types)))
    elif request.offset:
        page = page.offset(request.offset)
    result = await session.execute(page.limit(request.limit + 1))
    rows: list[Any] = list(result.scalars()) if scalars else [tuple(row) for row in result]
    more = len(rows) > request.limit
    rows = rows[: request.limit]
    next_cursor = encode_cursor(keyset.kind, key_of(rows[-1])) if more and rows else None
    return PageOf(items=rows, total=total, next_cursor=next_cursor)
