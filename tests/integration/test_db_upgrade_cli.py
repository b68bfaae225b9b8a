"""`opsplane db upgrade` on every database."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.integration.databases import backend_params, throwaway_database


@pytest.mark.parametrize("backend", backend_params())
async def test_db_upgrade_brings_an_empty_database_to_the_newest_schema(
    backend: str, tmp_path: Path
) -> None:
    async with throwaway_database(backend, tmp_path) as url:
        argv = [sys.executable, "-m", "opsplane", "db", "upgrade", "--data-dir", str(tmp_path),
                "--database-url", url]  # fmt: skip
        for _ in range(2):  # idempotent
            result = await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, timeout=120, check=False
            )
            assert result.returncode == 0, result.stderr
            assert "newest schema" in result.stdout
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                version = (
                    await connection.execute(text("SELECT version_num FROM alembic_version"))
                ).scalar()
        finally:
            await engine.dispose()
        assert version is not None and version >= "0004"


def test_db_upgrade_reports_an_unreachable_database_in_one_line(tmp_path: Path) -> None:
    url = "postgresql+asyncpg://postgres:secret@127.0.0.1:1/nope"
    argv = [sys.executable, "-m", "opsplane", "db", "upgrade", "--data-dir", str(tmp_path),
            "--database-url", url]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "cannot reach the database" in result.stderr
    assert "secret" not in result.stderr and "Traceback" not in result.stderr
