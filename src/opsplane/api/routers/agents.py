"""Agent enrollment: one-time tokens (admin), the enrollment itself (the token is the
credential), the enrolled agents and their revocation (admin)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from opsplane.agentdeploy.service import (
    AgentDeployer,
    DeployReport,
    DeployRequest,
    HostResult,
    OnResult,
    agent_server_address,
)
from opsplane.api.auditing import Audit, AuditDep
from opsplane.api.deps import (
    AgentsDep,
    DeployerDep,
    Principal,
    client_ip,
    get_engine,
    get_security,
    require,
)
from opsplane.api.schemas import Cursor, Items
from opsplane.domain.errors import Conflict, InvalidInput, OpsplaneError, Unauthenticated
from opsplane.domain.paging import PageRequest
from opsplane.domain.records import AgentRecord
from opsplane.engine.core import Engine
from opsplane.security.audit import AuditEntry
from opsplane.security.roles import Permission
from opsplane.security.signing import load_or_create_private_key, public_key_text

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/agents", tags=["agents"])
# opsplane_enrollments_refused_total's reason, by the error that refused the enrollment.
_ENROLL_REFUSALS: tuple[tuple[type[OpsplaneError], str], ...] = (
    (Unauthenticated, "unauthenticated"), (InvalidInput, "invalid"), (Conflict, "conflict"),
)  # fmt: skip

AdminDep = Annotated[Principal, Depends(require(Permission.ADMIN))]
EngineDep = Annotated[Engine, Depends(get_engine)]
MAX_TOKEN_LIFETIME = 30 * 86400


class EnrollmentTokenCreate(BaseModel):
    groups: list[str] = Field(default_factory=list, description="the groups the agent may join")
    expires_in: int = Field(
        default=86400, gt=0, le=MAX_TOKEN_LIFETIME, description="seconds the token stays usable"
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="the one host name the agent may enroll as (without it: any free name)",
    )


class EnrollmentTokenOut(BaseModel):
    id: str
    token: str = Field(description="shown this once: give it to one agent (--enroll)")
    groups: list[str]
    name: str | None = Field(default=None, description="the host name it is bound to, if any")
    expires_at: datetime


class EnrollIn(BaseModel):
    token: str = Field(min_length=1, max_length=255)
    name: str = Field(min_length=1, max_length=255, description="the agent's host name")
    public_key: str = Field(min_length=1, max_length=255, description="Ed25519, raw, base64")


class EnrolledOut(BaseModel):
    name: str
    groups: list[str]
    control_plane_key: str = Field(description="the key commands are signed with: pin it")


class AgentOut(BaseModel):
    name: str
    public_key: str
    groups: list[str]
    enrolled_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None

    @classmethod
    def from_row(cls, row: AgentRecord) -> AgentOut:
        return cls(
            name=row.name,
            public_key=row.public_key,
            groups=list(row.groups or ()),
            enrolled_at=row.enrolled_at,
            revoked_at=row.revoked_at,
            revoked_by=row.revoked_by,
        )


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=EnrollmentTokenOut)
async def create_enrollment_token(
    body: EnrollmentTokenCreate, agents: AgentsDep, principal: AdminDep, audit: AuditDep
) -> EnrollmentTokenOut:
    """A one-time token an agent enrolls with; the agent may join only ``groups``, and with
    ``name`` only as that host."""
    detail = {"groups": body.groups, "expires_in": body.expires_in, "name": body.name}
    async with audit.failures("agent.token", detail=detail):
        created = await agents.create_token(
            body.groups,
            created_by=principal.name,
            lifetime=timedelta(seconds=body.expires_in),
            name=body.name,
        )
        await audit.record("agent.token", target=created.token.id, detail=detail)
    return EnrollmentTokenOut(
        id=created.token.id,
        token=created.secret,
        groups=list(created.token.groups),
        name=created.token.name,
        expires_at=created.token.expires_at,
    )


@router.post("/enroll", status_code=status.HTTP_201_CREATED, response_model=EnrolledOut)
async def enroll(
    body: EnrollIn, request: Request, engine: EngineDep, agents: AgentsDep
) -> EnrolledOut:
    """Enroll an agent: the one-time token is the credential (no API token needed)."""
    try:
        row = await agents.enroll(body.token, body.name, body.public_key)
    except OpsplaneError as e:
        # Anyone may call this route: a refused attempt writes no audit record (its actor
        # and target would be whatever the caller chose, and a flood of them would bury the
        # trail); it is counted and logged instead.
        reason = next((r for kind, r in _ENROLL_REFUSALS if isinstance(e, kind)), "other")
        request.app.state.metrics.enrollments_refused.labels(reason).inc()
        log.warning("enrollment refused (%s) from %s", reason, client_ip(request) or "?")
        raise
    entry = AuditEntry(
        actor=f"agent:{row.name}", role="agent", action="agent.enroll",
        source_ip=client_ip(request), target=row.name, detail={"groups": row.groups},
    )  # fmt: skip
    await get_security(request).audit(entry)
    key, _ = load_or_create_private_key(engine.settings.signing_key_path)
    return EnrolledOut(
        name=row.name,
        groups=list(row.groups),
        control_plane_key=public_key_text(key.public_key()),
    )


@router.get("", response_model=Items[AgentOut])
async def list_agents(
    agents: AgentsDep,
    _principal: AdminDep,
    size: Annotated[int, Query(ge=1, le=1000)] = 1000,
    cursor: Cursor = None,
) -> Items[AgentOut]:
    """Enrolled agents by name, ``size`` at a time (follow ``next_cursor``)."""
    found = await agents.list_agents(PageRequest.of(page=1, size=size, cursor=cursor))
    items = [AgentOut.from_row(row) for row in found.items]
    return Items[AgentOut](items=items, next_cursor=found.next_cursor)


@router.post("/{name}/revoke", response_model=AgentOut)
async def revoke_agent(
    name: str, engine: EngineDep, principal: AdminDep, audit: AuditDep
) -> AgentOut:
    """Revoke an agent: its connection and every message it signs are refused from now on."""
    async with audit.failures("agent.revoke", target=name):
        row = await engine.revoke_agent(name, revoked_by=principal.name)
        await audit.record("agent.revoke", target=name)
    return AgentOut.from_row(row)


class DeployIn(BaseModel):
    group: str | None = Field(default=None, description="deploy to the SSH hosts of this group")
    hosts: list[str] = Field(default_factory=list, description="and/or these hosts, by name")
    server: str | None = Field(
        default=None,
        max_length=1024,
        description="the gRPC endpoint HOST:PORT as the hosts reach it [this control plane's "
        "grpc_listen, its host replaced by the API's when it listens on every address]",
    )
    api_url: str | None = Field(
        default=None, max_length=1024, description="the API as the hosts reach it, to enroll"
    )
    remote_dir: str | None = Field(
        default=None,
        max_length=1024,
        description="base directory on the hosts [/opt/opsplane-agent for root, else "
        "~/.opsplane-agent]; the agent lives in <base>/<host name>",
    )
    bundle: str | None = Field(
        default=None,
        max_length=4096,
        description="a bundle directory on the control plane [this installation's]",
    )
    parallel: int = Field(default=20, ge=1, le=500, description="hosts worked on at once")
    online_timeout: float = Field(default=90.0, gt=0, le=3600)
    drain_timeout: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="seconds a restart waits for the runs in flight on the host to end",
    )
    install: Literal["auto", "zipapp", "venv"] | None = Field(
        default=None,
        description="how the hosts get the agent's dependencies: auto (the bundle's where "
        "they load, else the host python3's, else a venv made by pip), zipapp (never a venv) "
        "or venv [the agent_deploy_install setting]",
    )
    stream: bool = Field(
        default=False,
        description="answer JSON lines (application/x-ndjson): one per host as it finishes "
        '({"type": "host", …}), then the report ({"type": "report", …})',
    )


class UpgradeIn(DeployIn):
    canary: int = Field(default=1, ge=0, description="hosts upgraded first, alone")
    max_errors: int = Field(default=0, ge=0, description="failures tolerated before stopping")


class HostDeployOut(BaseModel):
    host: str
    outcome: str = Field(description="deployed, current, failed or skipped")
    detail: str
    supervisor: str = Field(description="systemd, process, or empty when nothing started")
    seconds: float
    install: str = Field(
        default="",
        description="where the agent's dependencies come from: zipapp (the bundle's), system "
        "(the host python3's), venv (pip into a venv there), or empty when nothing was installed",
    )
    shown: str = Field(default="", description="the outcome as the CLI prints it")

    @classmethod
    def of(cls, result: HostResult) -> HostDeployOut:
        return cls(**vars(result), shown=result.shown)


class DeployOut(BaseModel):
    digest: str = Field(description="the bundle's SHA-256")
    seconds: float
    results: list[HostDeployOut]


@router.post("/deploy", response_model=DeployOut)
async def deploy_agents(
    body: DeployIn,
    request: Request,
    engine: EngineDep,
    deployer: DeployerDep,
    principal: AdminDep,
    audit: AuditDep,
) -> DeployOut | StreamingResponse:
    """Deploy the agent over SSH to a group's hosts (docs/operations.md, "Deploying agents");
    answered when every host is done."""
    return await _roll(body, request, engine, deployer, principal, audit, upgrade=False)


@router.post("/upgrade", response_model=DeployOut)
async def upgrade_agents(
    body: UpgradeIn,
    request: Request,
    engine: EngineDep,
    deployer: DeployerDep,
    principal: AdminDep,
    audit: AuditDep,
) -> DeployOut | StreamingResponse:
    """Replace the agents deployed over SSH: ``canary`` hosts first, stopping after
    ``max_errors`` failures."""
    return await _roll(body, request, engine, deployer, principal, audit, upgrade=True)


async def _roll(
    body: DeployIn,
    request: Request,
    engine: Engine,
    deployer: AgentDeployer,
    principal: Principal,
    audit: Audit,
    *,
    upgrade: bool,
) -> DeployOut | StreamingResponse:
    action = "agent.upgrade" if upgrade else "agent.deploy"
    wanted = DeployRequest(
        server=body.server
        or agent_server_address(engine.settings.grpc_listen, request.url.hostname),
        api_url=body.api_url or str(request.base_url).rstrip("/"),
        group=body.group,
        hosts=tuple(body.hosts),
        remote_dir=body.remote_dir,
        bundle=body.bundle,
        parallel=body.parallel,
        online_timeout=body.online_timeout,
        drain_timeout=body.drain_timeout,
        created_by=principal.name,
        canary=body.canary if isinstance(body, UpgradeIn) else 0,
        max_errors=body.max_errors if isinstance(body, UpgradeIn) else 0,
        install=body.install or "",
    )
    detail: dict[str, object] = {"group": body.group, "hosts": body.hosts, "bundle": body.bundle}
    roll = deployer.upgrade if upgrade else deployer.deploy
    if body.stream:
        async with audit.failures(action, detail=detail):
            await deployer.check(wanted)  # a request that deploys nowhere is still a 4xx
        return StreamingResponse(
            _streamed(roll, wanted, audit, action, detail), media_type="application/x-ndjson"
        )
    async with audit.failures(action, detail=detail):
        report = await roll(wanted)
        await _audit_report(audit, action, detail, report)
    return _report_out(report)


def _report_out(report: DeployReport) -> DeployOut:
    return DeployOut(
        digest=report.digest,
        seconds=round(report.seconds, 2),
        results=[HostDeployOut.of(r) for r in report.results],
    )


async def _audit_report(
    audit: Audit, action: str, detail: dict[str, object], report: DeployReport
) -> None:
    outcomes = {r.host: r.outcome for r in report.results}
    await audit.record(action, detail={**detail, "digest": report.digest, "results": outcomes})


async def _streamed(
    roll: Callable[[DeployRequest, OnResult | None], Awaitable[DeployReport]],
    wanted: DeployRequest,
    audit: Audit,
    action: str,
    detail: dict[str, object],
) -> AsyncIterator[bytes]:
    """Each host's result as it is known, then the report; the deploy goes on (and is audited)
    if the client goes away, as the unstreamed one does."""
    results: asyncio.Queue[HostResult] = asyncio.Queue()

    async def work() -> DeployReport:
        async with audit.failures(action, detail=detail):
            report = await roll(wanted, results.put_nowait)
            await _audit_report(audit, action, detail, report)
        return report

    job = asyncio.ensure_future(work())
    _deploys.add(job)
    job.add_done_callback(_deploys.discard)
    while True:
        getter = asyncio.ensure_future(results.get())
        await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            line = {"type": "host", **HostDeployOut.of(getter.result()).model_dump()}
            yield (json.dumps(line) + "\n").encode()
            continue
        getter.cancel()
        break
    while not results.empty():
        line = {"type": "host", **HostDeployOut.of(results.get_nowait()).model_dump()}
        yield (json.dumps(line) + "\n").encode()
    try:
        report = job.result()
    except OpsplaneError as e:
        yield (json.dumps({"type": "error", "detail": str(e)}) + "\n").encode()
        return
    yield (json.dumps({"type": "report", **_report_out(report).model_dump()}) + "\n").encode()


# Streamed deploys run on when their client goes away; held here so they are not collected.
_deploys: set[asyncio.Future[DeployReport]] = set()
