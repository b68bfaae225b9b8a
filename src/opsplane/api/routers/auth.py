"""Web login: ``POST /api/v1/auth/login`` opens a session (cookie), ``logout`` ends it,
``me`` says who the caller is (for the page and for scripts checking their token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from opsplane.api.auditing import AuditDep
from opsplane.api.deps import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    Principal,
    client_ip,
    get_security,
    require,
)
from opsplane.api.security_schemas import LoginIn, LoginOut, MeOut
from opsplane.security.roles import Permission

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

# Logout and "who am I" need a login, nothing more.
ReaderDep = Annotated[Principal, Depends(require(Permission.READ))]


def _me(principal: Principal) -> MeOut:
    groups = sorted(principal.groups) if principal.groups is not None else None
    return MeOut(name=principal.name, role=str(principal.role), groups=groups, via=principal.via)


@router.post("/login", response_model=LoginOut)
async def login(body: LoginIn, request: Request, response: Response) -> LoginOut:
    """Open a web session for ``name`` and ``password``. The session is an HttpOnly,
    SameSite=Strict cookie (Secure over https); the answer and a second, readable cookie carry
    the CSRF token that state-changing requests must echo in ``X-CSRF-Token``. A wrong name or
    password is a 401 that does not say which, and leaves an audit record."""
    security = get_security(request)
    opened = await security.login(body.name, body.password, client_ip(request))
    secure = request.url.scheme == "https"
    lifetime = int(security.session_lifetime.total_seconds())
    for name, value, http_only in (
        (SESSION_COOKIE, opened.secret, True),
        # Readable by the page's script (and only by pages of this origin): the double-submit
        # half of the CSRF check; the server compares it with the hash kept in the session.
        (CSRF_COOKIE, opened.csrf_token, False),
    ):
        response.set_cookie(
            name,
            value,
            max_age=lifetime,
            path="/",
            secure=secure,
            httponly=http_only,
            samesite="strict",
        )
    me = _me(opened.principal)
    return LoginOut(**me.model_dump(), csrf_token=opened.csrf_token, expires_at=opened.expires_at)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(request: Request, _principal: ReaderDep, audit: AuditDep) -> Response:
    """End the web session (its cookie is cleared). With a token there is nothing to end; the
    call is recorded all the same."""
    await get_security(request).logout(audit.caller)
    answer = Response(status_code=status.HTTP_204_NO_CONTENT)
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        answer.delete_cookie(name, path="/", samesite="strict")
    return answer


@router.get("/me", response_model=MeOut)
async def me(principal: ReaderDep) -> MeOut:
    """Who the caller is: name, role, granted groups, and how it authenticated."""
    return _me(principal)
