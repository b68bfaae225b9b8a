"""Queries of templates, template grants and schedules (issue 20). Never commit: the engine
owns transactions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from opsplane.store.tables import (
    ScheduleFireRow,
    ScheduleRow,
    TaskRow,
    TemplateGrantRow,
    TemplateRow,
    TemplateVersionRow,
)


async def get_template(
    session: AsyncSession, name: str, *, for_update: bool = False
) -> TemplateRow | None:
    statement = select(TemplateRow).where(TemplateRow.name == name)
    if for_update:
        statement = statement.with_for_update()
    return (await session.execute(statement)).scalar_one_or_none()


async def get_version(session: AsyncSession, name: str, version: int) -> TemplateVersionRow | None:
    return await session.get(TemplateVersionRow, (name, version))


async def list_templates(
    session: AsyncSession, *, limit: int
) -> list[tuple[TemplateRow, TemplateVersionRow]]:
    statement = (
        select(TemplateRow, TemplateVersionRow)
        .join(
            TemplateVersionRow,
            (TemplateVersionRow.name == TemplateRow.name)
            & (TemplateVersionRow.version == TemplateRow.version),
        )
        .where(TemplateRow.deleted.is_(False))
        .order_by(TemplateRow.name)
        .limit(limit)
    )
    return [(t, v) for t, v in (await session.execute(statement)).all()]


async def grants_of_user(
    session: AsyncSession, user_id: str, template: str | None = None
) -> list[TemplateGrantRow]:
    statement = select(TemplateGrantRow).where(TemplateGrantRow.user_id == user_id)
    if template is not None:
        statement = statement.where(TemplateGrantRow.template == template)
    statement = statement.order_by(TemplateGrantRow.template, TemplateGrantRow.group_name)
    return list((await session.execute(statement)).scalars())


async def delete_grants(
    session: AsyncSession, user_id: str, template: str, groups: Sequence[str] | None
) -> int:
    statement = delete(TemplateGrantRow).where(
        TemplateGrantRow.user_id == user_id, TemplateGrantRow.template == template
    )
    if groups is not None:
        statement = statement.where(TemplateGrantRow.group_name.in_(list(groups)))
    result = await session.execute(statement)
    return int(getattr(result, "rowcount", 0) or 0)


async def get_schedule(
    session: AsyncSession, schedule_id: str, *, for_update: bool = False
) -> ScheduleRow | None:
    statement = select(ScheduleRow).where(ScheduleRow.id == schedule_id)
    if for_update:
        statement = statement.with_for_update()
    return (await session.execute(statement)).scalar_one_or_none()


async def list_schedules(
    session: AsyncSession, *, template: str | None = None, limit: int
) -> list[ScheduleRow]:
    statement = select(ScheduleRow).order_by(ScheduleRow.created_at, ScheduleRow.id).limit(limit)
    if template is not None:
        statement = statement.where(ScheduleRow.template == template)
    return list((await session.execute(statement)).scalars())


async def due_schedules(session: AsyncSession, now: datetime, *, limit: int) -> list[ScheduleRow]:
    statement = (
        select(ScheduleRow)
        .where(ScheduleRow.paused.is_(False), ScheduleRow.next_due <= now)
        .order_by(ScheduleRow.next_due)
        .limit(limit)
    )
    return list((await session.execute(statement)).scalars())


async def fires_of(
    session: AsyncSession, schedule_id: str, *, limit: int
) -> list[tuple[ScheduleFireRow, str | None]]:
    """A schedule's fires, newest due time first, with each launched task's status."""
    statement = (
        select(ScheduleFireRow, TaskRow.status)
        .outerjoin(TaskRow, TaskRow.id == ScheduleFireRow.task_id)
        .where(ScheduleFireRow.schedule_id == schedule_id)
        .order_by(ScheduleFireRow.due_at.desc())
        .limit(limit)
    )
    return [(fire, status) for fire, status in (await session.execute(statement)).all()]


async def task_status(session: AsyncSession, task_id: str) -> str | None:
    return (
        await session.execute(select(TaskRow.status).where(TaskRow.id == task_id))
    ).scalar_one_or_none()


async def task_state(session: AsyncSession, task_id: str) -> tuple[str, datetime | None] | None:
    """A task's status and when it finished, or None when it is gone."""
    row = (
        await session.execute(
            select(TaskRow.status, TaskRow.finished_at).where(TaskRow.id == task_id)
        )
    ).one_or_none()
    return None if row is None else (row[0], row[1])


async def advance_schedule(
    session: AsyncSession,
    schedule_id: str,
    *,
    expected: datetime,
    next_due: datetime,
    last_task_id: str | None,
    now: datetime,
) -> bool:
    """Move a schedule's next_due on, unless another instance already did (compare and set)."""
    values: dict[str, object] = {"next_due": next_due, "updated_at": now}
    if last_task_id is not None:
        values["last_task_id"] = last_task_id
    result = await session.execute(
        update(ScheduleRow)
        .where(ScheduleRow.id == schedule_id, ScheduleRow.next_due == expected)
        .values(**values)
    )
    return bool(getattr(result, "rowcount", 0))


async def previous_outcome(session: AsyncSession, task: TaskRow) -> str | None:
    """The status of the latest ended launch of ``task``'s template created before it
    (succeeded, failed or timed_out; canceled launches say nothing of the template)."""
    return (
        await session.execute(
            select(TaskRow.status)
            .where(
                TaskRow.template == task.template,
                TaskRow.id != task.id,
                TaskRow.created_at <= task.created_at,
                TaskRow.status.in_(("succeeded", "failed", "timed_out")),
            )
            .order_by(TaskRow.created_at.desc(), TaskRow.id.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
