"""Domain errors → HTTP status codes, in one place. A stack trace is never an answer."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from opsplane.domain.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    OpsplaneError,
    Unauthenticated,
)
from opsplane.store.database import POOL_TIMEOUT, is_unavailable

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
# While the database is unreachable, clients are told when to try again.
_RETRY_AFTER = {"Retry-After": "5"}


def install_database_error_handler(app: FastAPI) -> None:
    """The database unreachable (refused, lost, pool exhausted) → 503 with a clear message,
    never a 500 with a stack trace; any other database error stays a 500 (a bug)."""

    async def _database_error(request: Request, exc: Exception) -> JSONResponse:
        if not is_unavailable(exc):
            raise exc
        if isinstance(exc, sa_exc.TimeoutError):
            why = f"no database connection free within {POOL_TIMEOUT:.0f} s"
        else:
            # The driver's own words, first line only: never the SQL or its parameters.
            orig = getattr(exc, "orig", None) or exc
            why = (str(orig).splitlines() or [type(orig).__name__])[0][:200]
        log.warning("%s %s: database unavailable: %s", request.method, request.url.path, why)
        message = f"database unavailable: {why}"
        if getattr(request.state, "envelope_errors", False):
            body = {"code": 1, "data": "", "msg": message}
            return JSONResponse(body, status_code=503, headers=_RETRY_AFTER)
        return JSONResponse({"detail": message}, status_code=503, headers=_RETRY_AFTER)

    for kind in (sa_exc.DBAPIError, sa_exc.TimeoutError, sa_exc.DisconnectionError):
        app.add_exception_handler(kind, _database_error)


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
