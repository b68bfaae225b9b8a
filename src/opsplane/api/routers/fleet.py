"""The fleet as a whole: counts for dashboards and a live stream of host changes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends
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
async def fleet_events(engine: EngineDep, _principal: PrincipalDep) -> EventSourceResponse:
    """Server-Sent Events: ``host`` (a host's current row, after a heartbeat or a status change)
    and ``summary`` (fleet counts), at most once a second. Load ``/api/v1/hosts`` first, then
    apply these; the stream carries changes only."""
    return EventSourceResponse(_host_stream(engine), ping=15)


async def _host_stream(engine: Engine) -> AsyncIterator[ServerSentEvent]:
    subscription = engine.hub.subscribe_hosts()
    try:
        while True:
            try:
                await asyncio.wait_for(subscription.wakeup.wait(), timeout=15.0)
            except TimeoutError:
                continue
            await asyncio.sleep(COALESCE_SECONDS)
            names = subscription.take()
            for host in await engine.hosts.hosts_named(names):
                yield ServerSentEvent(event="host", data=HostOut.from_row(host).model_dump_json())
            summary = await engine.hosts.fleet_summary()
            yield ServerSentEvent(event="summary", data=json.dumps(summary))
    finally:
        engine.hub.unsubscribe_hosts(subscription)
