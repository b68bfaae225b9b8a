"""The FastAPI application factory. The lifespan starts and stops the engine and its links."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from opsplane.api.errors import install_error_handlers
from opsplane.api.routers import fleet, health, hosts, tasks
from opsplane.api.web import mount_web
from opsplane.config import Settings
from opsplane.engine.core import Engine
from opsplane.transport.grpc.server import GrpcLink
from opsplane.transport.local import LocalLink


def build_engine(settings: Settings) -> Engine:
    grpc_link = GrpcLink(
        settings.grpc_listen,
        heartbeat_interval=settings.heartbeat_interval,
        allow_insecure=settings.grpc_allow_insecure,
        tls_cert=settings.grpc_tls_cert,
        tls_key=settings.grpc_tls_key,
    )
    return Engine(settings, [grpc_link, LocalLink(settings.local_host)])


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    the_engine = engine or build_engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await the_engine.start()
        try:
            yield
        finally:
            await the_engine.stop()

    app = FastAPI(
        title="opsplane",
        version="0.1.0",
        description="Remote-execution control plane",
        lifespan=lifespan,
    )
    app.state.engine = the_engine
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(tasks.router)
    app.include_router(hosts.router)
    app.include_router(fleet.router)
    mount_web(app)
    return app
