"""The fleet as a whole: counts for dashboards and a live stream of host changes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from opsplane.api.deps import Principal, get_engine, require_principal
from opsplane.api.schemas import HostOut
from opsplane.engine.core import Engine

router = APIRouter(prefix="/api/v1/fleet", tags=["fleet"])

EngineDep = Annotated[Engine, Depends(get_engine)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
# Heartbeats of a large fleet arrive continuously; sending changed hosts at most this often keeps
# a browser responsive with 10,000 hosts.
COALESCE_SECONDS = 1.0


class FleetSummary(BaseModel):
    online: int
    offline: int
    unknown: int
    total: int
    running_tasks: int


@router.get("/summary", response_model=FleetSummary)
async def fleet_summary(engine: EngineDep, _principal: PrincipalDep) -> FleetSummary:
    return FleetSummary(**await engine.hosts.fleet_summary())


@router.get("/events")
async def fleet_events(
    engine: EngineDep,
    _principal: PrincipalDep,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    since: Annotated[
        str | None,
        Query(max_length=64, description="resume point (an event id) when a header cannot be set"),
    ] = None,
) -> EventSourceResponse:
    """Server-Sent Events: ``host`` (a changed host's current row), ``gone`` (a removed host's
    name) and ``summary`` (fleet counts), at most once a second; the stream carries changes
    only. Load ``/api/v1/hosts`` first, then apply these. Each ``summary`` carries an id: a
    client that reconnects with it (``Last-Event-ID``, or ``since``) gets the hosts changed
    meanwhile, or a ``reset`` event when they cannot be told (the server restarted): reload
    the list then."""
    return EventSourceResponse(_host_stream(engine, last_event_id or since), ping=15)


async def _host_stream(engine: Engine, resume: str | None) -> AsyncIterator[ServerSentEvent]:
    changes = engine.hub.host_log
    # Subscribe before reading the log: a change in between arrives twice, never not at all.
    subscription = engine.hub.subscribe_hosts()
    try:
        missed = changes.since(resume) if resume else set()
        point = changes.point()
        if missed is None:
            yield ServerSentEvent(event="reset", data="{}")
        else:
            async for event in _hosts(engine, missed):
                yield event
        yield await _summary(engine, point)
        while True:
            try:
                await asyncio.wait_for(subscription.wakeup.wait(), timeout=15.0)
            except TimeoutError:
                continue
            await asyncio.sleep(COALESCE_SECONDS)
            # Together, with no await between: the point covers exactly the names taken.
            names = subscription.take()
            point = changes.point()
            async for event in _hosts(engine, names):
                yield event
            yield await _summary(engine, point)
    finally:
        engine.hub.unsubscribe_hosts(subscription)


async def _hosts(engine: Engine, names: set[str]) -> AsyncIterator[ServerSentEvent]:
    found = await engine.hosts.hosts_named(names)
    for host in found:
        yield ServerSentEvent(event="host", data=HostOut.from_row(host).model_dump_json())
    for name in sorted(names - {host.name for host in found}):
        yield ServerSentEvent(event="gone", data=json.dumps({"name": name}))


async def _summary(engine: Engine, point: str) -> ServerSentEvent:
    summary = await engine.hosts.fleet_summary()
    return ServerSentEvent(id=point, event="summary", data=json.dumps(summary))
