"""Domain errors → HTTP status codes, in one place. A stack trace is never an answer."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from opsplane.domain.errors import Conflict, InvalidInput, NotFound, OpsplaneError

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[OpsplaneError], int]] = [
    (NotFound, 404),
    (Conflict, 409),
    (InvalidInput, 422),
]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpsplaneError)
    async def _opsplane_error(_request: Request, exc: Exception) -> JSONResponse:
        for kind, status in _STATUS:
            if isinstance(exc, kind):
                return JSONResponse({"detail": str(exc)}, status_code=status)
        log.error("unmapped error: %s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=503)
