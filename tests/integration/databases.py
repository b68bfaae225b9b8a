"""Throwaway databases for tests: one fresh, uniquely named database per test on each backend.

``throwaway_database(backend, tmp_path)`` yields the URL of a new database (empty, or migrated
to opsplane's schema) and drops it afterwards, also when the test fails; creating and dropping
are bounded in time. PostgreSQL takes about 0.4 s to create a database, so databases with the
default settings are created a few ahead, and dropped, on a thread of their own while tests
run; the process drops those never taken and waits for pending drops before it exits.

A process killed before its cleanup leaves databases behind: the first creation on a server
sweeps leftovers older than ``STALE_AFTER`` (the names carry their creation time), so crashed
runs never accumulate and a concurrent run's databases are never touched.

Use ``backend_params()`` to parametrize a fixture over every backend (``server_params()`` for
the servers only), with the ``service`` markers: skipped on a laptop without the server, a
failure under CI=true.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import re
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from opsplane.store.database import create_engine
from opsplane.store.migrate import upgrade_to_head

# Match tests/conftest.py SERVICES: the marker checks the same address.
SERVER_URLS = {
    "mariadb": "mysql+asyncmy://root@127.0.0.1:3306",
    "postgresql": "postgresql+asyncpg://postgres@127.0.0.1:5432",
}
# Where the admin connection that creates and drops databases goes.
_ADMIN_DATABASE = {"mariadb": "test", "postgresql": "postgres"}

PREFIX = "opsplane_t_"
_NAME = re.compile(rf"^{PREFIX}(\d+)_[0-9a-f]+$")
STALE_AFTER = 2 * 3600  # seconds; far beyond any test's timeout
_BOUND = 30.0  # seconds for one create or drop, including a lingering connection
_AHEAD = 2  # databases created in advance per backend
_DEFAULT_CHARSET = "utf8mb4"

T = TypeVar("T")


def backend_params() -> list[Any]:
    """``pytest.param`` per backend, with the ``service`` marker where a server is needed."""
    return [pytest.param("sqlite", id="sqlite"), *server_params()]


def server_params() -> list[Any]:
    """``pytest.param`` per database server (every backend but SQLite), marked ``service``."""
    return [pytest.param(name, marks=[pytest.mark.service(name)], id=name) for name in SERVER_URLS]


def unique_name() -> str:
    return f"{PREFIX}{int(time.time())}_{secrets.token_hex(4)}"


def server_url(backend: str, database: str) -> str:
    return f"{SERVER_URLS[backend]}/{database}"


@asynccontextmanager
async def throwaway_database(
    backend: str,
    tmp_path: Path,
    *,
    migrated: bool = False,
    mysql_charset: str = _DEFAULT_CHARSET,
) -> AsyncIterator[str]:
    """A new database on ``backend``; yields its SQLAlchemy URL, drops it afterwards.

    The database is empty, or with ``migrated`` already at opsplane's newest schema (migrated
    ahead of time like the creation, for tests of what runs on top of the schema rather than
    of the migration). ``mysql_charset`` is the MySQL/MariaDB database's default character set,
    to check that opsplane does not depend on it."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / f'{unique_name()}.db'}"
        if migrated:
            await migrate(url)
        yield url
        return
    name = await asyncio.wait_for(
        asyncio.wrap_future(_MAKER.take(backend, mysql_charset, migrated)), _BOUND
    )
    try:
        yield server_url(backend, name)
    finally:
        # Dropped on the maker's thread: the test need not wait, and a test cancelled by its
        # timeout still drops what it took. The process waits for the drops before it exits.
        _MAKER.drop(backend, name)


async def create_database(backend: str, mysql_charset: str = _DEFAULT_CHARSET) -> str:
    """Create a new empty database now, in the caller's event loop; returns its name."""
    name = unique_name()
    async with asyncio.timeout(_BOUND):
        await _admin(backend, _create_sql(backend, name, mysql_charset))
    return name


