"""The engine and the API in process for integration tests: the engine started and stopped
around a block; the API started on SQLite with the bootstrap admin token (tests/auth.py), and
a client on it through ASGI (no server, no port)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from opsplane.app_factory import create_app, make_engine
from opsplane.config import Settings, load_settings
from opsplane.engine.core import Engine
from opsplane.transport.base import AgentHello, Link
from tests.auth import ADMIN_TOKEN
from tests.e2e.fleet import free_port

#: An agent host online for the tests that need a target.
WEB_1 = AgentHello(hostname="web-1", link="grpc", groups=("web",))


@asynccontextmanager
async def running_engine(settings: Settings, links: Sequence[Link]) -> AsyncIterator[Engine]:
    """An engine on ``links``, started, and stopped after the block."""
    engine = make_engine(settings, list(links))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@asynccontextmanager
async def admin_api(
    tmp_path: Path, *, connected: Sequence[AgentHello] = (), **settings: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The API in process, started (its lifespan) on SQLite in ``tmp_path`` with the bootstrap
    admin token, the ``connected`` hosts online, and a client on it (no credentials of its
    own: pass ``ADMIN_HEADERS`` or log in)."""
    app = create_app(
        load_settings(
            data_dir=tmp_path,
            grpc_listen=f"127.0.0.1:{free_port()}",
            bootstrap_admin_token=ADMIN_TOKEN,
            **settings,
        )
    )
    async with app.router.lifespan_context(app):
        engine: Engine = app.state.engine
        for hello in connected:
            await engine.host_connected(hello)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client
