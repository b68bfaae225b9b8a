"""Dependencies shared by every route: the engine, and the one place of authentication and
authorization.

Authentication: an API token as ``Authorization: Bearer <token>`` (API, CLI), as the password
of ``Authorization: Basic`` (any user name: the token is the whole credential) or as an
``X-Api-Key`` header (what the seeds' clients can set without a code change); or the web page's
session cookie. A cookie-authenticated request that changes state must also carry
``X-CSRF-Token`` matching its session (the browser sends cookies by itself, but only the page
can read the CSRF cookie). No credentials, or bad ones: 401 with ``WWW-Authenticate: Bearer``
(never a Basic challenge: a browser would pop up its own login dialog over the page) — except
that a call with no credential at all to a seed API's route may run as the anonymous principal
of ``compat_anonymous`` (security.anonymous; routes say which seed they serve with
``Depends(seed_api("seed003"))``).

Authorization, by role: a route declares the permission it needs with
``Depends(require(Permission.RUN))`` (or ``READ``, ``ADMIN``). A route that declares nothing
and depends on ``require_principal`` gets the safe default: ``READ`` for GET and HEAD,
``ADMIN`` for anything that may change state — so a new route is never open to less than an
admin by accident. Under-privileged: 403, and a state-changing attempt leaves an audit record.

Routes that change state and write no audit record of their own get a generic one from
``require_principal`` once they return (``request.state.audited`` marks those that do).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from opsplane.agentdeploy.service import AgentDeployer
from opsplane.domain.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    OpsplaneError,
    Unauthenticated,
)
from opsplane.engine.core import Engine
from opsplane.security.agents import AgentRegistry
from opsplane.security.anonymous import AnonymousAccess, from_browser
from opsplane.security.audit import DENIED, FAILED, OK, REJECTED
from opsplane.security.roles import Permission, Principal, authorize
from opsplane.security.secrets import SecretBox
from opsplane.security.service import Caller, SecurityService
from opsplane.security.tokens import same_secret

__all__ = [
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "Principal",
    "authenticate",
    "client_ip",
    "get_engine",
    "get_security",
    "require",
    "require_principal",
    "seed_api",
]

log = logging.getLogger(__name__)

SESSION_COOKIE = "opsplane_session"
CSRF_COOKIE = "opsplane_csrf"
CSRF_HEADER = "X-CSRF-Token"
API_KEY_HEADER = "X-Api-Key"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_agents(request: Request) -> AgentRegistry:
    """The enrolled agents (the engine sees them only as keys: engine/ports.py)."""
    agents: AgentRegistry = request.app.state.agents
    return agents


def get_secrets(request: Request) -> SecretBox:
    secrets: SecretBox = request.app.state.secrets
    return secrets


def get_deployer(request: Request) -> AgentDeployer:
    """Agents deployed and upgraded over the SSH link (agentdeploy/)."""
    deployer: AgentDeployer = request.app.state.deployer
    return deployer


AgentsDep = Annotated[AgentRegistry, Depends(get_agents)]
DeployerDep = Annotated[AgentDeployer, Depends(get_deployer)]
SecretsDep = Annotated[SecretBox, Depends(get_secrets)]


def get_security(request: Request) -> SecurityService:
    security: SecurityService = request.app.state.security
    return security


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


async def authenticate(request: Request) -> Principal:
    """Who is calling: an API token (Bearer, Basic password or ``X-Api-Key``), else the session
    cookie, else — no credential at all — the anonymous principal of ``compat_anonymous`` where
    it covers the route's seed API and the caller's address; Unauthenticated (401) otherwise.
    Resolved once per request (FastAPI caches it) and kept in ``request.state.principal``; a
    request authenticated before its body was read (``api.middleware.AuthenticateFirst``) is
    not authenticated twice."""
    known: Principal | None = getattr(request.state, "principal", None)
    if known is not None:
        return known
    security = get_security(request)
    token = _token(request)
    if token is not None:
        principal = await security.authenticate_token(token)
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            anonymous = _anonymous(request)
            if anonymous is None:
                raise Unauthenticated(
                    "authentication required: an API token (Authorization: Bearer, or "
                    f"{API_KEY_HEADER}) or a web login"
                )
            request.state.principal = anonymous
            return anonymous
        session = await security.authenticate_session(cookie)
        if request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not sent or not same_secret(sent, session.csrf_hash):
                # A forged cross-site request looks exactly like this: worth a record.
                error = f"missing or wrong {CSRF_HEADER} header: reload the page"
                await _record(request, session.principal, DENIED, {"error": error})
                raise Forbidden(error)
        principal = session.principal
    request.state.principal = principal
    return principal


def _token(request: Request) -> str | None:
    """The API token the request carries, in whichever of its three forms; None when it
    carries none. Two forms at once are refused: which one counts would be a guess."""
    header = request.headers.get("authorization")
    api_key = request.headers.get(API_KEY_HEADER)
    if header is not None and api_key is not None:
        raise Unauthenticated(f"send one credential: Authorization or {API_KEY_HEADER}, not both")
    if api_key is not None:
        if not api_key.strip():
            raise Unauthenticated(f"{API_KEY_HEADER} is empty: expected an API token")
        return api_key.strip()
    if header is None:
        return None
    scheme, _, credentials = header.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        return credentials
    if scheme.lower() == "basic" and credentials:
        if from_browser(request.headers):
            # A browser that once saw user:token@host sends it again by itself, on any page's
            # cross-site form too; Basic is for the seeds' scripts (a browser uses the login).
            raise Unauthenticated("HTTP Basic credentials are for scripts, not web browsers")
        return _basic_password(credentials)
    raise Unauthenticated(
        "expected Authorization: Bearer <API token> (or Basic with the token as the password)"
    )


def _basic_password(credentials: str) -> str:
    """The password of ``Authorization: Basic`` (RFC 7617): the API token. The user name is
    not checked: the token alone says who calls, and a token without an owner (the
    bootstrap token) has no user name to match."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed Basic credentials: expected base64(user:token)") from None
    _user, colon, password = decoded.partition(":")
    if not colon or not password:
        raise Unauthenticated("Basic credentials need the API token as the password (user:token)")
    return password


