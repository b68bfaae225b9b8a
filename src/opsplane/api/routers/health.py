"""Liveness and readiness probes: the only routes that never require authentication."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from opsplane.api.deps import get_engine
from opsplane.engine.core import Engine

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(engine: Annotated[Engine, Depends(get_engine)]) -> JSONResponse:
    """The engine has started and the database answers."""
    if not engine.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    try:
        async with engine.sessions() as session:
            await session.execute(text("SELECT 1"))
    except Exception as e:
        return JSONResponse(
            {"status": "database unavailable", "detail": type(e).__name__}, status_code=503
        )
    return JSONResponse({"status": "ready"})
