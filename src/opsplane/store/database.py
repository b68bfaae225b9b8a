"""Engine and session factory for the configured database URL."""

from __future__ import annotations

import logging
import re
import socket
from typing import Any

from sqlalchemy import URL, event, make_url
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from opsplane.domain.errors import ConfigError

log = logging.getLogger(__name__)

# The async driver opsplane installs for each backend, and the extra that brings it.
_DRIVERS = {
    "sqlite": "aiosqlite",
    "postgresql": "asyncpg",
    "mysql": "asyncmy",
    "mariadb": "asyncmy",
}
_EXTRAS = {"asyncmy": "mysql", "asyncpg": "postgres"}
_SERVERS = ("postgresql", "mysql", "mariadb")

# Pool per process: writes are serialized by the engine, so a few connections serve the API's
# reads and the live streams. Sized in docs/operations.md against the server's max_connections.
POOL_SIZE = 5
MAX_OVERFLOW = 10
# How long a request waits for a pooled connection before it is answered 503 (database
# unavailable, app_factory.py) rather than hanging while the server is gone.
POOL_TIMEOUT = 10.0
# MySQL closes connections idle past wait_timeout (8 h by default, often far less behind a
# proxy); recycling after an hour stays under any sensible setting. Pre-ping catches the rest.
MYSQL_POOL_RECYCLE = 3600
CONNECT_TIMEOUT = 10.0
# A server that stops answering without closing the connection (a dead network, a blackholed
# firewall) would hang a statement until the kernel gives up, some 15 minutes. Data the server
# has not acknowledged within this many seconds ends the connection instead (TCP_USER_TIMEOUT,
# Linux): the request gets 503 and ingest waits. A long statement on a live server is not
# affected: its bytes are acknowledged at once, however long the answer takes.
UNACKNOWLEDGED_TIMEOUT = 15.0


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``, set up for its backend; ConfigError when it cannot be.

    A URL without a driver gets opsplane's (``postgresql://`` → asyncpg, ``mysql://`` and
    ``mariadb://`` → asyncmy, ``sqlite://`` → aiosqlite). SQLite gets WAL, a busy timeout and
    foreign keys. MySQL/MariaDB connections use utf8mb4 (another charset is refused: it would
    lose emoji in output), READ COMMITTED as on PostgreSQL, and are recycled before the server
    drops them as idle. Server connections are pinged when taken from the pool, so a restarted
    database costs no request. Pool sizes and timeouts: docs/operations.md.
    """
    parsed = _with_async_driver(_parse(url))
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {}
    if backend in _SERVERS:
        options.update(
            pool_pre_ping=True,
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
            pool_timeout=POOL_TIMEOUT,
        )
    if backend in ("mysql", "mariadb"):
        charset = parsed.query.get("charset", "utf8mb4")
        if charset != "utf8mb4":
            raise ConfigError(
                f"database URL {masked_url(parsed)}: charset must be utf8mb4, not {charset}"
            )
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        options["pool_recycle"] = MYSQL_POOL_RECYCLE
        # PostgreSQL's default. InnoDB's REPEATABLE READ adds gap locks to every locking read,
        # which only makes instances that claim work with row locks deadlock more.
        options["isolation_level"] = "READ COMMITTED"
    if backend == "postgresql" and parsed.get_driver_name() == "asyncpg":
        # asyncpg waits 60 s for a server that does not answer; start-up should fail sooner.
        timeout = parsed.query.get("timeout", CONNECT_TIMEOUT)
        try:
            seconds = float(timeout)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise ConfigError(f"database URL {masked_url(parsed)}: timeout is not seconds") from e
        parsed = parsed.difference_update_query(["timeout"])
        options["connect_args"] = {"timeout": seconds}
    try:
        engine = create_async_engine(parsed, **options)
    except ModuleNotFoundError as e:
        extra = _EXTRAS.get(e.name or "")
        install = f"pip install 'opsplane[{extra}]'" if extra else f"pip install {e.name}"
        raise ConfigError(f"{parsed.drivername} needs the {e.name} package: {install}") from e
    except Exception as e:
        raise ConfigError(f"bad database URL {masked_url(parsed)}: {e}") from e
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        event.listen(engine.sync_engine, "do_connect", _connect_or_operational_error)
    return engine


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached now (refused, lost or timed-out
    connections, an exhausted pool, a server shutting down), rather than that a statement or
    a value is wrong: the first passes when the server returns, the second never does."""
    if isinstance(error, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        return error.connection_invalidated or isinstance(
            error, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return False


def _connect_or_operational_error(
    dialect: Dialect, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]
) -> Any:
    # asyncpg raises a bare ConnectionRefusedError (or TimeoutError) when the server is
    # unreachable, where asyncmy raises its OperationalError: one kind of error for both, so
    # that callers tell "the database is gone" from a bug the same way (is_unavailable).
    try:
        connection = dialect.connect(*cargs, **cparams)
    except OSError as e:
        raise dialect.loaded_dbapi.OperationalError(f"cannot connect: {e}") from e
    _bound_unacknowledged(connection)
    return connection


def _bound_unacknowledged(connection: Any) -> None:
    """Set TCP_USER_TIMEOUT on the connection's socket, where the platform and the driver
    allow (asyncpg and asyncmy both keep their asyncio transport as ``_transport``)."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    transport = getattr(getattr(connection, "driver_connection", None), "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if option is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, int(UNACKNOWLEDGED_TIMEOUT * 1000))
    except OSError as e:
        log.debug("cannot bound unacknowledged data on the database connection: %s", e)


def masked_url(url: str | URL) -> str:
    """``url`` fit for logs and error messages: the password, if any, becomes ``***``."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Where the password sits in a string that is not a URL is anyone's guess.
        return "<unparsable URL>"
    return parsed.render_as_string(hide_password=True)


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as e:
        # SQLAlchemy's message repeats the URL, password included.
        raise ConfigError(
            "bad database URL: expected dialect[+driver]://user:password@host[:port]/database"
        ) from e


def _with_async_driver(url: URL) -> URL:
    backend = url.get_backend_name()
    if backend == "postgres":  # Heroku-style spelling, long gone from SQLAlchemy
        url = url.set(drivername=re.sub(r"^postgres\b", "postgresql", url.drivername))
        backend = "postgresql"
    if "+" not in url.drivername and backend in _DRIVERS:
        url = url.set(drivername=f"{backend}+{_DRIVERS[backend]}")
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
