"""Many rows' different new values in one UPDATE per batch, on every backend (docs/scale.md,
"RabbitMQ on MariaDB, after the heartbeat and statement fixes").

An ``executemany`` of an UPDATE is one call for SQLAlchemy, but asyncmy runs it row by row (only
``INSERT … VALUES`` is batched): three 1,000-host broadcasts cost MariaDB ten thousand
single-row UPDATEs. Here the new values travel as a derived table of typed parameters joined on
the key — ``UPDATE t, (SELECT … UNION ALL SELECT …) AS v SET t.c = v.c WHERE t.k = v.k`` on
MySQL/MariaDB, ``UPDATE t SET c = v.c FROM (…) AS v WHERE t.k = v.k`` on PostgreSQL and SQLite
(≥ 3.33) — one statement per ``CHUNK`` rows.

A statement's shape is its number of rows, and SQLAlchemy's compiled-statement cache (an LRU of
500 entries per engine) keeps one compiled statement per shape, holding the construct and the
values of the first batch that had it: with a shape per batch size, every broadcast left up to
500 such statements of up to 500 rows behind (60 to 100 MiB of RSS per 5,000 hosts, docs/scale.md).
So a batch is padded to the next power of two rows by repeating its last row (the same key with
the same values: every backend updates that row once, with them): nine shapes per set of columns
(1, 2, 4 … ``CHUNK``), few enough to stay cached and to be reused; each is built once, with
named parameters, and the batch's values travel as the parameters of its execution.

Used for the writes whose rows are many and cheap to describe: heartbeats (``record_heartbeats``)
and host connections (``bulk_update_hosts``). Not for run state changes (the ORM's flush): an
ORM ``before_flush`` hook doing the same was tried and measured slower at 3,000 RabbitMQ agents
on MariaDB (docs/scale.md): building a 500-row UNION as SQLAlchemy expressions costs the control
plane's CPU more than the round trips it saves to a local MariaDB.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, bindparam, select, union_all, update
from sqlalchemy.sql.expression import ColumnElement

# Rows per statement, a power of two: SQLite allows 500 terms in a compound SELECT, and every
# backend a few tens of thousands of parameters (a host row changes about six columns).
CHUNK = 256


def padded_size(rows: int) -> int:
    """The rows a statement for ``rows`` rows (1 ≤ rows ≤ ``CHUNK``) carries: the next power
    of two, so that batches of any size share a few statement shapes."""
    return 1 << (rows - 1).bit_length()


def update_statements(
    table: Table,
    key: str,
    rows: Sequence[Mapping[str, Any]],
    fixed: Mapping[str, Any] | None = None,
) -> list[tuple[Any, dict[str, Any]]]:
    """UPDATEs of ``table`` (with their parameters) that set, in the row whose ``key`` column
    equals each row's ``key``, that row's other values (and ``fixed`` in every one): one per
    ``CHUNK`` rows of the same columns. A key matching no row changes nothing."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(sorted(row))].append(row)
    statements: list[tuple[Any, dict[str, Any]]] = []
    frozen = tuple(sorted((fixed or {}).items()))
    for columns, same in groups.items():
        assert key in columns, f"every row names its {key}"
        for start in range(0, len(same), CHUNK):
            chunk = same[start : start + CHUNK]
            size = padded_size(len(chunk))
            chunk = [*chunk, *[chunk[-1]] * (size - len(chunk))]
            parameters = {
                _name(i, j): row[c] for i, row in enumerate(chunk) for j, c in enumerate(columns)
            }
            statements.append((_statement(table, key, columns, size, frozen), parameters))
    return statements


def _name(row: int, column: int) -> str:
    # Never a column's name: the parameters of an UPDATE named like a column would set it.
    return f"bulk_{row}_{column}"


# The statements themselves, built once per shape: building a 256-row UNION as expressions
# cost more CPU than running it (py-spy: 7.5 % of a broadcast's samples in heartbeats' batches).
@functools.lru_cache(maxsize=128)
def _statement(
    table: Table,
    key: str,
    columns: tuple[str, ...],
    size: int,
    fixed: tuple[tuple[str, Any], ...],
) -> Any:
    # Typed parameters: PostgreSQL casts each one (a bare parameter in a UNION is text), and
    # the columns' own types (UTC datetimes, clean text, JSON) process the values as for an
    # UPDATE.
    selects = [
        select(
            *(bindparam(_name(i, j), type_=table.c[c].type).label(c) for j, c in enumerate(columns))
        )
        for i in range(size)
    ]
    values = (union_all(*selects) if len(selects) > 1 else selects[0]).subquery("v")
    assignments: dict[str, ColumnElement[Any] | Any] = {c: values.c[c] for c in columns if c != key}
    assignments.update(dict(fixed))
    return update(table).where(table.c[key] == values.c[key]).values(assignments)
