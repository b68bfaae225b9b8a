"""Seed 004's routes, at the root as its clients call them: ``GET /list``,
``POST /sync/{cluster-type}/{name}``, ``POST /async/{cluster-type}/{name}``,
``POST /async/query``, ``POST /async/kill``.

Every answer is the seed's envelope ``{"code": 0|1, "data": …, "msg": "…"}``, errors included
(with a matching HTTP status), so a client written for the seed never sees another shape.
Bodies are read by hand rather than declared, for the same reason: FastAPI's own validation
error would not be an envelope.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from opsplane.api.access import check_task_allowed
from opsplane.api.auditing import Audit, AuditDep
from opsplane.api.deps import Principal, get_engine, require, require_principal, seed_api
from opsplane.catalog.registry import BodyError, CatalogEntry
from opsplane.catalog.service import CatalogService, CatalogUnavailable, UnknownSession
from opsplane.domain.errors import Forbidden, InvalidInput, NotFound, OpsplaneError
from opsplane.domain.targeting import Targets
from opsplane.engine.service import BeforeCommit
from opsplane.security.roles import Permission

log = logging.getLogger(__name__)


async def _envelope_errors(request: Request) -> None:
    """Refusals before a route runs (401, 403) are answered in the seed's envelope too."""
    request.state.envelope_errors = True


# The dependencies on the router are the backstop: a route added here later cannot skip auth,
# and is admin-only until it declares what it needs (api.deps). seed_api: compat_anonymous may
# open these routes (and the short URL's, which shares this list) to callers without credentials.
router = APIRouter(
    tags=["catalog (seed 004)"],
    dependencies=[
        Depends(_envelope_errors),
        Depends(seed_api("seed004")),
        Depends(require_principal),
    ],
)

PrincipalDep = Annotated[Principal, Depends(require_principal)]
# Running a catalog script runs code on the control plane's own host (group control-plane):
# an operator needs that group.
RunnerDep = Annotated[Principal, Depends(require(Permission.RUN))]
# /async/query is a POST that only reads.
ReaderDep = Annotated[Principal, Depends(require(Permission.READ))]

_ANY_JSON_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "External tasks: a JSON array of strings, appended to the arguments. "
        "In-process handlers: any JSON value. An empty body means no arguments (null).",
        "content": {"application/json": {"schema": {}}},
    }
}
_SESSION_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"session_id": {"type": "string"}},
                }
            }
        },
    }
}


def envelope(data: Any = "", msg: str = "", *, code: int = 0, status: int = 200) -> JSONResponse:
    return JSONResponse({"code": code, "data": data, "msg": msg}, status_code=status)


def _failure(error: OpsplaneError) -> JSONResponse:
    if isinstance(error, BodyError):
        status = error.status
    elif isinstance(error, Forbidden):
        status = 403
    elif isinstance(error, NotFound):
        status = 404
    elif isinstance(error, InvalidInput):
        status = 422
    else:
        if not isinstance(error, CatalogUnavailable):
            log.error("catalog call failed: %s", error)
        status = 503
    return envelope("", str(error), code=1, status=status)


def _service(request: Request) -> CatalogService:
    service: CatalogService | None = getattr(request.app.state, "catalog_service", None)
    if service is None:
        raise CatalogUnavailable("the catalog is not enabled on this server")
    return service


@router.get("/list")
async def list_routes(request: Request, _principal: PrincipalDep) -> JSONResponse:
    """Every catalog route: each entry's sync and async route, then the fixed ones."""
    try:
        routes = _service(request).catalog.routes()
    except OpsplaneError as e:
        return _failure(e)
    return envelope([{"method": method, "path": path} for method, path in routes])


@router.post("/sync/{cluster_type}/{name}", openapi_extra=_ANY_JSON_BODY)
async def run_sync(
    cluster_type: str, name: str, request: Request, principal: RunnerDep, audit: AuditDep
) -> JSONResponse:
    """Run the task and answer when it ends: ``data`` is the last line of stdout, ``msg`` the
    last line of stderr, ``code`` 1 when the run did not succeed."""
    return await _run("sync", cluster_type, name, request, principal, audit)


