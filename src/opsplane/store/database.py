"""Engine and session factory for the configured database URL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from opsplane.domain.errors import ConfigError

_DRIVER_EXTRAS = {"asyncmy": "mysql", "asyncpg": "postgres", "aiomysql": "mysql"}


def create_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite gets WAL, a busy timeout and foreign keys."""
    try:
        engine = create_async_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    except ModuleNotFoundError as e:
        extra = _DRIVER_EXTRAS.get(e.name or "", "the database driver")
        raise ConfigError(
            f"{url.split(':')[0]} needs {e.name}: pip install 'opsplane[{extra}]'"
        ) from e
    except Exception as e:
        raise ConfigError(f"bad database URL {url!r}: {e}") from e
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
