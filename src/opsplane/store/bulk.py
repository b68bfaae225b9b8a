"""Many rows' different new values in one UPDATE per batch, on every backend (docs/scale.md,
"One statement per batch").

An ``executemany`` of an UPDATE is one call for SQLAlchemy, but asyncmy runs it row by row (only
``INSERT … VALUES`` is batched): three 1,000-host broadcasts cost MariaDB ten thousand
single-row UPDATEs. Here the new values travel as a derived table of typed literals joined on
the key — ``UPDATE t, (SELECT … UNION ALL SELECT …) AS v SET t.c = v.c WHERE t.k = v.k`` on
MySQL/MariaDB, ``UPDATE t SET c = v.c FROM (…) AS v WHERE t.k = v.k`` on PostgreSQL and SQLite
(≥ 3.33) — one statement per ``CHUNK`` rows.

``bulk_flush`` applies the same to the ORM: installed on the sessions, it writes the dirty rows
of the hot tables (a batch of run results, hosts seen by the monitor) in such statements before
the unit of work would issue its executemany, so ``Changes.move`` keeps its plain attribute
assignments and the state machine stays where it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Table, inspect, literal, select, union_all, update
from sqlalchemy.orm import Session, UOWTransaction
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.expression import ColumnElement

from opsplane.store.tables import HostRow, RunRow

# Rows per statement: SQLite allows 500 terms in a compound SELECT, and every backend a few
# tens of thousands of parameters (a run row changes about eight columns).
CHUNK = 500

# Tables whose dirty ORM rows are flushed in bulk; a single dirty row is left to the ORM.
_BULK_CLASSES: tuple[type[Any], ...] = (RunRow, HostRow)


def update_statements(
    table: Table,
    key: str,
    rows: Sequence[Mapping[str, Any]],
    fixed: Mapping[str, Any] | None = None,
) -> list[Any]:
    """UPDATEs of ``table`` that set, in the row whose ``key`` column equals each row's
    ``key``, that row's other values (and ``fixed`` in every one): one per ``CHUNK`` rows of
    the same columns. A key matching no row changes nothing."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(sorted(row))].append(row)
    statements: list[Any] = []
    for columns, same in groups.items():
        assert key in columns, f"every row names its {key}"
        for start in range(0, len(same), CHUNK):
            statements.append(_statement(table, key, columns, same[start : start + CHUNK], fixed))
    return statements


def _statement(
    table: Table,
    key: str,
    columns: tuple[str, ...],
    rows: Sequence[Mapping[str, Any]],
    fixed: Mapping[str, Any] | None,
) -> Any:
    # Typed literals: PostgreSQL casts each one (a bare parameter in a UNION is text), and the
    # columns' own types (UTC datetimes, clean text, JSON) process the values as for an UPDATE.
    selects = [
        select(*(literal(row[c], table.c[c].type).label(c) for c in columns)) for row in rows
    ]
    values = (union_all(*selects) if len(selects) > 1 else selects[0]).subquery("v")
    assignments: dict[str, ColumnElement[Any] | Any] = {c: values.c[c] for c in columns if c != key}
    assignments.update(fixed or {})
    return update(table).where(table.c[key] == values.c[key]).values(assignments)


def bulk_flush(session: Session, _flush: UOWTransaction, _instances: Iterable[Any] | None) -> None:
    """``before_flush``: write the changed columns of the dirty rows of ``_BULK_CLASSES`` in
    one UPDATE per batch of rows that changed the same columns, then tell the ORM they are
    stored, so that its flush leaves them out."""
    changed: dict[type[Any], list[tuple[Any, dict[str, tuple[str, Any]]]]] = defaultdict(list)
    for obj in session.dirty:
        if isinstance(obj, _BULK_CLASSES):
            values = _changed_columns(obj)
            if values:
                changed[type(obj)].append((obj, values))
    for cls, items in changed.items():
        if len(items) < 2:
            continue
        table: Table = cls.__table__
        (key,) = (c.name for c in table.primary_key.columns)
        rows = [
            {**{column: value for column, value in values.values()}, key: getattr(obj, key)}
            for obj, values in items
        ]
        for statement in update_statements(table, key, rows):
            session.connection().execute(statement)
        for obj, values in items:
            for attr, (_, value) in values.items():
                set_committed_value(obj, attr, value)


def _changed_columns(obj: Any) -> dict[str, tuple[str, Any]] | None:
    """Per changed attribute of ``obj``, its column and new value; None when the ORM must
    flush it itself (a changed primary key, or a change other than a column's)."""
    state = inspect(obj)
    if not state.persistent or state.deleted:
        return None
    mapper = state.mapper
    values: dict[str, tuple[str, Any]] = {}
    for attr in state.attrs:
        history = attr.history
        if not history.has_changes():
            continue
        columns = getattr(mapper.get_property(attr.key), "columns", None)
        if not columns or len(columns) != 1 or columns[0].primary_key or not history.added:
            return None
        values[attr.key] = (columns[0].name, history.added[0])
    return values
