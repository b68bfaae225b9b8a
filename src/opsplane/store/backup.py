"""``opsplane db backup`` for the embedded SQLite database: SQLite's online backup API, which
copies a consistent snapshot while the server keeps writing (WAL mode), page by page.

MySQL/MariaDB and PostgreSQL have their own tools (``mysqldump --single-transaction``,
``pg_dump``): docs/operations.md, "Backups".
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import make_url

from opsplane.domain.errors import ConfigError
from opsplane.store.database import masked_url

# Pages copied per step: between steps the server's writers get the database back.
PAGES_PER_STEP = 1024


def sqlite_path(url: str) -> Path:
    """The database file of an SQLite URL; ConfigError for any other database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        raise ConfigError(
            f"opsplane db backup copies the embedded SQLite database; {masked_url(url)} is "
            "backed up with its own tools (mysqldump --single-transaction, pg_dump): "
            "docs/operations.md, Backups"
        )
    return Path(parsed.database)


def backup_sqlite(source: Path, target: Path) -> int:
    """Copy ``source`` to ``target`` (a new file) consistently while others write to it;
    returns the pages copied. The copy is checked with ``PRAGMA integrity_check``."""
    if not source.is_file():
        raise ConfigError(f"no database at {source}")
    if target.exists():
        raise ConfigError(f"{target} exists: back up to a new file")
    pages = 0

    def progress(_status: int, remaining: int, total: int) -> None:
        nonlocal pages
        pages = total - remaining

    with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as src:
        with sqlite3.connect(target) as dst:
            src.backup(dst, pages=PAGES_PER_STEP, progress=progress)
            (verdict,) = dst.execute("PRAGMA integrity_check").fetchone()
        dst.close()
    src.close()
    if verdict != "ok":
        raise ConfigError(f"the copy at {target} failed its integrity check: {verdict}")
    target.chmod(0o600)
    return pages
