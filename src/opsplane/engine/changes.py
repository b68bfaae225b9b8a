"""The one path by which run and task state changes: ``Changes`` applies moves inside a
transaction, records the matching task events, and settles the tasks it touched."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from opsplane.domain.errors import InvalidTransition
from opsplane.domain.records import TaskRecord
from opsplane.domain.states import (
    TERMINAL_RUN_STATUSES,
    RunStatus,
    TaskStatus,
    move_run,
    move_task,
    task_outcome,
)
from opsplane.store import queries
from opsplane.store.tables import RunRow, TaskRow, utcnow

log = logging.getLogger(__name__)

COUNT_KEYS = tuple(status.value for status in RunStatus)


@dataclass(frozen=True)
class TaskEvent:
    """An event as subscribers see it. A durable event has its row's id; a live-only one (output
    past what the database keeps of a run, see ``Ingest``) was never stored and cannot be
    replayed: its ``id`` is that of the durable event before it in its transaction, 0 if none,
    and says nothing about duplicates."""

    id: int
    task_id: str
    kind: str
    data: dict[str, Any]
    durable: bool = True


@dataclass
class _StoredEvent:
    """A durable event of this transaction: its row is inserted with the others in one
    statement as the transaction settles (``id`` 0 until then)."""

    task_id: str
    run_id: str | None
    kind: str
    data: dict[str, Any]
    created_at: datetime = field(default_factory=utcnow)
    id: int = 0


def run_event_data(run: RunRow) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "host": run.host,
        "attempt": run.attempt,
        "status": run.status,
        "exit_code": run.exit_code,
        "error": run.error,
        "duration_ms": run.duration_ms,
    }


def counts_view(counts: dict[str, int], total: int) -> dict[str, int]:
    view = {"total": total}
    view.update({key: counts.get(key, 0) for key in COUNT_KEYS})
    return view


def task_view(task: TaskRecord | TaskRow) -> dict[str, Any]:
    """The public JSON shape of a task (the API and the event stream share it)."""
    counts = counts_view(task.counts or {}, task.total)
    finished = sum(counts[s.value] for s in TERMINAL_RUN_STATUSES)
    return {
        "id": task.id,
        "name": task.name,
        "description": task.description,
        "kind": task.kind,
        "command": task.command,
        "targets": task.targets,
        "timeout": task.timeout,
        "status": task.status,
        "created_by": task.created_by,
        "priority": task.priority or 0,
        "policy": task.policy,
        "deadline_at": _iso(task.deadline_at),
        "stop_reason": task.stop_reason,
        "rerun_of": task.rerun_of,
        "run_as": task.run_as,
        "template": (
            {"name": task.template, "version": task.template_version} if task.template else None
        ),
        "created_at": _iso(task.created_at),
        "started_at": _iso(task.started_at),
        "finished_at": _iso(task.finished_at),
        "counts": counts,
        "progress": {
            "finished": finished,
            "total": task.total,
            "percent": round(100.0 * finished / task.total, 1) if task.total else 100.0,
        },
        **_seed001_names(task, counts),
    }


# Hosts whose latest run ended badly, in seed 001's ``failed_hosts``: its delivery failures,
# execution failures and timeouts (a canceled host is neither completed nor failed).
_FAILED_HOST_STATUSES = (
    RunStatus.FAILED,
    RunStatus.TIMED_OUT,
    RunStatus.UNDELIVERABLE,
    RunStatus.LOST,
)


def _seed001_names(task: TaskRecord | TaskRow, counts: dict[str, int]) -> dict[str, Any]:
    """Seed 001's task fields, from opsplane's counts (docs/compat.md): ``completed_hosts`` is
    the seed's "执行完成" (done, succeeded), ``updated_at`` the task's last change of state."""
    changed = [at for at in (task.created_at, task.started_at, task.finished_at) if at]
    return {
        "task_id": task.id,
        "total_hosts": task.total,
        "completed_hosts": counts[RunStatus.SUCCEEDED.value],
        "failed_hosts": sum(counts[status.value] for status in _FAILED_HOST_STATUSES),
        "updated_at": _iso(max(changed)) if changed else None,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# Called when settling, with the touched tasks and the runs that ended in this transaction:
# the scheduler's follow-up (retries, max_errors, canary), which may move or add runs.
RunsEnded = Callable[["Changes", dict[str, TaskRow], list[RunRow]], Awaitable[None]]


class Changes:
    """State changes within one transaction. After commit, ``events`` hold their ids."""

    def __init__(self, session: AsyncSession, on_runs_ended: RunsEnded | None = None) -> None:
        self.session = session
        # In order: rows to store, and live-only events published but never stored.
        self._event_rows: list[_StoredEvent | TaskEvent] = []
        self._touched: set[str] = set()
        self._ended: list[RunRow] = []
        self._on_runs_ended = on_runs_ended
        self.hosts_changed: set[str] = set()
        # Whether capacity was freed or work added: the scheduler should look again.
        self.schedule_again = False

    def move(self, run: RunRow, new: RunStatus, **fields: Any) -> bool:
        """Move ``run`` to ``new`` and set ``fields``; False (and no change) when illegal.

        Illegal moves are expected, not errors: a duplicate or late report from a host about a
        run that already ended must change nothing (DESIGN §3.2 idempotency).
        """
        try:
            run.status = move_run(run.status, new)
        except InvalidTransition as e:
            log.debug("ignored report for run %s: %s", run.id, e)
            return False
        now = utcnow()
        for key, value in fields.items():
            setattr(run, key, value)
        run.updated_at = now
        if new in TERMINAL_RUN_STATUSES:
            self._ended.append(run)
            self.schedule_again = True
            run.finished_at = run.finished_at or now
            if run.duration_ms is None and run.started_at is not None:
                run.duration_ms = int((run.finished_at - run.started_at).total_seconds() * 1000)
        self.add_event(run.task_id, "run", run_event_data(run), run_id=run.id)
        return True

    async def move_all(self, runs: list[RunRow], new: RunStatus, **fields: Any) -> list[RunRow]:
        """Move every run of ``runs`` to the same non-terminal ``new`` with the same
        ``fields``, in one UPDATE per chunk of ids rather than one ORM change each (a broadcast
        dispatches ten thousand runs at once). Returns the runs moved; a run for which the move
        is illegal stays as it is, as with ``move``.

        The rows' objects take the new values as already stored: the UPDATE has written them.
        """
        assert new not in TERMINAL_RUN_STATUSES, "ending runs goes through move()"
        moved: list[RunRow] = []
        for run in runs:
            try:
                move_run(run.status, new)
            except InvalidTransition as e:
                log.debug("ignored move of run %s: %s", run.id, e)
                continue
            moved.append(run)
        if not moved:
            return moved
        values = {**fields, "status": new.value, "updated_at": utcnow()}
        await queries.update_runs(self.session, [run.id for run in moved], values)
        for run in moved:
            for key, value in values.items():
                set_committed_value(run, key, value)
            self.add_event(run.task_id, "run", run_event_data(run), run_id=run.id)
        return moved

    def add_event(
        self,
        task_id: str,
        kind: str,
        data: dict[str, Any],
        run_id: str | None = None,
        *,
        durable: bool = True,
    ) -> None:
        """Record an event; ``durable=False`` only publishes it live, after the commit."""
        if not durable:
            self._event_rows.append(TaskEvent(0, task_id, kind, data, durable=False))
            return
        self._event_rows.append(_StoredEvent(task_id, run_id, kind, data))
        if kind == "run":
            self._touched.add(task_id)

    def host_changed(self, name: str) -> None:
        """Tell live fleet subscribers that this host's row changed."""
        self.hosts_changed.add(name)

    def touch(self, task_id: str) -> None:
        self._touched.add(task_id)

    async def settle(self) -> None:
        """Recount the touched tasks, end those whose runs have all ended, and store the
        transaction's events (one statement for all of them)."""
        await self._settle_tasks()
        unstored = [e for e in self._event_rows if isinstance(e, _StoredEvent) and not e.id]
        rows = [
            {
                "task_id": e.task_id,
                "run_id": e.run_id,
                "kind": e.kind,
                "data": e.data,
                "created_at": e.created_at,
            }
            for e in unstored
        ]
        for stored, event_id in zip(
            unstored, await queries.insert_events(self.session, rows), strict=True
        ):
            stored.id = event_id

    async def _settle_tasks(self) -> None:
        if not self._touched:
            return
        tasks = await queries.tasks_by_id(self.session, self._touched)
        if self._ended and self._on_runs_ended is not None:
            ended, self._ended = self._ended, []
            await self._on_runs_ended(self, tasks, ended)
        counts = await queries.run_status_counts(self.session, self._touched)
        for task_id, task in tasks.items():
            task.counts = counts.get(task_id, {})
            if task.status == TaskStatus.RUNNING:
                outcome = task_outcome(
                    task.counts,
                    cancel_requested=task.cancel_requested,
                    deadline_passed=task.stop_reason == "deadline",
                )
                if outcome is not None:
                    task.status = move_task(task.status, outcome)
                    task.finished_at = utcnow()
            self.add_event(task_id, "task", task_view(task))
        self._touched.clear()

    @property
    def events(self) -> list[TaskEvent]:
        events: list[TaskEvent] = []
        last_id = 0
        for item in self._event_rows:
            if isinstance(item, TaskEvent):
                events.append(TaskEvent(last_id, item.task_id, item.kind, item.data, False))
            else:
                last_id = item.id
                events.append(TaskEvent(item.id, item.task_id, item.kind, item.data))
        return events
