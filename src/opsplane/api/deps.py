"""Dependencies shared by every route: the engine, and the one authentication point."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from opsplane.engine.core import Engine


@dataclass(frozen=True)
class Principal:
    """Who is calling. Until the security issue lands, everyone is the anonymous admin."""

    name: str
    role: str


ANONYMOUS = Principal(name="anonymous", role="admin")


async def require_principal(request: Request) -> Principal:
    """Every API route depends on this: authentication and authorization happen here only."""
    return ANONYMOUS


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine
