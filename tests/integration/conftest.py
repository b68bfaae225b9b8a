"""Fixtures shared by the integration tests: every database backend, the in-memory link."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from opsplane.transport.memory import MemoryLink
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
