"""Hosts: the fleet as the control plane sees it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, status

from opsplane.api.auditing import AuditDep
from opsplane.api.deps import Principal, get_engine, require, require_principal
from opsplane.api.schemas import (
    Cursor,
    HeartbeatOut,
    HostCreate,
    HostOut,
    HostRunOut,
    Items,
    Page,
    PageNumber,
    RunOut,
)
from opsplane.config import split_host_port
from opsplane.domain.errors import InvalidInput
from opsplane.domain.inventory import SshHostRequest
from opsplane.domain.paging import PageRequest
from opsplane.engine.core import Engine
from opsplane.security.roles import Permission

router = APIRouter(prefix="/api/v1/hosts", tags=["hosts"])

EngineDep = Annotated[Engine, Depends(get_engine)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
AdminDep = Annotated[Principal, Depends(require(Permission.ADMIN))]


@router.get("", response_model=Page[HostOut])
async def list_hosts(
    engine: EngineDep,
    _principal: PrincipalDep,
    group: Annotated[str | None, Query(max_length=255)] = None,
    status: Annotated[Literal["online", "offline", "unknown"] | None, Query()] = None,
    name: Annotated[
        str | None, Query(max_length=255, description="hosts whose name starts with this")
    ] = None,
    page: PageNumber = 1,
    size: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Cursor = None,
    adhoc: Annotated[
        bool, Query(description="also the ad-hoc SSH targets of seed-000 requests")
    ] = False,
) -> Page[HostOut]:
    """The inventory by name: every host but the control plane's own and, unless ``adhoc``,
    the ad-hoc SSH targets that seed-000 requests brought. Page with ``cursor`` (the answer's
    ``next_cursor``) or with ``page``."""
    found = await engine.hosts.list_hosts(
        PageRequest.of(page=page, size=size, cursor=cursor),
        status=status,
        group=group,
        name=name,
        include_adhoc=adhoc,
    )
    items = [HostOut.from_row(r) for r in found.items]
    return Page[HostOut].of(found, items, page=page, size=size)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=HostOut)
async def add_ssh_host(body: HostCreate, engine: EngineDep, _principal: PrincipalDep) -> HostOut:
    """Register (or update) an agentless host reached over SSH, optionally through bastions;
    or, with ``link: amqp``, a RabbitMQ agent's host with its groups and labels."""
    if body.link == "amqp":
        if body.ssh or body.key_file or body.bastion or body.bastion_key_file:
            raise InvalidInput("an amqp host takes no ssh, key_file or bastion")
        host = await engine.hosts.register_agent_host(
            body.name, body.link, tuple(body.groups), body.labels
        )
        return HostOut.from_row(host)
    if not body.ssh:
        raise InvalidInput("an SSH host needs ssh: [user@]address[:port]")
    user, _, address_port = body.ssh.rpartition("@")
    address, port = _split_port(address_port)
    request = SshHostRequest(
        name=body.name,
        address=address,
        port=port,
        user=user or None,
        key_file=body.key_file,
        bastions=body.bastion,
        bastion_key_file=body.bastion_key_file,
        groups=tuple(body.groups),
        labels=body.labels,
    )
    return HostOut.from_row(await engine.hosts.register_ssh_host(request))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_host(name: str, engine: EngineDep, _admin: AdminDep, audit: AuditDep) -> None:
    """Forget a host (admin). 409 for a connected agent (stop or revoke it first) and for a
    host with runs waiting or in flight; its past runs stay as history."""
    async with audit.failures("host.remove", target=name):
        host = await engine.hosts.remove_host(name)
        await audit.record("host.remove", target=name, detail={"link": host.link})


def _split_port(address_port: str) -> tuple[str, int]:
    try:
        return split_host_port(address_port)
    except ValueError:
        return address_port.strip("[]"), 22  # no port given: SSH's own


@router.get("/{name}/heartbeats", response_model=Items[HeartbeatOut])
async def host_heartbeats(
    name: str,
    engine: EngineDep,
    _principal: PrincipalDep,
    hours: Annotated[float, Query(gt=0, le=24)] = 3,
) -> Items[HeartbeatOut]:
    """CPU, memory, load and disk over the last ``hours`` (one point a minute)."""
    since = datetime.now(UTC) - timedelta(hours=hours)
    rows = await engine.hosts.heartbeat_history(name, since)
    return Items[HeartbeatOut](
        items=[
            HeartbeatOut(at=r.at, cpu_usage=r.cpu_usage, memory_usage=r.memory_usage,
                         load=r.load, disk_usage=r.disk_usage)
            for r in rows
        ]
    )  # fmt: skip


@router.get("/{name}/runs", response_model=Page[HostRunOut])
async def host_runs(
    name: str,
    engine: EngineDep,
    _principal: PrincipalDep,
    page: PageNumber = 1,
    size: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Cursor = None,
    output: Annotated[
        bool, Query(description="include each run's kept stdout and stderr (null otherwise)")
    ] = False,
) -> Page[HostRunOut]:
    """The host's recent runs, newest first, without their output unless ``output=true``."""
    found = await engine.hosts.runs_of_host(
        name, PageRequest.of(page=page, size=size, cursor=cursor), output=output
    )
    items = [
        HostRunOut(**RunOut.from_row(run, output=output).model_dump(), task_name=task.name,
                   task_kind=task.kind,
                   command=task.command)
        for run, task in found.items
    ]  # fmt: skip
    return Page[HostRunOut].of(found, items, page=page, size=size)


@router.get("/{name}", response_model=HostOut)
async def get_host(name: str, engine: EngineDep, _principal: PrincipalDep) -> HostOut:
    return HostOut.from_row(await engine.hosts.get_host(name))
