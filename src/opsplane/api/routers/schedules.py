"""Schedules: a template launched on a cron expression or every N seconds (admin to change,
anyone to read); pause and resume; the history of its due times."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from opsplane.api.auditing import AuditDep
from opsplane.api.deps import Principal, get_engine, require, require_principal
from opsplane.api.schemas import Items
from opsplane.api.template_schemas import (
    FireOut,
    ScheduleIn,
    ScheduleOut,
    SchedulePatch,
    targets_of,
)
from opsplane.engine.core import Engine
from opsplane.engine.schedules import Schedule, ScheduleSpec, patch_fields
from opsplane.security.roles import Permission

router = APIRouter(prefix="/api/v1/schedules", tags=["schedules"])

EngineDep = Annotated[Engine, Depends(get_engine)]
ReaderDep = Annotated[Principal, Depends(require_principal)]
# Operators create schedules for the templates granted to them and change their own; the
# service decides (403 naming the template, the hosts or the owner).
RunnerDep = Annotated[Principal, Depends(require(Permission.RUN))]


def _out(schedule: Schedule) -> ScheduleOut:
    return ScheduleOut(**asdict(schedule))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ScheduleOut)
async def create_schedule(
    body: ScheduleIn, engine: EngineDep, principal: RunnerDep, audit: AuditDep
) -> ScheduleOut:
    """Launch ``template`` with ``params`` on ``cron`` (in ``timezone``) or every
    ``interval_seconds``; ``misfire`` and ``overlap`` say what happens to late or overlapping
    due times (docs/templates.md). An operator needs a grant for the template, and the
    targets must stay inside the granted groups."""
    spec = ScheduleSpec(
        template=body.template,
        params=body.params,
        targets=targets_of(body.targets) if body.targets is not None else None,
        cron=body.cron,
        timezone=body.timezone,
        interval_seconds=body.interval_seconds,
        misfire=body.misfire,
        misfire_window=body.misfire_window,
        overlap=body.overlap,
        paused=body.paused,
    )
    detail = {"template": body.template, "cron": body.cron, "interval": body.interval_seconds}
    async with audit.failures("schedule.create", target=body.template, detail=detail):
        schedule = await engine.schedules.create(spec, by=principal.name, principal=principal)
        await audit.record("schedule.create", target=schedule.id, detail=detail)
    return _out(schedule)


@router.get("", response_model=Items[ScheduleOut])
async def list_schedules(
    engine: EngineDep,
    _principal: ReaderDep,
    template: Annotated[str | None, Query(max_length=128)] = None,
) -> Items[ScheduleOut]:
    return Items[ScheduleOut](items=[_out(s) for s in await engine.schedules.all(template)])


@router.get("/{schedule_id}", response_model=ScheduleOut)
async def get_schedule(schedule_id: str, engine: EngineDep, _principal: ReaderDep) -> ScheduleOut:
    return _out(await engine.schedules.get(schedule_id))


@router.patch("/{schedule_id}", response_model=ScheduleOut)
async def update_schedule(
    schedule_id: str,
    body: SchedulePatch,
    engine: EngineDep,
    principal: RunnerDep,
    audit: AuditDep,
) -> ScheduleOut:
    """``{"paused": true}`` pauses, ``false`` resumes (from the next due time after now)."""
    fields = patch_fields(body.model_dump(exclude_unset=True))
    detail = {"fields": sorted(fields)}
    async with audit.failures("schedule.update", target=schedule_id, detail=detail):
        schedule = await engine.schedules.update(schedule_id, fields, principal=principal)
        await audit.record("schedule.update", target=schedule_id, detail=detail)
    return _out(schedule)


@router.delete("/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_schedule(
    schedule_id: str, engine: EngineDep, principal: RunnerDep, audit: AuditDep
) -> Response:
    async with audit.failures("schedule.delete", target=schedule_id):
        await engine.schedules.delete(schedule_id, principal=principal)
        await audit.record("schedule.delete", target=schedule_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{schedule_id}/history", response_model=Items[FireOut])
async def schedule_history(
    schedule_id: str,
    engine: EngineDep,
    _principal: ReaderDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Items[FireOut]:
    """Each handled due time, newest first: launched (with its task's status), skipped
    (overlap), missed (misfire) or error."""
    fires = await engine.schedules.history(schedule_id, limit)
    return Items[FireOut](items=[FireOut(**asdict(f)) for f in fires])