def seed_api(seed: str) -> Callable[[], None]:
    """A marker dependency: the routes it is on serve seed API ``seed`` (``seed000``, …), which
    ``compat_anonymous`` may open to callers without credentials. Put on a whole router."""
    cached = _SEEDS.get(seed)
    if cached is not None:
        return cached

    def dependency() -> None:
        return None

    dependency.__name__ = f"seed_api_{seed}"
    dependency.opsplane_seed = seed  # type: ignore[attr-defined]
    _SEEDS[seed] = dependency
    return dependency


_SEEDS: dict[str, Callable[[], None]] = {}


def route_seed(request: Request) -> str | None:
    """The seed API whose route the request matched (``seed_api``), if any."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    stack: list[Any] = list(dependant.dependencies) if dependant is not None else []
    while stack:
        sub = stack.pop()
        seed = getattr(sub.call, "opsplane_seed", None)
        if isinstance(seed, str):
            return seed
        stack.extend(sub.dependencies)
    return None


def _anonymous(request: Request) -> Principal | None:
    access: AnonymousAccess | None = getattr(request.app.state, "compat_anonymous", None)
    if access is None:
        return None
    return access.principal_for(
        route_seed(request), client_ip(request), browser=from_browser(request.headers)
    )


AuthenticatedDep = Annotated[Principal, Depends(authenticate)]


async def _authorize(request: Request, principal: Principal, permission: Permission) -> None:
    try:
        authorize(principal, permission)
    except Forbidden as e:
        if request.method not in SAFE_METHODS:
            await _record(request, principal, DENIED, {"needs": permission.value, "error": str(e)})
        raise


def require(permission: Permission) -> Callable[..., Awaitable[Principal]]:
    """The dependency of a route that needs ``permission``: ``Depends(require(Permission.RUN))``."""
    cached = _REQUIRE.get(permission)
    if cached is not None:
        return cached

    async def dependency(request: Request, principal: AuthenticatedDep) -> Principal:
        await _authorize(request, principal, permission)
        return principal

    dependency.__name__ = f"require_{permission.value}"
    # How require_principal finds a route's own declaration.
    dependency.opsplane_permission = permission  # type: ignore[attr-defined]
    _REQUIRE[permission] = dependency
    return dependency


_REQUIRE: dict[Permission, Callable[..., Awaitable[Principal]]] = {}


async def require_principal(
    request: Request, principal: AuthenticatedDep
) -> AsyncIterator[Principal]:
    """Authenticated, and authorized by the route's declared permission or the safe default
    (READ for GET/HEAD, ADMIN otherwise). Writes a generic audit record after a
    state-changing route that wrote none itself."""
    permission = _declared(request)
    if permission is None:
        permission = Permission.READ if request.method in SAFE_METHODS else Permission.ADMIN
    await _authorize(request, principal, permission)
    if request.method in SAFE_METHODS:
        yield principal
        return
    try:
        yield principal
    except (OpsplaneError, HTTPException, RequestValidationError, ValidationError) as e:
        if not getattr(request.state, "audited", False):
            await _record(request, principal, outcome_of(e), {"error": _message(e)})
        raise
    except Exception:
        if not getattr(request.state, "audited", False):
            await _record(request, principal, FAILED, {"error": "internal error"})
        raise
    if not getattr(request.state, "audited", False):
        await _record(request, principal, OK, {})


def outcome_of(error: BaseException) -> str:
    """The audit outcome of a request that ended in ``error``."""
    if isinstance(error, Forbidden | Unauthenticated):
        return DENIED
    if isinstance(error, HTTPException):
        return (
            DENIED
            if error.status_code in (401, 403)
            else (REJECTED if error.status_code < 500 else FAILED)
        )
    if isinstance(error, InvalidInput | NotFound | Conflict):
        return REJECTED
    if isinstance(error, RequestValidationError | ValidationError):
        return REJECTED  # refused input (a 422), not a failure of the control plane
    return FAILED


def _message(error: BaseException) -> str:
    if isinstance(error, HTTPException):
        return str(error.detail)
    if isinstance(error, RequestValidationError | ValidationError):
        return _invalid_input(error.errors())
    return str(error)


def _invalid_input(errors: Sequence[Any]) -> str:
    """Where the input was wrong and why, without the input itself (it may be huge or secret)."""
    parts = []
    for error in list(errors)[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {str(error.get('msg', 'invalid'))[:200]}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid input: " + "; ".join(parts) + more


def _declared(request: Request) -> Permission | None:
    """The highest permission the matched route declares through ``require(...)``."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return None
    found: list[Permission] = []
    stack: list[Any] = list(dependant.dependencies)
    while stack:
        sub = stack.pop()
        permission = getattr(sub.call, "opsplane_permission", None)
        if isinstance(permission, Permission):
            found.append(permission)
        stack.extend(sub.dependencies)
    if not found:
        return None
    return max(found, key=lambda p: _RANK[p])


_RANK = {Permission.READ: 0, Permission.RUN: 1, Permission.ADMIN: 2}


async def _record(
    request: Request, principal: Principal, outcome: str, detail: dict[str, Any]
) -> None:
    """A generic audit record of this request: ``METHOD /route/path`` and its outcome."""
    request.state.audited = True
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    entry = Caller(principal, client_ip(request)).entry(
        f"http.{request.method.lower()}",
        target=f"{request.method} {path}",
        outcome=outcome,
        detail={**detail, "path": request.url.path},
    )
    try:
        await get_security(request).audit(entry)
    except OpsplaneError:
        log.exception("could not write the audit record of %s %s", request.method, path)
        raise
