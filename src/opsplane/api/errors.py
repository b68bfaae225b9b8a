"""Domain errors → HTTP status codes, in one place. A stack trace is never an answer."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from opsplane.domain.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    OpsplaneError,
    Unauthenticated,
)

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[OpsplaneError], int]] = [
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (InvalidInput, 422),
]
# RFC 9110: a 401 says how to authenticate.
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="opsplane"'}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpsplaneError)
    async def _opsplane_error(request: Request, exc: Exception) -> JSONResponse:
        status = 503
        for kind, code in _STATUS:
            if isinstance(exc, kind):
                status = code
                break
        else:
            log.error("unmapped error: %s", exc)
        headers = _CHALLENGE if status == 401 else None
        if getattr(request.state, "envelope_errors", False):
            # Seed 004's routes answer every error in the seed's envelope, refusals included.
            body = {"code": 1, "data": "", "msg": str(exc)}
            return JSONResponse(body, status_code=status, headers=headers)
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)
