"""Tasks: create, list, inspect, cancel, follow live (SSE), fetch logs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response, status
from fastapi.responses import PlainTextResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from opsplane.api.access import check_task_allowed
from opsplane.api.auditing import AuditDep
from opsplane.api.deps import Principal, SecretsDep, get_engine, require, require_principal
from opsplane.api.schemas import (
    Cursor,
    Page,
    PageNumber,
    RerunIn,
    RunOut,
    RunsPage,
    TaskCreate,
    TaskOut,
)
from opsplane.domain.errors import InvalidInput
from opsplane.domain.paging import PageRequest
from opsplane.domain.records import TaskRecord
from opsplane.domain.states import TERMINAL_TASK_STATUSES, RunStatus, TaskStatus
from opsplane.domain.targeting import Targets, normalize_names
from opsplane.domain.tasks import ExecSpec, TaskRequest
from opsplane.engine.changes import TaskEvent, task_view
from opsplane.engine.core import Engine
from opsplane.engine.hub import RecentIds
from opsplane.security.audit import targets_summary
from opsplane.security.roles import Permission

router = APIRouter(prefix="/api/v1/tasks", tags=["tasks"])

EngineDep = Annotated[Engine, Depends(get_engine)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
RunnerDep = Annotated[Principal, Depends(require(Permission.RUN))]
HISTORY_PAGE = 1000
# Event ids a stream remembers having sent, to tell an id committed out of order from one sent.
GAP_WINDOW = 10_000


def _out(task: TaskRecord) -> TaskOut:
    return TaskOut.model_validate(task_view(task))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TaskOut)
async def create_task(
    body: TaskCreate,
    engine: EngineDep,
    principal: RunnerDep,
    audit: AuditDep,
    secrets: SecretsDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> TaskOut:
    """Create a task aimed at hosts, groups or all hosts; it starts at once unless
    ``start`` is false. An ``Idempotency-Key`` header returns the task it created before.
    An operator is refused (403, naming the hosts) a task reaching a host outside its groups."""
    targets = Targets(
        hosts=normalize_names(body.targets.hosts, "host"),
        groups=normalize_names(body.targets.groups, "group"),
        all=body.targets.all,
        labels=dict(body.targets.labels),
    )
    spec = None
    command = body.command
    env, secret_env = body.environment()
    if body.kind == "upload":
        if body.upload is None:
            raise InvalidInput("an upload task needs upload: {local_path, remote_path}")
        spec = ExecSpec(
            local_path=body.upload.local_path,
            remote_path=body.upload.remote_path,
            owner=body.upload.owner or None,
            group=body.upload.group or None,
        )
        command = f"upload {body.upload.local_path} -> {body.upload.remote_path}"
    if env or secret_env:
        spec = replace(spec or ExecSpec(), env=env, secret_env=secrets.seal(secret_env))
    request = TaskRequest(
        kind=body.kind,
        spec=spec,
        command=command,
        targets=targets,
        timeout=body.timeout,
        name=body.name,
        description=body.description,
        start=body.start,
        created_by=principal.name,
        idempotency_key=idempotency_key,
        allowed_groups=principal.allowed_groups,
        policy=body.policy(),
        run_as=body.run_as,
    )
    detail = {
        "kind": body.kind,
        "command": audit.redact(command),
        "name": audit.redact(body.name),
        "timeout": body.timeout,
        "start": body.start,
        "run_as": body.run_as,
        "policy": request.policy.to_json() if request.policy else None,
        # Names only: values may be secret (and secret_env's always are).
        "env": sorted(body.env),
        "secret_env": sorted(secret_env),
        "parameters": sorted(body.parameters),
    }
    async with audit.failures(
        "task.create", targets=targets_summary(body.targets.model_dump()), detail=detail
    ):
        hook = audit.task_hook("task.create", targets, detail)
        task = await engine.tasks.create_task(request, before_commit=hook)
    return _out(task)


@router.get("", response_model=Page[TaskOut])
async def list_tasks(
    engine: EngineDep,
    _principal: PrincipalDep,
    status_filter: Annotated[TaskStatus | None, Query(alias="status")] = None,
    name: Annotated[str | None, Query(max_length=255)] = None,
    page: PageNumber = 1,
    size: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Cursor = None,
) -> Page[TaskOut]:
    """Tasks, newest first; ``name`` matches anywhere in the name, case-insensitively."""
    found = await engine.tasks.list_tasks(
        status=status_filter, name=name, page=PageRequest.of(page=page, size=size, cursor=cursor)
    )
    return Page[TaskOut].of(found, [_out(row) for row in found.items], page=page, size=size)


@router.get("/{task_id}", response_model=TaskOut)
async def get_task(task_id: str, engine: EngineDep, _principal: PrincipalDep) -> TaskOut:
    return _out(await engine.tasks.get_task(task_id))


@router.post("/{task_id}/start", response_model=TaskOut)
async def start_task(
    task_id: str, engine: EngineDep, principal: RunnerDep, audit: AuditDep
) -> TaskOut:
    async with audit.failures("task.start", target=task_id):
        await check_task_allowed(engine, principal, task_id)
        task = await engine.tasks.start_task(task_id)
        # The command itself was recorded when the task was created (with start: false).
        await audit.record("task.start", target=task_id)
    return _out(task)


@router.post("/{task_id}/rerun", status_code=status.HTTP_201_CREATED, response_model=TaskOut)
async def rerun_task(
    task_id: str, body: RerunIn, engine: EngineDep, principal: RunnerDep, audit: AuditDep
) -> TaskOut:
    """A new task with this ended task's spec and policy, over the hosts whose latest run
    ended as ``only`` says (``failed`` includes lost runs); ``rerun_of`` links it back."""
    detail = {"rerun_of": task_id, "only": body.only}
    async with audit.failures("task.rerun", target=task_id, detail=detail):
        # The record names the hosts the re-run resolved to.
        hook = audit.task_hook("task.rerun", Targets(), detail)
        task = await engine.tasks.rerun_task(
            task_id,
            body.only,
            created_by=principal.name,
            allowed_groups=principal.allowed_groups,
            before_commit=hook,
        )
    return _out(task)


@router.post("/{task_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=TaskOut)
async def cancel_task(
    task_id: str, engine: EngineDep, principal: RunnerDep, audit: AuditDep
) -> TaskOut:
    """Cancel: runs not yet sent end at once; running ones end when their host confirms."""
    async with audit.failures("task.cancel", target=task_id):
        await check_task_allowed(engine, principal, task_id)
        task = await engine.tasks.cancel_task(task_id, reason=f"canceled by {principal.name}")
        await audit.record("task.cancel", target=task_id)
    return _out(task)


@router.get("/{task_id}/runs", response_model=RunsPage)
async def list_runs(
    task_id: str,
    engine: EngineDep,
    _principal: PrincipalDep,
    status_filter: Annotated[RunStatus | None, Query(alias="status")] = None,
    output: Annotated[
        bool, Query(description="include each run's kept stdout and stderr (null otherwise)")
    ] = False,
    page: PageNumber = 1,
    size: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Cursor = None,
) -> RunsPage:
    """The task's runs by host and attempt, without their output unless ``output=true`` (the
    whole output of one run: ``.../runs/{run_id}/log``). ``summary`` counts the task's runs
    by status."""
    found, summary = await engine.tasks.page_runs(
        task_id,
        PageRequest.of(page=page, size=size, cursor=cursor),
        status=status_filter,
        output=output,
    )
    items = [RunOut.from_row(run, output=output) for run in found.items]
    return RunsPage(
        items=items, total=found.total, page=page, size=size, next_cursor=found.next_cursor,
        summary=summary,
    )  # fmt: skip


@router.get("/{task_id}/runs/{run_id}/log", response_class=PlainTextResponse)
async def run_log(
    task_id: str, run_id: str, engine: EngineDep, _principal: PrincipalDep
) -> Response:
    """The whole archived output of one run (stdout and stderr in arrival order)."""
    run = await engine.tasks.get_run(task_id, run_id)
    # The stored path: runs archived before the dated layout keep theirs.
    path = (
        Path(run.log_path) if run.log_path else engine.archive.legacy_path_for(run.task_id, run.id)
    )
    data = await engine.archive.read(path)
    return Response(content=data, media_type="text/plain; charset=utf-8")


@router.get("/{task_id}/events")
async def task_events(
    task_id: str,
    engine: EngineDep,
    _principal: PrincipalDep,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[
        str | None,
        Query(alias="last_event_id", description="resume point when a header cannot be set"),
    ] = None,
) -> EventSourceResponse:
    """Server-Sent Events: ``run`` (state changes), ``output`` (chunks), ``task`` (progress).

    Every event carries an id; reconnect with ``Last-Event-ID`` to resume without gaps or
    duplicates. The stream ends after the task's terminal ``task`` event.
    """
    resume_from = last_event_id or after
    after_id = 0
    if resume_from:
        try:
            after_id = int(resume_from)
        except ValueError as e:
            raise InvalidInput("Last-Event-ID must be an event id (an integer)") from e
    await engine.tasks.get_task(task_id)
    return EventSourceResponse(_event_stream(engine, task_id, after_id), ping=15)


def _sse(event: TaskEvent) -> ServerSentEvent:
    # A live-only event (output past what the database keeps) has no id of its own: sent
    # without one, it leaves the client's Last-Event-ID at the last durable event.
    return ServerSentEvent(
        id=str(event.id) if event.durable else None,
        event=event.kind,
        data=json.dumps(event.data),
    )


async def _gap(
    engine: Engine, task_id: str, first: int, upto: int, recent: RecentIds
) -> list[TaskEvent]:
    """A task's stored events from id ``first`` (just received, out of order) up to ``upto``
    (the last id sent) that were not sent yet (docs/instances.md, *Event ids across
    writers*)."""
    missed: list[TaskEvent] = []
    for event in await engine.tasks.events_after(task_id, first - 1, HISTORY_PAGE):
        if event.id > upto:
            break
        if event.id == first or recent.first_time(str(event.id)):
            missed.append(event)
    return missed


def _ends_stream(event: TaskEvent) -> bool:
    return event.kind == "task" and event.data.get("status") in TERMINAL_TASK_STATUSES


async def _event_stream(engine: Engine, task_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    # Subscribe before reading history: events committed meanwhile arrive in the queue and
    # are skipped by id if the history already held them.
    subscription = engine.hub.subscribe(task_id)
    # Ids sent lately: an id at or below ``sent`` not among them was committed out of order.
    recent = RecentIds(GAP_WINDOW)
    try:
        task = await engine.tasks.get_task(task_id)
        sent = after
        while True:
            events = await engine.tasks.events_after(task_id, sent, HISTORY_PAGE)
            for event in events:
                yield _sse(event)
                sent = event.id
                recent.first_time(str(event.id))
                if _ends_stream(event):
                    return
            if len(events) < HISTORY_PAGE:
                break
        if task.status in TERMINAL_TASK_STATUSES:
            # It had ended before the history was read, yet the history holds no terminal
            # event: the event retention pruned it. Say how the task ended and stop, rather
            # than wait for an event that will not come.
            yield ServerSentEvent(event="task", data=json.dumps(task_view(task)))
            return
        while not subscription.overflowed.is_set():
            try:
                event = await asyncio.wait_for(subscription.queue.get(), timeout=5.0)
            except TimeoutError:
                continue
            if not event.durable:
                # Never in the history, so never a duplicate of it.
                yield _sse(event)
                continue
            if event.id <= sent:
                if not recent.first_time(str(event.id)):
                    continue
                # Two writers (instances) took ids in one order and committed in the other:
                # this one is below what was sent. Send what the database holds of the gap
                # (this event, and any other whose notice was lost), without ids, so that
                # the client's resume point stays at ``sent``.
                for missed in await _gap(engine, task_id, event.id, sent, recent):
                    yield ServerSentEvent(event=missed.kind, data=json.dumps(missed.data))
                    if _ends_stream(missed):
                        return
                continue
            yield _sse(event)
            sent = event.id
            recent.first_time(str(event.id))
            if _ends_stream(event):
                return
        # Fell behind: end the stream; the client resumes from the database with its last id.
    finally:
        engine.hub.unsubscribe(subscription)
