"""Fixtures shared by the integration tests: every database backend, the in-memory link, an
engine on both."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from opsplane.config import load_settings
from opsplane.engine.core import Engine
from opsplane.transport.memory import MemoryLink
from tests.integration.apps import running_engine
from tests.integration.databases import backend_params, throwaway_database


@pytest.fixture(params=backend_params())
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, migrated database on each backend (the migration itself is tested in
    test_store_backends.py)."""
    async with throwaway_database(request.param, tmp_path, migrated=True) as url:
        yield url


@pytest.fixture
async def link() -> MemoryLink:
    return MemoryLink()


@pytest.fixture
async def engine(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    """An engine on each database backend and the in-memory link, with default settings (a
    module that needs other settings has an ``engine`` fixture of its own)."""
    async with running_engine(
        load_settings(data_dir=tmp_path, database_url=database_url), [link]
    ) as the_engine:
        yield the_engine
