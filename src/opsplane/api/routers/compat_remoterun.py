"""Seed 003's "RemoteRun" routes, at the root as its clients call them: ``POST /tasks``,
``GET /tasks/{id}``, ``GET /tasks/{id}/logs`` (Server-Sent Events). The work is in
``opsplane.remoterun``; these only translate (docs/remoterun.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from opsplane.api.auditing import AuditDep
from opsplane.api.deps import Principal, require_principal, seed_api
from opsplane.domain.targeting import Targets
from opsplane.remoterun import (
    LogEnd,
    RemoteRunDisabled,
    RemoteRunRequest,
    RemoteRunService,
    parse_cursor,
)

# The dependency on the router is the backstop: a route added here later cannot skip auth.
# seed_api: compat_anonymous may open these routes to callers without credentials.
router = APIRouter(
    tags=["RemoteRun (seed 003)"],
    dependencies=[Depends(seed_api("seed003")), Depends(require_principal)],
)

PrincipalDep = Annotated[Principal, Depends(require_principal)]


class RemoteRunCreate(BaseModel):
    """The seed's body. Unknown fields are refused, so that a misspelt one is not ignored."""

    model_config = ConfigDict(extra="forbid")

    script_path: str = Field(
        min_length=1, max_length=4096, examples=["/scripts/backup.sh"],
        description="a script in a configured script directory: /<dir>/<file> or <file>",
    )  # fmt: skip
    params: dict[str, Any] | None = Field(
        default=None, examples=[{"dir": "/data"}],
        description="reach the script as environment variables PARAM_<NAME> and PARAMS_JSON",
    )  # fmt: skip
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="higher runs first when workers are busy"
    )
    timeout: int | None = Field(default=None, gt=0, description="seconds; default from settings")
    retry: int | dict[str, Any] | None = Field(
        default=None,
        description="retries after a failure: a count, or {max_attempts, backoff_seconds, on}",
    )


class RemoteRunCreated(BaseModel):
    id: str


class RemoteRunTask(BaseModel):
    id: str
    script_path: str
    params: dict[str, Any]
    status: str = Field(description="pending, running, success, failed or timeout")
    priority: int
    timeout: int
    retry: Any
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    logs_path: str | None = Field(description="the archived log on the control plane")
    exit_code: int | None
    error: str | None
    opsplane_status: str = Field(description="opsplane's own status (canceled is failed here)")


def _service(request: Request) -> RemoteRunService:
    service: RemoteRunService = request.app.state.remoterun
    return service


ServiceDep = Annotated[RemoteRunService, Depends(_service)]


@router.post("/tasks", status_code=status.HTTP_201_CREATED, response_model=RemoteRunCreated)
async def submit(
    body: RemoteRunCreate,
    service: ServiceDep,
    principal: PrincipalDep,
    audit: AuditDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> RemoteRunCreated:
    """Run a server-side script now; answers with the task id at once."""
    request = RemoteRunRequest(
        script_path=body.script_path,
        params=body.params or {},
        priority=body.priority,
        timeout=body.timeout,
        retry=body.retry,
    )
    # Parameter names only: their values may be secrets.
    detail = {
        "api": "seed003",
        "kind": "script",
        "script_path": audit.redact(body.script_path),
        "params": sorted(request.params),
        "priority": body.priority,
        "timeout": body.timeout,
    }
    # The record is written in the transaction that creates the task: durable before it runs.
    async with audit.failures("task.create", detail=detail):
        hook = audit.task_hook("task.create", Targets(), detail)
        try:
            task = await service.submit(
                request,
                created_by=principal.name,
                idempotency_key=idempotency_key,
                before_commit=hook,
            )
        except RemoteRunDisabled as e:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from e
    return RemoteRunCreated(id=task.id)


@router.get("/tasks/{task_id}", response_model=RemoteRunTask)
async def get_task(task_id: str, service: ServiceDep, _principal: PrincipalDep) -> RemoteRunTask:
    """The task in the seed's words."""
    return RemoteRunTask.model_validate(await service.view(task_id))


@router.get("/tasks/{task_id}/logs")
async def follow_logs(
    task_id: str,
    service: ServiceDep,
    _principal: PrincipalDep,
    last_event_id: Annotated[str | None, Header()] = None,
    last_event_id_query: Annotated[str | None, Query(alias="last_event_id")] = None,
) -> EventSourceResponse:
    """Server-Sent Events: one ``data: <line>`` per output line, live while the task runs, the
    archived lines once it has ended, then an ``end`` event whose data is the final status.
    Every event has an id; reconnecting with ``Last-Event-ID`` (or ``?last_event_id=``)
    resumes after that line, without gaps or duplicates."""
    cursor = parse_cursor(last_event_id or last_event_id_query)
    await service.view(task_id)  # 404 before the stream starts
    return EventSourceResponse(_events(service, task_id, cursor), ping=15)


async def _events(
    service: RemoteRunService, task_id: str, cursor: tuple[int, int]
) -> AsyncIterator[ServerSentEvent]:
    async for item in service.follow(task_id, cursor):
        if isinstance(item, LogEnd):
            yield ServerSentEvent(id=item.cursor, event="end", data=item.status)
        else:
            yield ServerSentEvent(id=item.cursor, data=item.text)
