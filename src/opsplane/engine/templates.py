"""TemplateService: job templates (issue 20) — create, version, delete, grant, launch.

A launch is a task like any other (``TaskService.create_task``): the template's command,
default targets, timeout and policy, with the parameter values as ``PARAM_<NAME>``
environment variables. The task records the template's name and the version that ran.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.errors import Conflict, Forbidden, InvalidInput, NotFound
from opsplane.domain.ids import new_id
from opsplane.domain.records import TaskRecord
from opsplane.domain.roles import Permission, Principal
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import ExecSpec, TaskRequest
from opsplane.domain.templates import Launch, TemplateSpec, check_template_name, resolve_params
from opsplane.engine.changes import Changes
from opsplane.engine.ports import SecretOpener
from opsplane.engine.service import BeforeCommit, TaskService
from opsplane.store import security_queries
from opsplane.store import template_queries as q
from opsplane.store.tables import (
    TemplateGrantRow,
    TemplateRow,
    TemplateVersionRow,
    UserRow,
    utcnow,
)

MAX_LIST = 1000


@dataclass(frozen=True)
class ScriptRun:
    """How a seed-003 script of the script directory runs: what the composition root's
    resolver (``remoterun``) answers for a template of kind ``script``."""

    command: str
    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str]
    sha256: str | None = None


# script_path -> how it runs; InvalidInput or the script directory's refusal otherwise.
ScriptResolver = Callable[[str], Awaitable[ScriptRun]]


@dataclass(frozen=True)
class Template:
    """One version of a template, as the API shows it."""

    spec: TemplateSpec
    version: int
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime


@dataclass(frozen=True)
class Grant:
    user: str
    template: str
    groups: tuple[str, ...]


def launch_scope(
    principal: Principal, granted: frozenset[str], template: str
) -> frozenset[str] | None:
    """The groups ``principal`` may launch ``template`` on (None: anywhere): its own groups if
    its role may run commands, plus the groups granted to it for this template. Forbidden when
    neither gives it any."""
    if principal.can(Permission.RUN):
        own = principal.allowed_groups
        return None if own is None else own | granted
    if not granted:
        raise Forbidden(
            f"{principal.name} ({principal.role}) may not launch template {template}: it needs "
            "the operator role or a grant for this template"
        )
    return granted


class TemplateService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        tasks: TaskService,
        secrets: SecretOpener,
    ) -> None:
        self._sessions = sessions
        self._write = write
        self._tasks = tasks
        self._secrets = secrets
        # Templates of kind "script": set by the composition root (the engine does not know
        # the script directory). None: such templates are refused.
        self._scripts: ScriptResolver | None = None
        self._local_host = ""

    def use_scripts(self, resolver: ScriptResolver, local_host: str) -> None:
        self._scripts = resolver
        self._local_host = local_host

    async def _script(self, spec: TemplateSpec) -> ScriptRun:
        if self._scripts is None:
            raise InvalidInput(
                "kind script needs a script directory: start the server with --script-dir DIR"
            )
        try:
            return await self._scripts(spec.command)
        except NotFound as e:
            # The template names the script: a missing one is a bad definition (422).
            raise InvalidInput(f"template {spec.name}: {e}") from e

    # Templates ---------------------------------------------------------------------------

    async def create(self, spec: TemplateSpec, *, by: str) -> Template:
        """A new template at version 1 (a deleted name comes back at its next version)."""
        spec = spec.validated()
        if spec.kind == "script":
            await self._script(spec)  # the script exists (and, pinned, is approved)
        now = utcnow()
        try:
            async with self._write() as changes:
                row = await q.get_template(changes.session, spec.name, for_update=True)
                if row is not None and not row.deleted:
                    raise Conflict(f"template {spec.name} exists; PUT to change it")
                if row is None:
                    row = TemplateRow(name=spec.name, version=0, created_by=by, created_at=now)
                    changes.session.add(row)
                row.deleted = False
                row.version += 1
                row.created_by, row.created_at, row.updated_at = by, now, now
                version = self._version(spec, row.version, by, now)
                changes.session.add(version)
        except IntegrityError as e:
            raise Conflict(f"template {spec.name} was created at the same time") from e
        return _template(row, version)

    async def update(self, name: str, spec: TemplateSpec, *, by: str) -> Template:
        """A new version of ``name``; earlier versions stay, for the tasks that ran them."""
        if spec.name != name:
            raise InvalidInput(
                f"the body names {spec.name!r}, the path {name!r}: rename by "
                "creating a new template"
            )
        spec = spec.validated()
        if spec.kind == "script":
            await self._script(spec)
        now = utcnow()
        async with self._write() as changes:
            row = await self._live(changes.session, name, for_update=True)
            row.version += 1
            row.updated_at = now
            version = self._version(spec, row.version, by, now)
            changes.session.add(version)
        return _template(row, version)

    async def delete(self, name: str) -> None:
        """Forget the name (its versions stay for the tasks' history). Refused while a schedule
        launches it."""
        async with self._write() as changes:
            row = await self._live(changes.session, name, for_update=True)
            schedules = await q.list_schedules(changes.session, template=name, limit=20)
            if schedules:
                ids = ", ".join(s.id for s in schedules)
                raise Conflict(
                    f"template {name} is launched by schedule(s) {ids}: delete them first"
                )
            row.deleted = True
            row.updated_at = utcnow()

    async def get(self, name: str, version: int | None = None) -> Template:
        async with self._sessions() as session:
            row = await self._live(session, name)
            found = await q.get_version(session, name, version or row.version)
            if found is None:
                raise NotFound(f"template {name} has no version {version}")
            return _template(row, found)

    async def all(self) -> list[Template]:
        async with self._sessions() as session:
            return [_template(t, v) for t, v in await q.list_templates(session, limit=MAX_LIST)]

    # Grants ------------------------------------------------------------------------------

    async def grant(self, user: str, template: str, groups: list[str], *, by: str) -> Grant:
        """Let ``user`` launch ``template`` on hosts of ``groups`` (added to what it had)."""
        check_template_name(template)
        cleaned = sorted({g.strip() for g in groups})
        if not cleaned or "" in cleaned:
            raise InvalidInput("grant at least one group, none blank")
        async with self._write() as changes:
            await self._live(changes.session, template)
            row = await self._user(changes.session, user)
            have = {g.group_name for g in await q.grants_of_user(changes.session, row.id, template)}
            for group in cleaned:
                if group not in have:
                    changes.session.add(
                        TemplateGrantRow(
                            id=new_id(),
                            user_id=row.id,
                            template=template,
                            group_name=group,
                            created_by=by,
                            created_at=utcnow(),
                        )
                    )
        return await self._grant_of(user, template)

    async def revoke(self, user: str, template: str, groups: list[str] | None) -> Grant:
        """Take back ``groups`` (None: all) of ``user``'s grant for ``template``."""
        async with self._write() as changes:
            row = await self._user(changes.session, user)
            await q.delete_grants(changes.session, row.id, template, groups)
        return await self._grant_of(user, template)

    async def grants(self, user: str) -> list[Grant]:
        async with self._sessions() as session:
            row = await self._user(session, user)
            rows = await q.grants_of_user(session, row.id)
        by_template: dict[str, list[str]] = {}
        for grant in rows:
            by_template.setdefault(grant.template, []).append(grant.group_name)
        return [Grant(user, t, tuple(g)) for t, g in by_template.items()]

    async def grants_for(self, principal: Principal) -> list[Grant]:
        """The caller's own grants (none for a token without a user)."""
        if principal.user_id is None:
            return []
        return await self.grants(principal.name)

    async def granted_groups(self, user_id: str, template: str) -> frozenset[str]:
        async with self._sessions() as session:
            rows = await q.grants_of_user(session, user_id, template)
        return frozenset(g.group_name for g in rows)

    async def check_reach(
        self, name: str, targets: Targets | None, allowed_groups: frozenset[str] | None
    ) -> list[str]:
        """Forbidden, naming the hosts, unless every host a launch of ``name`` on ``targets``
        (None: the template's own) would reach today is inside ``allowed_groups``."""
        template = await self.get(name)
        if template.spec.kind == "script":
            raise Forbidden(
                f"template {name} runs a script on the control plane: only an admin schedules it"
            )
        chosen = targets if targets is not None and not targets.is_empty() else None
        return await self._tasks.check_reach(
            chosen or template.spec.targets, allowed_groups, kind=template.spec.kind
        )

    async def _grant_of(self, user: str, template: str) -> Grant:
        for grant in await self.grants(user):
            if grant.template == template:
                return grant
        return Grant(user, template, ())

    # Launch ------------------------------------------------------------------------------

    async def launch(
        self,
        name: str,
        params: Mapping[str, object],
        *,
        principal: Principal,
        targets: Targets | None = None,
        before_commit: BeforeCommit | None = None,
        idempotency_key: str | None = None,
        created_by: str | None = None,
    ) -> TaskRecord:
        """A task running template ``name``'s current version with ``params``, on ``targets``
        or the template's own. NotFound, InvalidInput naming the parameter, or Forbidden (the
        caller may launch it only on its groups and granted groups)."""
        template = await self.get(name)
        launch = resolve_params(template.spec.parameters, params)
        if template.spec.kind == "script":
            return await self._launch_script(
                template,
                launch,
                principal=principal,
                targets=targets,
                before_commit=before_commit,
                idempotency_key=idempotency_key,
                created_by=created_by,
            )
        granted: frozenset[str] = frozenset()
        if principal.user_id is not None:
            async with self._sessions() as session:
                rows = await q.grants_of_user(session, principal.user_id, name)
            granted = frozenset(g.group_name for g in rows)
        allowed = launch_scope(principal, granted, name)
        request = self.task_request(
            template,
            launch,
            targets=targets,
            created_by=created_by or principal.name,
            allowed_groups=allowed,
            idempotency_key=idempotency_key,
        )
        return await self._tasks.create_task(request, before_commit=before_commit)

    async def _launch_script(
        self,
        template: Template,
        launch: Launch,
        *,
        principal: Principal,
        targets: Targets | None,
        before_commit: BeforeCommit | None,
        idempotency_key: str | None,
        created_by: str | None,
    ) -> TaskRecord:
        """A seed-003 script on the control plane's own host. A grant names groups of hosts
        and this runs on none of them: it takes the operator role, as seed 003's POST /tasks
        does."""
        name = template.spec.name
        if not principal.can(Permission.RUN):
            raise Forbidden(
                f"{principal.name} ({principal.role}) may not launch script template {name}: "
                "it runs on the control plane, which takes the operator role (a grant names "
                "groups of hosts)"
            )
        if targets is not None and not targets.is_empty():
            raise InvalidInput(
                f"template {name} runs a script on the control plane's own host: it takes no "
                "targets"
            )
        run = await self._script(template.spec)
        request = self.task_request(
            template,
            launch,
            targets=Targets(hosts=(self._local_host,)),
            created_by=created_by or principal.name,
            allowed_groups=None,
            idempotency_key=idempotency_key,
        )
        meta = dict(request.spec.meta) if request.spec else {}
        meta.update(script_path=template.spec.command, sha256=run.sha256)
        spec = ExecSpec(
            argv=run.argv,
            cwd=run.cwd,
            env={**launch.env, **run.env},
            secret_env=request.spec.secret_env if request.spec else {},
            meta=meta,
        )
        return await self._tasks.create_task(
            replace(request, kind="script", command=run.command, spec=spec),
            before_commit=before_commit,
        )

    def task_request(
        self,
        template: Template,
        launch: Launch,
        *,
        targets: Targets | None,
        created_by: str,
        allowed_groups: frozenset[str] | None,
        idempotency_key: str | None = None,
    ) -> TaskRequest:
        spec = template.spec
        meta: dict[str, object] = {
            "template": spec.name,
            "template_version": template.version,
            "params": dict(launch.values),
        }
        if launch.secret_env:
            meta["secret_params"] = sorted(launch.secret_env)
        return TaskRequest(
            kind=spec.kind,
            command=spec.command,
            spec=ExecSpec(
                env=launch.env, secret_env=self._secrets.seal(launch.secret_env), meta=meta
            ),
            targets=targets if targets is not None and not targets.is_empty() else spec.targets,
            timeout=spec.timeout,
            name=spec.name,
            description=spec.description,
            created_by=created_by,
            allowed_groups=allowed_groups,
            policy=spec.policy,
            idempotency_key=idempotency_key,
            template=spec.name,
            template_version=template.version,
        )

    # Helpers -----------------------------------------------------------------------------

    @staticmethod
    def _version(spec: TemplateSpec, version: int, by: str, at: datetime) -> TemplateVersionRow:
        return TemplateVersionRow(
            name=spec.name, version=version, definition=spec.to_json(), created_by=by, created_at=at
        )

    @staticmethod
    async def _live(session: AsyncSession, name: str, *, for_update: bool = False) -> TemplateRow:
        row = await q.get_template(session, name, for_update=for_update)
        if row is None or row.deleted:
            raise NotFound(f"template {name} not found")
        return row

    @staticmethod
    async def _user(session: AsyncSession, name: str) -> UserRow:
        row = await security_queries.user_by_name(session, name)
        if row is None:
            raise NotFound(f"user {name} not found")
        return row


def _template(row: TemplateRow, version: TemplateVersionRow) -> Template:
    return Template(
        spec=TemplateSpec.from_json(version.definition),
        version=version.version,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_by=version.created_by,
        updated_at=version.created_at,
    )
