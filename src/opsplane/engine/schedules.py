"""ScheduleService: templates launched on a cron expression or a fixed interval (issue 20).

Every control-plane instance runs the loop; none coordinates with another. A due time is
launched exactly once because its ``schedule_fires`` row (unique on schedule and due time) is
inserted in the transaction that creates the task, and the task carries the idempotency key
``schedule:<id>:<due time>``: the instance that loses the race gets the winner's task back and
creates nothing. What the policies do is ``domain.schedules``; the clock is injectable.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.errors import Forbidden, InvalidInput, NotFound, OpsplaneError
from opsplane.domain.ids import new_id
from opsplane.domain.records import TaskRecord
from opsplane.domain.roles import Principal, Role
from opsplane.domain.schedules import Decision, Timing, check_policies, decide
from opsplane.domain.states import TERMINAL_TASK_STATUSES
from opsplane.domain.targeting import Targets
from opsplane.domain.templates import resolve_params, targets_from_json, targets_json
from opsplane.engine.background import Supervised, run_periodically
from opsplane.engine.changes import Changes
from opsplane.engine.ports import SecretOpener
from opsplane.engine.templates import TemplateService
from opsplane.store import security_queries
from opsplane.store import template_queries as q
from opsplane.store.tables import ScheduleFireRow, ScheduleRow, utcnow

log = logging.getLogger(__name__)

MAX_LIST = 1000
# Schedules handled per pass; a pass that reaches it is followed by another one at once.
BATCH = 100
UPCOMING = 5
LAUNCHED, SKIPPED, MISSED, ERROR = "launched", "skipped", "missed", "error"
_TERMINAL = {status.value for status in TERMINAL_TASK_STATUSES}
# Writes the audit record of one launch in its transaction: (session, who, action, the task,
# its hosts, detail). Wired by the composition root to the security side's audit trail.
AuditLaunch = Callable[
    [AsyncSession, Principal, str, TaskRecord, list[str], dict[str, Any]], Awaitable[None]
]


@dataclass(frozen=True)
class Schedule:
    id: str
    template: str
    params: dict[str, Any]
    secret_params: list[str]
    targets: dict[str, Any] | None
    cron: str | None
    timezone: str
    interval_seconds: int | None
    misfire: str
    misfire_window: int
    overlap: str
    paused: bool
    next_fire_times: list[datetime]
    last_task_id: str | None
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class Fire:
    due_at: datetime
    at: datetime
    outcome: str
    task_id: str | None
    task_status: str | None
    detail: str | None


@dataclass(frozen=True)
class ScheduleSpec:
    """What a caller sets on a schedule (create, or the fields a PATCH changes)."""

    template: str
    params: Mapping[str, object]
    targets: Targets | None = None
    cron: str | None = None
    timezone: str = "UTC"
    interval_seconds: int | None = None
    misfire: str = "skip"
    misfire_window: int = 3600
    overlap: str = "skip"
    paused: bool = False


class ScheduleService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        templates: TemplateService,
        secrets: SecretOpener,
        *,
        tick: float = 1.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._write = write
        self._templates = templates
        self._secrets = secrets
        self._tick = tick
        self._clock = clock
        # Appends an audit record in the launching transaction; the app sets it (the security
        # service lives beside the engine, not in it). None: no record (engine-only tests).
        self.audit_launch: AuditLaunch | None = None
        self.loop = Supervised("schedules", self._loop)

    async def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    async def _loop(self) -> None:
        async def one_pass() -> bool:
            return await self.run_once() < BATCH

        await run_periodically(one_pass, interval=self._tick, what="the schedule pass", log=log)

    # CRUD --------------------------------------------------------------------------------

    async def create(
        self, spec: ScheduleSpec, *, by: str, principal: Principal | None = None
    ) -> Schedule:
        """A schedule of an existing template; its parameters are checked against the
        template now (and again at each launch, against the version then current). A caller
        other than an admin (``principal``) must hold a grant for the template, and the
        targets must stay inside the granted groups: checked now, and again at each fire."""
        now = self._clock()
        timing, plain, sealed = await self._checked(spec, anchor=now)
        if principal is not None and principal.the_role is not Role.ADMIN:
            granted = frozenset[str]()
            if principal.user_id is not None:
                granted = await self._templates.granted_groups(principal.user_id, spec.template)
            if not granted:
                raise Forbidden(
                    f"{principal.name} ({principal.role}) may not schedule template "
                    f"{spec.template}: it needs a grant for this template (or the admin role)"
                )
            await self._templates.check_reach(spec.template, spec.targets, granted)
        row = ScheduleRow(
            id=new_id(),
            template=spec.template,
            params=plain,
            secret_params=sealed,
            targets=targets_json(spec.targets) if spec.targets else None,
            cron=spec.cron,
            timezone=spec.timezone,
            interval_seconds=spec.interval_seconds,
            misfire=spec.misfire,
            misfire_window=spec.misfire_window,
            overlap=spec.overlap,
            paused=spec.paused,
            next_due=timing.after(now),
            created_by=by,
            created_at=now,
            updated_at=now,
        )
        async with self._write() as changes:
            changes.session.add(row)
        return self._view(row, now)

    async def update(
        self,
        schedule_id: str,
        changes_: Mapping[str, Any],
        *,
        principal: Principal | None = None,
    ) -> Schedule:
        """Pause, resume, or change params, timing or policies. A resumed or re-timed schedule
        is next due after now: the due times it was paused over are not launched."""
        now = self._clock()
        row = await self._row(schedule_id)
        _check_owner(row, principal)
        spec = replace(self._spec(row), **changes_)
        anchor = row.created_at
        timing, plain, sealed = await self._checked(spec, anchor=anchor, row=row, changes=changes_)
        async with self._write() as changes:
            fresh = await q.get_schedule(changes.session, schedule_id, for_update=True)
            if fresh is None:
                raise NotFound(f"schedule {schedule_id} not found")
            retimed = any(k in changes_ for k in ("cron", "timezone", "interval_seconds"))
            resumed = fresh.paused and not spec.paused
            fresh.params, fresh.secret_params = plain, sealed
            fresh.cron, fresh.timezone = spec.cron, spec.timezone
            fresh.interval_seconds = spec.interval_seconds
            fresh.misfire, fresh.misfire_window = spec.misfire, spec.misfire_window
            fresh.overlap, fresh.paused = spec.overlap, spec.paused
            if retimed or resumed:
                fresh.next_due = timing.after(now)
            fresh.updated_at = now
        return self._view(fresh, now)

    async def delete(self, schedule_id: str, *, principal: Principal | None = None) -> None:
        async with self._write() as changes:
            row = await q.get_schedule(changes.session, schedule_id, for_update=True)
            if row is None:
                raise NotFound(f"schedule {schedule_id} not found")
            _check_owner(row, principal)
            await changes.session.delete(row)

    async def get(self, schedule_id: str) -> Schedule:
        return self._view(await self._row(schedule_id), self._clock())

    async def all(self, template: str | None = None) -> list[Schedule]:
        now = self._clock()
        async with self._sessions() as session:
            rows = await q.list_schedules(session, template=template, limit=MAX_LIST)
        return [self._view(row, now) for row in rows]

    async def history(self, schedule_id: str, limit: int = 100) -> list[Fire]:
        """What became of the schedule's due times, newest first."""
        async with self._sessions() as session:
            if await q.get_schedule(session, schedule_id) is None:
                raise NotFound(f"schedule {schedule_id} not found")
            found = await q.fires_of(session, schedule_id, limit=limit)
        return [Fire(f.due_at, f.at, f.outcome, f.task_id, status, f.detail) for f, status in found]

    # Firing ------------------------------------------------------------------------------

    async def run_once(self, now: datetime | None = None) -> int:
        """Handle every due schedule once (at most BATCH); returns how many were due."""
        moment = now or self._clock()
        async with self._sessions() as session:
            due = await q.due_schedules(session, moment, limit=BATCH)
            states = {
                row.id: await q.task_state(session, row.last_task_id)
                for row in due
                if row.last_task_id
            }
        for row in due:
            try:
                await self._handle(row, states.get(row.id), moment)
            except OpsplaneError:
                log.exception("schedule %s: handling its due time failed", row.id)
        return len(due)

    async def _handle(
        self, row: ScheduleRow, previous: tuple[str, datetime | None] | None, now: datetime
    ) -> None:
        assert row.next_due is not None
        running = previous is not None and previous[0] not in _TERMINAL
        finished_at = previous[1] if previous is not None else None
        decision = decide(
            self._timing(row),
            row.next_due,
            now,
            misfire=row.misfire,
            misfire_window=row.misfire_window,
            overlap=row.overlap,
            previous_running=running,
            held=finished_at is not None and finished_at > row.next_due,
        )
        if decision.wait:
            return
        if decision.missed is not None:
            first, count = decision.missed
            await self._record(
                row.id,
                first,
                MISSED,
                detail=f"{count} due time(s) passed without a launch (misfire {row.misfire})",
            )
        if decision.skipped is not None:
            await self._record(
                row.id,
                decision.skipped,
                SKIPPED,
                detail=f"the previous launch {row.last_task_id} was still running",
            )
        task_id = await self._fire(row, decision, now) if decision.fire is not None else None
        assert decision.next_due is not None
        async with self._write() as changes:
            await q.advance_schedule(
                changes.session,
                row.id,
                expected=row.next_due,
                next_due=decision.next_due,
                last_task_id=task_id,
                now=now,
            )

    async def _fire(self, row: ScheduleRow, decision: Decision, now: datetime) -> str | None:
        due = decision.fire
        assert due is not None

        async def record(session: AsyncSession, task: TaskRecord, hosts: list[str]) -> None:
            session.add(
                ScheduleFireRow(
                    schedule_id=row.id, due_at=due, at=now, outcome=LAUNCHED, task_id=task.id
                )
            )
            if self.audit_launch is not None:
                await self.audit_launch(
                    session,
                    principal,
                    "schedule.launch",
                    task,
                    hosts,
                    {
                        "schedule": row.id,
                        "template": row.template,
                        "due_at": due.isoformat(),
                        "created_by": row.created_by,
                        "params": sorted(row.params) + sorted(row.secret_params),
                    },
                )

        try:
            principal = await self._authority(row)
            task = await self._templates.launch(
                row.template,
                {**row.params, **self._secrets.open(row.secret_params)},
                principal=principal,
                targets=targets_from_json(row.targets) if row.targets else None,
                before_commit=record,
                idempotency_key=f"schedule:{row.id}:{due.isoformat()}",
                created_by=f"schedule:{row.id}"[:255],
            )
        except IntegrityError:
            # Another instance fired this due time in the same moment: its task stands.
            return None
        except OpsplaneError as e:
            await self._record(row.id, due, ERROR, detail=str(e))
            return None
        return task.id

    async def _record(self, schedule_id: str, due: datetime, outcome: str, *, detail: str) -> None:
        try:
            async with self._write() as changes:
                changes.session.add(
                    ScheduleFireRow(
                        schedule_id=schedule_id,
                        due_at=due,
                        at=self._clock(),
                        outcome=outcome,
                        detail=detail[:2000],
                    )
                )
        except IntegrityError:
            pass  # another instance recorded this due time already

    async def _authority(self, row: ScheduleRow) -> Principal:
        """Whom a fire acts as, decided again at every fire from the creator's standing now:
        an admin's schedule fires as an admin; an operator's only on the groups a grant for
        the template still gives it. Forbidden (recorded as the fire's error) when the creator
        is disabled or holds no such grant any more. A creator without a user row is the
        bootstrap token (an admin; users are never deleted, only disabled)."""
        admin = Principal(name=f"schedule:{row.id}", role=Role.ADMIN, via="schedule")
        async with self._sessions() as session:
            user = await security_queries.user_by_name(session, row.created_by)
            if user is None:
                return admin
            if user.disabled:
                raise Forbidden(f"not launched: the schedule's creator {user.name} is disabled")
            if user.role == Role.ADMIN.value:
                return admin
            grants = await q.grants_of_user(session, user.id, row.template)
        if user.role != Role.OPERATOR.value or not grants:
            raise Forbidden(
                f"not launched: the schedule's creator {user.name} ({user.role}) no longer "
                f"holds a grant for template {row.template}"
            )
        # A viewer's scope is exactly its grants: the operator's own groups do not widen what
        # its schedule may reach.
        return Principal(
            name=f"schedule:{row.id}", role=Role.VIEWER, via="schedule", user_id=user.id
        )

    # Helpers -----------------------------------------------------------------------------

    async def _checked(
        self,
        spec: ScheduleSpec,
        *,
        anchor: datetime,
        row: ScheduleRow | None = None,
        changes: Mapping[str, Any] | None = None,
    ) -> tuple[Timing, dict[str, Any], dict[str, str]]:
        timing = Timing(
            cron=spec.cron,
            timezone=spec.timezone,
            interval_seconds=spec.interval_seconds,
            anchor=anchor,
        ).validated()
        check_policies(spec.misfire, spec.misfire_window, spec.overlap)
        template = await self._templates.get(spec.template)
        if row is not None and changes is not None and "params" not in changes:
            return timing, dict(row.params), dict(row.secret_params)
        resolve_params(template.spec.parameters, spec.params)
        secret_names = {p.name for p in template.spec.parameters if p.type == "secret"}
        plain = {k: v for k, v in spec.params.items() if k not in secret_names}
        secret = {k: str(v) for k, v in spec.params.items() if k in secret_names}
        return timing, plain, self._secrets.seal(secret)

    def _spec(self, row: ScheduleRow) -> ScheduleSpec:
        return ScheduleSpec(
            template=row.template,
            params=dict(row.params),
            targets=targets_from_json(row.targets) if row.targets else None,
            cron=row.cron,
            timezone=row.timezone,
            interval_seconds=row.interval_seconds,
            misfire=row.misfire,
            misfire_window=row.misfire_window,
            overlap=row.overlap,
            paused=row.paused,
        )

    async def _row(self, schedule_id: str) -> ScheduleRow:
        async with self._sessions() as session:
            row = await q.get_schedule(session, schedule_id)
        if row is None:
            raise NotFound(f"schedule {schedule_id} not found")
        return row

    @staticmethod
    def _timing(row: ScheduleRow) -> Timing:
        return Timing(
            cron=row.cron,
            timezone=row.timezone,
            interval_seconds=row.interval_seconds,
            anchor=row.created_at,
        )

    def _view(self, row: ScheduleRow, now: datetime) -> Schedule:
        upcoming: list[datetime] = []
        if not row.paused and row.next_due is not None:
            upcoming = self._timing(row).upcoming(max(row.next_due, now), UPCOMING)
            if row.next_due <= now:
                upcoming = [row.next_due, *upcoming[: UPCOMING - 1]]
        return Schedule(
            id=row.id,
            template=row.template,
            params=dict(row.params),
            secret_params=sorted(row.secret_params),
            targets=row.targets,
            cron=row.cron,
            timezone=row.timezone,
            interval_seconds=row.interval_seconds,
            misfire=row.misfire,
            misfire_window=row.misfire_window,
            overlap=row.overlap,
            paused=row.paused,
            next_fire_times=upcoming,
            last_task_id=row.last_task_id,
            created_by=row.created_by,
            created_at=row.created_at,
        )


def _check_owner(row: ScheduleRow, principal: Principal | None) -> None:
    """Admins change any schedule; an operator only the ones it created."""
    if principal is None or principal.the_role is Role.ADMIN:
        return
    if row.created_by != principal.name:
        raise Forbidden(
            f"{principal.name} ({principal.role}) may change only its own schedules; "
            f"schedule {row.id} is {row.created_by}'s"
        )


def patch_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ScheduleSpec fields a PATCH body sets (None values left out); switching between
    cron and interval_seconds clears the other."""
    fields = {k: v for k, v in body.items() if v is not None}
    if "cron" in fields and "interval_seconds" in fields:
        raise InvalidInput("give one of cron and interval_seconds")
    if "cron" in fields:
        fields["interval_seconds"] = None
    if "interval_seconds" in fields:
        fields["cron"] = None
    return fields
