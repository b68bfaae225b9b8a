"""Liveness and readiness probes: the only routes that never require authentication."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from opsplane.api.deps import get_engine
from opsplane.engine.core import Engine

router = APIRouter(tags=["health"])

# A probe answers within its caller's timeout: a database that does not answer is unavailable.
READY_DATABASE_TIMEOUT = 5.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(engine: Annotated[Engine, Depends(get_engine)]) -> JSONResponse:
    """The engine has started, every background loop runs, and the database answers."""
    if not engine.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    problems = engine.loops.problems()
    if problems:
        detail = "; ".join(f"{name} {why}" for name, why in sorted(problems.items()))
        return JSONResponse(
            {"status": "degraded", "detail": f"background loops down: {detail}", "loops": problems},
            status_code=503,
        )
    try:
        async with asyncio.timeout(READY_DATABASE_TIMEOUT):
            await engine.ping_database()
    except Exception as e:
        return JSONResponse(
            {"status": "database unavailable", "detail": type(e).__name__}, status_code=503
        )
    return JSONResponse({"status": "ready"})