async def _run(
    mode: Literal["sync", "async"],
    cluster_type: str,
    name: str,
    request: Request,
    principal: Principal,
    audit: Audit,
) -> JSONResponse:
    """One catalog call, synchronous or not: both audit, parse and authorize the same way."""
    route = f"/{mode}/{cluster_type}/{name}"
    try:
        async with audit.failures("catalog.run", detail={"route": route}):
            service = _service(request)
            entry = service.entry(cluster_type, name)
            body = entry.parse_body(await request.body())
            hook = _hook(audit, request, entry, body, route)
            groups = principal.allowed_groups
            if mode == "async":
                session_id = await service.run_async(
                    entry, body, principal.name, allowed_groups=groups, before_commit=hook
                )
                return envelope(session_id)
            result = await service.run_sync(
                entry, body, principal.name, allowed_groups=groups, before_commit=hook
            )
    except OpsplaneError as e:
        return _failure(e)
    return envelope(result.data, result.msg, code=result.code)


def _hook(
    audit: Audit, request: Request, entry: CatalogEntry, body: Any, route: str
) -> BeforeCommit:
    """The audit record of a catalog call, written with its task (before it runs)."""
    local = Targets(hosts=(get_engine(request).settings.local_host,))
    detail = {"route": route, "command": audit.redact(entry.command_text(body))}
    return audit.task_hook("catalog.run", local, detail)


@router.post("/async/query", openapi_extra=_SESSION_BODY)
async def query_sessions(request: Request, _principal: ReaderDep) -> JSONResponse:
    """``{"session_id": "…"}``: a list of that one session; no body (or no ``session_id``): a
    list of all sessions. ``data`` is always a list, as the seed's upstream answers: an unknown
    (or already cleaned up) session is an empty list, not an error."""
    try:
        service = _service(request)
        session_id = _session_id(await request.body(), required=False)
        if session_id is None:
            return envelope([view.to_json() for view in service.query_all()])
        try:
            return envelope([service.query(session_id).to_json()])
        except UnknownSession:
            return envelope([])
    except OpsplaneError as e:
        return _failure(e)


@router.post("/async/kill", openapi_extra=_SESSION_BODY)
async def kill_session(request: Request, principal: RunnerDep, audit: AuditDep) -> JSONResponse:
    """Kill the session's whole process group; answers once it is done, with the session."""
    try:
        async with audit.failures("catalog.kill"):
            service = _service(request)
            session_id = _session_id(await request.body(), required=True)
            assert session_id is not None
            service.query(session_id)  # an unknown session is a 404 before anything else
            await check_task_allowed(get_engine(request), principal, session_id)
            view = await service.kill(session_id)
            await audit.record("catalog.kill", target=session_id)
    except OpsplaneError as e:
        return _failure(e)
    return envelope(view.to_json())


# Declared after the fixed /async routes; they could not clash anyway (two segments vs three).
@router.post("/async/{cluster_type}/{name}", openapi_extra=_ANY_JSON_BODY)
async def run_async(
    cluster_type: str, name: str, request: Request, principal: RunnerDep, audit: AuditDep
) -> JSONResponse:
    """Start the task; ``data`` is its session id (also its opsplane task id)."""
    return await _run("async", cluster_type, name, request, principal, audit)


# The seed's short URL, ``POST /{cluster-type}/{name}`` (its curl example calls
# ``/tendb-cluster/demo1``), as an alias of ``/sync/…``. A pattern of two free segments at the
# root would match any two-segment path, so it lives on its own router that the app includes
# after every other one (app_factory.py), it takes POST only, and a pair that is not a catalog
# entry is a 404: it can never answer in place of another route. Same dependencies as the
# catalog's own routes (the same list object, so a change to one is a change to both).
short_router = APIRouter(tags=["catalog (seed 004)"], dependencies=router.dependencies)


@short_router.post("/{cluster_type}/{name}", openapi_extra=_ANY_JSON_BODY)
async def run_short(
    cluster_type: str, name: str, request: Request, principal: RunnerDep, audit: AuditDep
) -> JSONResponse:
    """The seed's short URL of an entry: exactly ``POST /sync/{cluster-type}/{name}``."""
    return await _run("sync", cluster_type, name, request, principal, audit)


def _session_id(raw: bytes, *, required: bool) -> str | None:
    value: Any = None
    if raw.strip():
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BodyError(400, f"body is not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise BodyError(422, 'body must be a JSON object like {"session_id": "…"}')
        value = value.get("session_id")
        if value is not None and not isinstance(value, str):
            raise BodyError(422, "session_id must be a string")
    if not value:
        if required:
            raise BodyError(422, 'body must name the session: {"session_id": "…"}')
        return None
    return str(value)
