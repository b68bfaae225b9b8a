"""Seed 000's API: SSH commands and uploads through a bastion to listed servers.

``POST /api/ssh/task`` and ``POST /api/upload/task`` answer with a task id at once;
``GET /api/ssh/task/{id}`` and ``GET /api/upload/task/{id}`` answer ``PENDING`` until every
server is done, then ``SUCCESS``/``FAILURE`` with a result per server (and command).
Request values override the configured defaults (``ssh_proxy``, ``ssh_user``, ``ssh_key_file``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, ConfigDict, Field

from opsplane.api.auditing import Audit, AuditDep
from opsplane.api.deps import Principal, get_engine, require_principal, seed_api
from opsplane.config import Settings
from opsplane.domain.errors import InvalidInput, NotFound
from opsplane.domain.targeting import Targets
from opsplane.engine.core import Engine
from opsplane.engine.sshapi import AdhocEndpoint, AdhocRequest
from opsplane.security.audit import targets_summary

# seed_api: compat_anonymous may open these routes to callers without credentials.
router = APIRouter(tags=["seed 000 (SSH API)"], dependencies=[Depends(seed_api("seed000"))])

EngineDep = Annotated[Engine, Depends(get_engine)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]


class TargetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=22, ge=1, le=65535)
    username: str | None = Field(default=None, max_length=255)
    password: str | None = Field(default=None, max_length=1024)
    key_file: str | None = Field(default=None, max_length=4096)
    private_key: str | None = Field(default=None, max_length=65536)


class _ProxyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    proxy_host: str | None = Field(default=None, max_length=255)
    proxy_port: int = Field(default=22, ge=1, le=65535)
    proxy_username: str | None = Field(default=None, max_length=255)
    proxy_password: str | None = Field(default=None, max_length=1024)
    proxy_key_file: str | None = Field(default=None, max_length=4096)
    proxy_private_key: str | None = Field(default=None, max_length=65536)
    targets: list[TargetIn | str] = Field(min_length=1, max_length=10_000)
    timeout: int | None = Field(default=None, ge=1)


class SshTaskIn(_ProxyFields):
    commands: list[str] = Field(min_length=1, max_length=1000)


class UploadTaskIn(_ProxyFields):
    local_path: str = Field(min_length=1, max_length=4096)
    remote_path: str = Field(min_length=1, max_length=4096)


class TaskIdOut(BaseModel):
    task_id: str


def _target(value: TargetIn | str, settings: Settings) -> AdhocEndpoint:
    if isinstance(value, str):
        user, _, address = value.rpartition("@")
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            host, port = address, "22"
        value = TargetIn(host=host.strip("[]"), port=int(port), username=user or None)
    return AdhocEndpoint(
        host=value.host,
        port=value.port,
        username=value.username or settings.ssh_user,
        password=value.password,
        key_file=value.key_file
        or (None if value.password or value.private_key else settings.ssh_key_file),
        private_key=value.private_key,
    )


def _request(body: _ProxyFields, settings: Settings, principal: Principal) -> dict[str, Any]:
    proxy = None
    if body.proxy_host:
        proxy = AdhocEndpoint(
            host=body.proxy_host,
            port=body.proxy_port,
            username=body.proxy_username or settings.ssh_user,
            password=body.proxy_password,
            key_file=body.proxy_key_file,
            private_key=body.proxy_private_key,
        )
    elif settings.ssh_proxy:
        user, _, address = settings.ssh_proxy.rpartition("@")
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            host, port = address, "22"
        proxy = AdhocEndpoint(host=host, port=int(port), username=user or settings.ssh_user,
                              key_file=settings.ssh_proxy_key_file)  # fmt: skip
    try:
        targets = [_target(t, settings) for t in body.targets]
    except ValueError as e:
        raise InvalidInput(f"bad target: {e}") from e
    return {
        "targets": targets,
        "proxy": proxy,
        "timeout": body.timeout,
        "created_by": principal.name,
    }


async def _submit(
    engine: Engine, audit: Audit, adhoc: AdhocRequest, detail: dict[str, Any]
) -> TaskIdOut:
    """Submit with the audit record written in the transaction that creates the (first) task,
    so that it is durable before anything is dispatched (api/auditing.py)."""
    targets = [t.name for t in adhoc.targets]
    detail = {
        **detail,
        "api": "seed000",
        "timeout": adhoc.timeout,
        "proxy": adhoc.proxy.name if adhoc.proxy is not None else None,
    }
    async with audit.failures(
        "task.create", targets=targets_summary({"hosts": targets}), detail=detail
    ):
        hook = audit.task_hook("task.create", Targets(hosts=tuple(targets)), detail)
        task_id = await engine.ssh_api.submit(adhoc, before_commit=hook)
    return TaskIdOut(task_id=task_id)


@router.post("/api/ssh/task", status_code=status.HTTP_201_CREATED, response_model=TaskIdOut)
async def create_ssh_task(
    body: SshTaskIn, request: Request, engine: EngineDep, principal: PrincipalDep, audit: AuditDep
) -> TaskIdOut:
    fields = _request(body, request.app.state.engine.settings, principal)
    detail = {"kind": "command", "commands": [audit.redact(c) for c in body.commands]}
    return await _submit(engine, audit, AdhocRequest(commands=body.commands, **fields), detail)


async def _result(engine: Engine, task_id: str) -> dict[str, Any]:
    """The seed's answer. An id that is not a seed-000 task is a 404, except under
    ``compat_anonymous`` for seed 000: then ``PENDING``, as the seed's Celery backend answers
    for an id it never saw (docs/ssh.md, "Unknown task ids")."""
    try:
        return await engine.ssh_api.result(task_id)
    except NotFound:
        if "seed000" not in engine.settings.compat_anonymous:
            raise
        return {"task_id": task_id, "status": "PENDING"}


@router.get("/api/ssh/task/{task_id}")
async def get_ssh_task(task_id: str, engine: EngineDep, _principal: PrincipalDep) -> dict[str, Any]:
    return await _result(engine, task_id)


@router.post("/api/upload/task", status_code=status.HTTP_201_CREATED, response_model=TaskIdOut)
async def create_upload_task(
    body: UploadTaskIn,
    request: Request,
    engine: EngineDep,
    principal: PrincipalDep,
    audit: AuditDep,
) -> TaskIdOut:
    fields = _request(body, request.app.state.engine.settings, principal)
    upload = (body.local_path, body.remote_path)
    detail = {"kind": "upload", "local_path": body.local_path, "remote_path": body.remote_path}
    return await _submit(engine, audit, AdhocRequest(upload=upload, **fields), detail)


@router.get("/api/upload/task/{task_id}")
async def get_upload_task(
    task_id: str, engine: EngineDep, _principal: PrincipalDep
) -> dict[str, Any]:
    return await _result(engine, task_id)
