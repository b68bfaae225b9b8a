"""``value IN json_list_column`` in SQL, spelled per database: groups are stored as a JSON
list on the host row, and a filter by group must run in the database (a page of 100 hosts out
of 10,000 must not load the 10,000)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, bindparam
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


class json_list_contains(FunctionElement[bool]):
    """True when the JSON list in ``column`` holds the string ``value``."""

    type = Boolean()
    inherit_cache = True
    name = "json_list_contains"

    def __init__(self, column: Any, value: str) -> None:
        super().__init__(column, bindparam(None, value, unique=True))


def _parts(element: json_list_contains, compiler: SQLCompiler, **kw: Any) -> tuple[str, str]:
    column, value = list(element.clauses)
    return compiler.process(column, **kw), compiler.process(value, **kw)


@compiles(json_list_contains)
def _sqlite(element: json_list_contains, compiler: SQLCompiler, **kw: Any) -> str:
    column, value = _parts(element, compiler, **kw)
    return f"EXISTS (SELECT 1 FROM json_each({column}) WHERE json_each.value = {value})"


@compiles(json_list_contains, "postgresql")
def _postgresql(element: json_list_contains, compiler: SQLCompiler, **kw: Any) -> str:
    column, value = _parts(element, compiler, **kw)
    # The column is json (not jsonb); containment needs jsonb.
    return f"(CAST({column} AS jsonb) @> jsonb_build_array(CAST({value} AS text)))"


@compiles(json_list_contains, "mysql")
@compiles(json_list_contains, "mariadb")
def _mysql(element: json_list_contains, compiler: SQLCompiler, **kw: Any) -> str:
    column, value = _parts(element, compiler, **kw)
    return f"(JSON_CONTAINS({column}, JSON_QUOTE({value})) = 1)"
