"""TaskService: seed 001's operations — create, start, cancel, re-run, read tasks, runs and
events — over the store and the links. Results arrive through ``Ingest``, status and progress
are part of a task's view (``changes.task_view``), both served by the API."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.access import check_hosts_allowed
from opsplane.domain.errors import Conflict, InvalidInput, NotFound
from opsplane.domain.ids import new_id, run_id_for
from opsplane.domain.paging import PageOf, PageRequest
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.records import RunRecord, TaskRecord
from opsplane.domain.states import (
    IN_FLIGHT_RUN_STATUSES,
    TERMINAL_TASK_STATUSES,
    RunStatus,
    TaskStatus,
    move_task,
)
from opsplane.domain.targeting import HostRef, Targets, resolve_targets
from opsplane.domain.tasks import ExecSpec, TaskRequest
from opsplane.engine.archive import LogArchive
from opsplane.engine.changes import Changes, TaskEvent, task_view
from opsplane.engine.dispatcher import Dispatcher, DispatchPlan
from opsplane.engine.ingest import Ingest
from opsplane.engine.scheduler import Scheduler, assign_waves, start_clocks
from opsplane.store import queries
from opsplane.store.records import record_of, records_of
from opsplane.store.tables import HostRow, TaskRow, utcnow
from opsplane.transport.base import AGENT_LINKS, LOCAL_LINK, SSH_LINK, Link
from opsplane.transport.filepush import DEFAULT_UPLOAD_MAX_BYTES, check_size

log = logging.getLogger(__name__)

# POST /tasks/{id}/rerun: which hosts' latest runs a re-run takes, by the ``only`` it names.
# Links an upload task can reach: SFTP for SSH, chunks on the gRPC stream, chunks asked for
# and published over RabbitMQ (docs/filepush.md).
UPLOAD_LINKS = frozenset({SSH_LINK, "grpc", "amqp"})

RERUN_SUBSETS: dict[str, frozenset[RunStatus]] = {
    "failed": frozenset({RunStatus.FAILED, RunStatus.LOST}),
    "undeliverable": frozenset({RunStatus.UNDELIVERABLE}),
    "timed_out": frozenset({RunStatus.TIMED_OUT}),
    "unsuccessful": frozenset(RunStatus) - {RunStatus.SUCCEEDED},
    "all": frozenset(RunStatus),
}

# Called inside the transaction that creates a task: (session, the task, resolved host names).
BeforeCommit = Callable[[AsyncSession, TaskRecord, list[str]], Awaitable[None]]


class TaskService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        dispatcher: Dispatcher,
        scheduler: Scheduler,
        ingest: Ingest,
        archive: LogArchive,
        links: dict[str, Link],
        *,
        default_timeout: int,
        upload_roots: Sequence[Path] = (),
        upload_max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES,
    ) -> None:
        self._sessions = sessions
        self._write = write
        self._dispatcher = dispatcher
        self._scheduler = scheduler
        self._ingest = ingest
        self._archive = archive
        self._links = links
        self._default_timeout = default_timeout
        self._upload_roots = list(upload_roots)
        self._upload_max_bytes = upload_max_bytes

    async def check_reach(
        self, targets: Targets, allowed_groups: frozenset[str] | None, *, kind: str = "command"
    ) -> list[str]:
        """The hosts ``targets`` select today, Forbidden (naming them) if any is outside
        ``allowed_groups``: the check a task's creation makes, without creating anything (a
        schedule is checked so when it is made, and again as a task at each fire)."""
        async with self._sessions() as session:
            hosts = await queries.all_hosts(session)
        if kind in ("command", "upload"):
            hosts = [h for h in hosts if h.link != LOCAL_LINK]
        refs = [
            HostRef(h.name, tuple(h.groups or ()), h.labels or {}, adhoc=bool(h.adhoc))
            for h in hosts
        ]
        names = resolve_targets(targets, refs)
        chosen = set(names)
        check_hosts_allowed(allowed_groups, [r for r in refs if r.name in chosen])
        return names

    async def create_task(
        self, request: TaskRequest, *, before_commit: BeforeCommit | None = None
    ) -> TaskRecord:
        """Create a task and its runs (one per target host); start it unless asked not to.

        ``request.allowed_groups`` refuses (Forbidden) a task reaching any host outside them.
        ``before_commit`` runs in the creating transaction once the task and its runs are in
        it, with the resolved host names: the API writes the task's audit record there, so the
        record is durable before anything is dispatched, and never exists without its task.
        """
        request = request.validated(self._default_timeout)
        if request.idempotency_key:
            existing = await self._by_idempotency_key(request.idempotency_key)
            if existing is not None:
                return existing
        task_id = new_id()
        try:
            async with self._write() as changes:
                targets = request.targets
                if targets.hosts and not (targets.groups or targets.all or targets.labels):
                    # Named hosts only: read those rows, not the whole fleet's (many small
                    # tasks on a large fleet). Targeting resolves them the same way.
                    named = await queries.hosts_by_name(changes.session, set(targets.hosts))
                    hosts = list(named.values())
                else:
                    hosts = await queries.all_hosts(changes.session)
                if request.kind in ("command", "upload"):
                    # The control plane's own host runs catalog scripts only: an operator's
                    # shell command never lands on the control plane by targeting.
                    hosts = [h for h in hosts if h.link != LOCAL_LINK]
                refs = [
                    HostRef(h.name, tuple(h.groups or ()), h.labels or {}, adhoc=bool(h.adhoc))
                    for h in hosts
                ]
                names = resolve_targets(request.targets, refs)
                chosen = set(names)
                check_hosts_allowed(request.allowed_groups, [r for r in refs if r.name in chosen])
                if request.kind == "upload":
                    self._check_upload(request, names, hosts)
                if request.run_as is not None:
                    _check_run_as_links(request.run_as, names, {h.name: h.link for h in hosts})
                policy = request.policy or TaskPolicy()
                task = TaskRow(
                    id=task_id,
                    name=request.name,
                    description=request.description,
                    kind=request.kind,
                    command=request.command,
                    spec=request.spec.to_json() if request.spec else None,
                    targets=asdict(request.targets),
                    timeout=request.timeout,
                    status=TaskStatus.PENDING,
                    cancel_requested=False,
                    counts={RunStatus.PENDING.value: len(names)},
                    total=len(names),
                    created_by=request.created_by,
                    idempotency_key=request.idempotency_key,
                    created_at=utcnow(),
                    priority=policy.priority,
                    policy=policy.to_json() if request.policy else None,
                    rerun_of=request.rerun_of,
                    run_as=request.run_as,
                    template=request.template,
                    template_version=request.template_version,
                )
                changes.session.add(task)
                # Runs reference the task; without an ORM relationship the unit of work does
                # not order the inserts, so the task goes first explicitly.
                await changes.session.flush()
                # One batched INSERT for all the runs, without an ORM object each: a broadcast
                # to ten thousand hosts must not build ten thousand of them (docs/scale.md).
                logs = self._archive.task_dir(task_id, task.created_at)
                now = utcnow()
                runs = []
                for name, wave in zip(names, assign_waves(policy, len(names)), strict=True):
                    run_id = run_id_for(task_id, name, 1)
                    runs.append(
                        {
                            "id": run_id,
                            "task_id": task_id,
                            "host": name,
                            "attempt": 1,
                            "wave": wave,
                            "status": RunStatus.PENDING.value,
                            "log_path": f"{logs}/{run_id}.log",
                            "updated_at": now,
                        }
                    )
                await queries.insert_runs(changes.session, runs)
                if before_commit is not None:
                    await before_commit(changes.session, record_of(TaskRecord, task), names)
                to_send = DispatchPlan()
                if request.start:
                    to_send = await self._begin(changes, task)
                else:
                    changes.add_event(task_id, "task", task_view(task))
        except IntegrityError:
            # Two requests with one Idempotency-Key raced; the other one created the task.
            if request.idempotency_key:
                existing = await self._by_idempotency_key(request.idempotency_key)
                if existing is not None:
                    return existing
            raise
        if request.start:
            await self._dispatcher.send(to_send)
            return await self.get_task(task_id)
        return record_of(TaskRecord, task)

    async def _begin(self, changes: Changes, task: TaskRow) -> DispatchPlan:
        """Move a task to running and dispatch what may go at once. Runs that wait for
        capacity are the scheduler's: it sends them in priority order as capacity frees."""
        now = utcnow()
        task.status = move_task(task.status, TaskStatus.RUNNING)
        task.started_at = now
        start_clocks(task, now)
        changes.touch(task.id)
        return await self._scheduler.plan(changes, task_id=task.id)

    def _check_upload(self, request: TaskRequest, names: list[str], hosts: list[HostRow]) -> None:
        """Uploads go to SSH hosts and agents (gRPC, RabbitMQ), from under the configured
        upload roots, and no bigger than the per-task limit (docs/filepush.md)."""
        by_name = {h.name: h for h in hosts}
        elsewhere = [name for name in names if by_name[name].link not in UPLOAD_LINKS]
        if elsewhere:
            raise InvalidInput(
                f"uploads go to SSH hosts and agents only; not those: {', '.join(elsewhere)}"
            )
        # A seed-002 agent (its heartbeats carry no version) would run the task's command
        # text as a shell line: it never gets an upload.
        seed = [n for n in names if by_name[n].link == "amqp" and not by_name[n].agent_version]
        if seed:
            raise InvalidInput(
                "uploads on RabbitMQ need an opsplane agent; these hosts have not reported one "
                f"(a seed-002 agent cannot take uploads): {', '.join(seed)}"
            )
        assert request.spec is not None and request.spec.local_path is not None
        source = Path(request.spec.local_path).resolve()
        roots = [root.resolve() for root in self._upload_roots]
        if not any(source == root or root in source.parents for root in roots):
            allowed = ", ".join(str(root) for root in roots) or "(none configured)"
            raise InvalidInput(f"local_path must be under an upload root ({allowed}): {source}")
        if not source.exists():
            raise InvalidInput(f"local_path does not exist on the control plane: {source}")
        try:
            check_size(source, self._upload_max_bytes)
        except OSError as e:
            raise InvalidInput(f"cannot read local_path {source}: {e}") from e

    async def find_by_idempotency_key(self, key: str) -> TaskRecord | None:
        return await self._by_idempotency_key(key)

    async def _by_idempotency_key(self, key: str) -> TaskRecord | None:
        async with self._sessions() as session:
            task = await queries.get_task_by_idempotency_key(session, key)
        return record_of(TaskRecord, task) if task is not None else None

    async def start_task(self, task_id: str) -> TaskRecord:
        """Move a pending task to running and dispatch its pending runs."""
        async with self._write() as changes:
            task = await self._task(changes.session, task_id, for_update=True)
            if task.status != TaskStatus.PENDING:
                raise Conflict(f"task {task_id} is {task.status}; only a pending task can start")
            to_send = await self._begin(changes, task)
        await self._dispatcher.send(to_send)
        return await self.get_task(task_id)

    async def rerun_task(
        self,
        task_id: str,
        only: str,
        *,
        created_by: str,
        allowed_groups: frozenset[str] | None = None,
        before_commit: BeforeCommit | None = None,
    ) -> TaskRecord:
        """A new task with the ended task's spec and policy over the hosts whose latest run
        ended as ``only`` names (``failed`` takes lost runs too), linked by ``rerun_of``."""
        statuses = RERUN_SUBSETS.get(only)
        if statuses is None:
            raise InvalidInput(f"only must be one of {', '.join(RERUN_SUBSETS)}, got {only!r}")
        async with self._sessions() as session:
            task = await self._task(session, task_id)
            if task.status not in TERMINAL_TASK_STATUSES:
                raise Conflict(f"task {task_id} is {task.status}; re-run it once it has ended")
            runs = await queries.latest_runs_in(session, [task_id], statuses)
        hosts = tuple(sorted({run.host for run in runs}))
        if not hosts:
            raise Conflict(f"no run of task {task_id} ended {only}: nothing to re-run")
        request = TaskRequest(
            command=task.command,
            targets=Targets(hosts=hosts),
            timeout=task.timeout,
            name=task.name,
            description=f"re-run of {task_id} ({only})",
            created_by=created_by,
            kind=task.kind,
            spec=ExecSpec.from_json(task.spec) if task.spec else None,
            allowed_groups=allowed_groups,
            policy=TaskPolicy.from_json(task.policy) if task.policy else None,
            rerun_of=task_id,
            run_as=task.run_as,
            template=task.template,
            template_version=task.template_version,
        )
        return await self.create_task(request, before_commit=before_commit)

    async def cancel_task(self, task_id: str, reason: str = "canceled by operator") -> TaskRecord:
        """Cancel a task: unsent runs end at once; running ones end when their host confirms."""
        async with self._write() as changes:
            task = await self._task(changes.session, task_id, for_update=True)
            if task.status in TERMINAL_TASK_STATUSES:
                raise Conflict(f"task {task_id} already ended ({task.status})")
            task.cancel_requested = True
            if task.status == TaskStatus.PENDING:
                task.status = move_task(task.status, TaskStatus.CANCELED)
                task.finished_at = utcnow()
            runs = await queries.all_runs_of_task(changes.session, task_id)
            in_flight = [run for run in runs if run.status in IN_FLIGHT_RUN_STATUSES]
            for run in runs:
                if run.status in (RunStatus.PENDING, RunStatus.DELAYED):
                    changes.move(run, RunStatus.CANCELED, error=reason)
            cancels = await self._dispatcher.cancel_orders(
                changes.session, in_flight, lambda _run: reason
            )
            changes.touch(task_id)
        await self._dispatcher.send_cancels(cancels)
        return await self.get_task(task_id)

    async def get_task(self, task_id: str) -> TaskRecord:
        async with self._sessions() as session:
            return record_of(TaskRecord, await self._task(session, task_id))

    async def list_tasks(
        self, *, status: str | None, name: str | None, page: PageRequest
    ) -> PageOf[TaskRecord]:
        async with self._sessions() as session:
            found = await queries.list_tasks(session, status=status, name=name, page=page)
        return records_of(TaskRecord, found)

    async def tasks_named(
        self, prefix: str, *, ended_after: datetime, limit: int = 10_000
    ) -> list[TaskRecord]:
        """Tasks whose name starts with ``prefix``, unfinished or ended after ``ended_after``."""
        async with self._sessions() as session:
            found = await queries.tasks_named(
                session,
                prefix,
                terminal=[status.value for status in TERMINAL_TASK_STATUSES],
                ended_after=ended_after,
                limit=limit,
            )
        return [record_of(TaskRecord, task) for task in found]

    async def list_runs(self, task_id: str) -> list[RunRecord]:
        """Every run of a task with its output (the compat façades' small tasks)."""
        async with self._sessions() as session:
            await self._task(session, task_id)
            runs = await queries.all_runs_of_task(session, task_id)
        return [record_of(RunRecord, run) for run in runs]

    async def page_runs(
        self, task_id: str, page: PageRequest, *, status: str | None, output: bool
    ) -> tuple[PageOf[RunRecord], dict[str, int]]:
        """A page of a task's runs (their output only with ``output``) and the count of its
        runs by status."""
        async with self._sessions() as session:
            await self._task(session, task_id)
            runs = await queries.runs_of_task(session, task_id, page, status=status, output=output)
            summary = await queries.run_status_summary(session, task_id)
        return records_of(RunRecord, runs), summary

    async def get_run(self, task_id: str, run_id: str) -> RunRecord:
        async with self._sessions() as session:
            runs = await queries.runs_by_id(session, [run_id])
        run = runs.get(run_id)
        if run is None or run.task_id != task_id:
            raise NotFound(f"run {run_id} of task {task_id} not found")
        return record_of(RunRecord, run)

    async def run_by_id(self, run_id: str) -> RunRecord:
        """A run by its id alone (GET /api/v1/runs/{id}/log)."""
        async with self._sessions() as session:
            run = (await queries.runs_by_id(session, [run_id])).get(run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        return record_of(RunRecord, run)

    async def events_after(self, task_id: str, after: int, limit: int) -> list[TaskEvent]:
        """Up to ``limit`` of a task's stored events with an id past ``after``, oldest first:
        the history an event stream replays before it follows the hub."""
        async with self._sessions() as session:
            rows = await queries.events_after(session, task_id, after, limit)
        return [TaskEvent(row.id, row.task_id, row.kind, row.data) for row in rows]

    @staticmethod
    async def _task(session: AsyncSession, task_id: str, *, for_update: bool = False) -> TaskRow:
        task = await queries.get_task(session, task_id, for_update=for_update)
        if task is None:
            raise NotFound(f"task {task_id} not found")
        return task


def _check_run_as_links(run_as: str, names: list[str], link_of: dict[str, str]) -> None:
    """A run_as needs hosts whose agent can honour it: refused, before anything is sent, for
    SSH hosts (and any other link without an agent), whose login user is the inventory's.
    Running ``sudo -u`` there would need a sudoers rule opsplane cannot check from here."""
    without_agent = [name for name in names if link_of.get(name) not in AGENT_LINKS]
    if without_agent:
        shown = ", ".join(without_agent[:10])
        more = f" and {len(without_agent) - 10} more" if len(without_agent) > 10 else ""
        raise InvalidInput(
            f"run_as {run_as!r} needs hosts with an opsplane or seed-002 agent; these log in "
            f"over SSH as their inventory user and cannot switch: {shown}{more} (give the SSH "
            "host a login user with hosts add --ssh USER@ADDRESS instead)"
        )
