"""Date arithmetic in SQL, the same on every backend: a timestamp column plus a number of
seconds that differs per row (a task's timeout), so a deadline is a WHERE, not a Python loop."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Float
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from opsplane.store.tables import UTCDateTime


class plus_seconds(FunctionElement[datetime]):
    """``timestamp + seconds``, with ``seconds`` any numeric SQL expression."""

    type = UTCDateTime()
    inherit_cache = True
    name = "plus_seconds"

    def __init__(self, timestamp: ColumnElement[Any], seconds: ColumnElement[Any]) -> None:
        super().__init__(timestamp, seconds)


def _args(
    element: plus_seconds, compiler: SQLCompiler, *, cast: bool = True, **kw: Any
) -> tuple[str, str]:
    timestamp, seconds = list(element.clauses)
    # A fractional grace added to an integer column stays fractional.
    seconds = seconds.cast(Float) if cast else seconds
    return compiler.process(timestamp, **kw), compiler.process(seconds, **kw)


@compiles(plus_seconds)
def _sqlite(element: plus_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff' text; %f keeps milliseconds, and the text
    # compares with a bound timestamp in the same layout.
    timestamp, seconds = _args(element, compiler, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f', {timestamp}, ({seconds}) || ' seconds')"


@compiles(plus_seconds, "postgresql")
def _postgresql(element: plus_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    timestamp, seconds = _args(element, compiler, **kw)
    return f"({timestamp} + ({seconds}) * INTERVAL '1 second')"


@compiles(plus_seconds, "mysql")
@compiles(plus_seconds, "mariadb")
def _mysql(element: plus_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    # Microseconds as an integer: a fractional SECOND interval is read differently by MySQL
    # and MariaDB versions.
    timestamp, seconds = _args(element, compiler, cast=False, **kw)
    return f"TIMESTAMPADD(MICROSECOND, ROUND(({seconds}) * 1000000), {timestamp})"
