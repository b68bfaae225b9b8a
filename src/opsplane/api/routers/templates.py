"""Job templates: define (admin), read, launch (operators on their groups, and anyone on the
groups a grant gives for the template), and the grants themselves (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response, status

from opsplane.api.auditing import AuditDep
from opsplane.api.deps import Principal, get_engine, require, require_principal
from opsplane.api.schemas import Items, TaskOut
from opsplane.api.template_schemas import (
    GrantIn,
    GrantOut,
    LaunchIn,
    TemplateIn,
    TemplateOut,
    targets_of,
)
from opsplane.engine.changes import task_view
from opsplane.engine.core import Engine
from opsplane.engine.templates import Grant, Template
from opsplane.security.audit import targets_summary
from opsplane.security.roles import Permission

router = APIRouter(tags=["templates"])

EngineDep = Annotated[Engine, Depends(get_engine)]
ReaderDep = Annotated[Principal, Depends(require_principal)]
AdminDep = Annotated[Principal, Depends(require(Permission.ADMIN))]
# Launching is decided per template (role and grants): the service refuses with 403.
LauncherDep = Annotated[Principal, Depends(require(Permission.READ))]


def template_out(template: Template) -> TemplateOut:
    spec = template.spec.to_json()
    return TemplateOut(
        **spec,
        version=template.version,
        created_by=template.created_by,
        created_at=template.created_at,
        updated_by=template.updated_by,
        updated_at=template.updated_at,
    )


def _grant_out(grant: Grant) -> GrantOut:
    return GrantOut(user=grant.user, template=grant.template, groups=list(grant.groups))


@router.post("/api/v1/templates", status_code=status.HTTP_201_CREATED, response_model=TemplateOut)
async def create_template(
    body: TemplateIn, engine: EngineDep, principal: AdminDep, audit: AuditDep
) -> TemplateOut:
    """Create a template (version 1). 409 if the name exists."""
    async with audit.failures("template.create", target=body.name):
        template = await engine.templates.create(body.spec(), by=principal.name)
        await audit.record(
            "template.create",
            target=body.name,
            detail={"version": template.version, "command": audit.redact(body.command)},
        )
    return template_out(template)


@router.get("/api/v1/templates", response_model=Items[TemplateOut])
async def list_templates(engine: EngineDep, _principal: ReaderDep) -> Items[TemplateOut]:
    """Every template's current version, by name."""
    return Items[TemplateOut](items=[template_out(t) for t in await engine.templates.all()])


@router.get("/api/v1/templates/{name}", response_model=TemplateOut)
async def get_template(
    name: str,
    engine: EngineDep,
    _principal: ReaderDep,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> TemplateOut:
    """The current version, or ``version``."""
    return template_out(await engine.templates.get(name, version))


@router.put("/api/v1/templates/{name}", response_model=TemplateOut)
async def update_template(
    name: str, body: TemplateIn, engine: EngineDep, principal: AdminDep, audit: AuditDep
) -> TemplateOut:
    """A new version of the template; tasks keep the version they ran."""
    async with audit.failures("template.update", target=name):
        template = await engine.templates.update(
            name, body.spec(body.name or name), by=principal.name
        )
        await audit.record(
            "template.update",
            target=name,
            detail={"version": template.version, "command": audit.redact(body.command)},
        )
    return template_out(template)


@router.delete("/api/v1/templates/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_template(
    name: str, engine: EngineDep, _principal: AdminDep, audit: AuditDep
) -> Response:
    async with audit.failures("template.delete", target=name):
        await engine.templates.delete(name)
        await audit.record("template.delete", target=name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/api/v1/templates/{name}/launch",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskOut,
)
async def launch_template(
    name: str,
    body: LaunchIn,
    engine: EngineDep,
    principal: LauncherDep,
    audit: AuditDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> TaskOut:
    """Launch the template's current version as a task (201 with the task). Parameters reach
    the command only as ``PARAM_<NAME>`` environment variables. An ``Idempotency-Key``
    header returns the task it launched before."""
    targets = targets_of(body.targets) if body.targets is not None else None
    detail = {"template": name, "params": sorted(body.params)}
    summary = targets_summary(body.targets.model_dump()) if body.targets else None
    async with audit.failures("template.launch", target=name, targets=summary, detail=detail):
        task = await engine.templates.launch(
            name,
            body.params,
            principal=principal,
            targets=targets,
            before_commit=audit.task_hook("template.launch", targets, detail),
            idempotency_key=idempotency_key,
        )
    return TaskOut.model_validate(task_view(task))


@router.get("/api/v1/auth/me/template-grants", response_model=Items[GrantOut])
async def my_grants(engine: EngineDep, principal: ReaderDep) -> Items[GrantOut]:
    """The caller's own template grants (what the web page's launch forms offer a viewer)."""
    grants = await engine.templates.grants_for(principal)
    return Items[GrantOut](items=[_grant_out(g) for g in grants])


@router.get("/api/v1/users/{user}/template-grants", response_model=Items[GrantOut])
async def list_grants(user: str, engine: EngineDep, _principal: AdminDep) -> Items[GrantOut]:
    return Items[GrantOut](items=[_grant_out(g) for g in await engine.templates.grants(user)])


@router.post("/api/v1/users/{user}/template-grants", response_model=GrantOut)
async def grant_template(
    user: str, body: GrantIn, engine: EngineDep, principal: AdminDep, audit: AuditDep
) -> GrantOut:
    """Let ``user`` launch ``template`` on hosts of ``groups`` (whatever its role)."""
    detail = {"template": body.template, "groups": body.groups}
    async with audit.failures("template.grant", target=user, detail=detail):
        grant = await engine.templates.grant(user, body.template, body.groups, by=principal.name)
        await audit.record("template.grant", target=user, detail=detail)
    return _grant_out(grant)


@router.delete("/api/v1/users/{user}/template-grants/{template}", response_model=GrantOut)
async def revoke_template(
    user: str,
    template: str,
    engine: EngineDep,
    _principal: AdminDep,
    audit: AuditDep,
    group: Annotated[list[str] | None, Query(description="only these groups")] = None,
) -> GrantOut:
    detail = {"template": template, "groups": group}
    async with audit.failures("template.revoke", target=user, detail=detail):
        grant = await engine.templates.revoke(user, template, group)
        await audit.record("template.revoke", target=user, detail=detail)
    return _grant_out(grant)
