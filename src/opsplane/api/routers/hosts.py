"""Hosts: the fleet as the control plane sees it."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from opsplane.api.deps import Principal, get_engine, require_principal
from opsplane.api.schemas import HostOut, Page
from opsplane.engine.core import Engine

router = APIRouter(prefix="/api/v1/hosts", tags=["hosts"])

EngineDep = Annotated[Engine, Depends(get_engine)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]


@router.get("", response_model=Page[HostOut])
async def list_hosts(
    engine: EngineDep,
    _principal: PrincipalDep,
    group: Annotated[str | None, Query(max_length=255)] = None,
    status: Annotated[Literal["online", "offline", "unknown"] | None, Query()] = None,
    page: Annotated[int, Query(ge=1)] = 1,
    size: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Page[HostOut]:
    rows, total = await engine.hosts.list_hosts(status=status, group=group, page=page, size=size)
    return Page[HostOut](
        items=[HostOut.from_row(r) for r in rows], total=total, page=page, size=size
    )


@router.get("/{name}", response_model=HostOut)
async def get_host(name: str, engine: EngineDep, _principal: PrincipalDep) -> HostOut:
    return HostOut.from_row(await engine.hosts.get_host(name))
