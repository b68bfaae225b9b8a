"""Domain errors → HTTP status codes, in one place. A stack trace is never an answer."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from opsplane.domain.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    OpsplaneError,
    Unauthenticated,
)
from opsplane.security.throttle import LoginThrottled

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[OpsplaneError], int]] = [
    (LoginThrottled, 429),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (InvalidInput, 422),
]
# RFC 9110: a 401 says how to authenticate.
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="opsplane"'}
# A 422 names what was wrong and shows a little of it, never the whole input back (ten
# megabytes in were ten megabytes out): so many problems, each value cut to so many characters.
MAX_PROBLEMS = 20
MAX_ECHO = 200


def _clip(value: Any, limit: int = MAX_ECHO) -> Any:
    """``value`` if its JSON is short, else the start of its text and how long it was."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, bytes):  # a body that is not JSON at all
        value = value[: limit * 4].decode("utf-8", "replace") + ("…" if len(value) > limit else "")
    if not isinstance(value, str):
        value = jsonable_encoder(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) <= limit:
        return value
    return f"{text[:limit]}… ({len(text):,} characters)"


def validation_problems(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's list of validation errors, bounded: at most MAX_PROBLEMS, each field clipped."""
    problems: list[dict[str, Any]] = []
    for error in list(errors)[:MAX_PROBLEMS]:
        problem: dict[str, Any] = {
            "type": error.get("type"),
            "loc": [_clip(part, 64) for part in error.get("loc", ())],
            "msg": _clip(str(error.get("msg", "")), 2 * MAX_ECHO),
        }
        if "input" in error:
            problem["input"] = _clip(error["input"])
        if error.get("ctx"):
            problem["ctx"] = {str(k): _clip(str(v)) for k, v in error["ctx"].items()}
        problems.append(problem)
    more = len(errors) - MAX_PROBLEMS
    if more > 0:
        problems.append({"type": "too_many_errors", "loc": [], "msg": f"and {more:,} more"})
    return problems


def status_of(error: OpsplaneError) -> int:
    """The HTTP status of a domain error (503 for one not mapped, which is logged)."""
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    log.error("unmapped error: %s", error)
    return 503


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpsplaneError)
    async def _opsplane_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpsplaneError)
        status = status_of(exc)
        headers = CHALLENGE if status == 401 else None
        if isinstance(exc, LoginThrottled):
            headers = {"Retry-After": str(exc.retry_after)}
        if getattr(request.state, "envelope_errors", False):
            # Seed 004's routes answer every error in the seed's envelope, refusals included.
            body = {"code": 1, "data": "", "msg": str(exc)}
            return JSONResponse(body, status_code=status, headers=headers)
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": validation_problems(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
        if exc.status_code == 413 and isinstance(limit, int):
            # FastAPI's max_body_size says only "Content Too Large".
            exc = HTTPException(
                413, f"the request body is longer than {limit:,} bytes (max_request_bytes)"
            )
        if getattr(request.state, "envelope_errors", False):
            body = {"code": 1, "data": "", "msg": str(exc.detail)}
            return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
        return await http_exception_handler(request, exc)