async def drop_database(backend: str, name: str) -> None:
    async with asyncio.timeout(_BOUND):
        await _admin(backend, _drop_sql(backend, name))


async def migrate(url: str) -> None:
    """Bring the database at ``url`` to opsplane's newest schema."""
    engine = create_engine(url)
    try:
        async with asyncio.timeout(_BOUND):
            await upgrade_to_head(engine)
    finally:
        await engine.dispose()


class _Maker:
    """Creates databases ahead of the tests that take them, and drops them after, on an event
    loop in a thread of its own (each test has its own loop). When the process exits it drops
    what was never taken and waits for the drops still under way."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._ready: dict[tuple[str, bool], deque[concurrent.futures.Future[str]]] = {}
        self._dropping: list[concurrent.futures.Future[None]] = []
        self._swept: set[str] = set()

    def take(self, backend: str, charset: str, migrated: bool) -> concurrent.futures.Future[str]:
        if charset != _DEFAULT_CHARSET:
            return self._submit(self._create(backend, charset, migrated))
        with self._lock:
            ready = self._ready.setdefault((backend, migrated), deque())
            while len(ready) < _AHEAD + 1:
                ready.append(self._submit(self._create(backend, charset, migrated)))
            return ready.popleft()

    def drop(self, backend: str, name: str) -> None:
        future = self._submit(drop_database(backend, name))
        with self._lock:
            self._dropping = [f for f in self._dropping if not f.done()] + [future]

    async def _create(self, backend: str, charset: str, migrated: bool) -> str:
        if backend not in self._swept:
            self._swept.add(backend)
            await _sweep_stale(backend)
        name = await create_database(backend, charset)
        if migrated:
            await migrate(server_url(backend, name))
        return name

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(
                target=self._loop.run_forever, name="throwaway-databases", daemon=True
            ).start()
            atexit.register(self._at_exit)
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _at_exit(self) -> None:
        for (backend, _), ready in self._ready.items():
            for future in ready:
                try:
                    name = future.result(_BOUND)
                except Exception:
                    continue  # never created
                self.drop(backend, name)
        done, not_done = concurrent.futures.wait(self._dropping, timeout=_BOUND)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed or not_done:
            # Left for the sweep of a later run; say so rather than fail silently.
            print(
                f"throwaway databases: {len(failed) + len(not_done)} not dropped: {failed}",
                file=sys.stderr,
            )


_MAKER = _Maker()


def _create_sql(backend: str, name: str, mysql_charset: str) -> str:
    if backend == "mariadb":
        return f"CREATE DATABASE `{name}` CHARACTER SET {mysql_charset}"
    # Code-point order whatever the server's locale, as docs/operations.md recommends.
    return f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' LC_COLLATE 'C' TEMPLATE template0"


def _drop_sql(backend: str, name: str) -> str:
    if backend == "mariadb":
        return f"DROP DATABASE IF EXISTS `{name}`"
    # FORCE (PostgreSQL 13+) ends connections a failed test may have left open.
    return f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'


async def _admin(backend: str, *statements: str) -> list[Any]:
    """Run statements on the server outside a transaction (CREATE DATABASE needs that)."""
    engine = create_async_engine(
        server_url(backend, _ADMIN_DATABASE[backend]),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )
    try:
        results: list[Any] = []
        async with engine.connect() as connection:
            for statement in statements:
                result = await connection.execute(text(statement))
                results.append(result.scalars().all() if result.returns_rows else None)
        return results
    finally:
        await engine.dispose()


async def _sweep_stale(backend: str) -> None:
    listing = (
        "SHOW DATABASES"
        if backend == "mariadb"
        else "SELECT datname FROM pg_database WHERE NOT datistemplate"
    )
    (names,) = await _admin(backend, listing)
    cutoff = time.time() - STALE_AFTER
    stale = [name for name in names if (m := _NAME.match(name)) and int(m.group(1)) < cutoff]
    for name in stale:
        await _admin(backend, _drop_sql(backend, name))
