"""Scheduler: decides which waiting runs go out now, and what follows when runs end.

Waiting runs (``pending``, or ``delayed`` for a host that was offline) of running tasks are
considered highest priority first, then in the order the tasks were created. A run goes when its
host is connected and every limit allows it: the global and per-host limits (settings), the
task's ``max_concurrency`` and its canary wave. A run whose host is offline waits as ``delayed``
until the task's delivery deadline, then ends ``undeliverable``.

When runs end (``follow_up``, called by ``Changes.settle`` in the same transaction), a retryable
run gets its next attempt, and ``max_errors`` or a failed canary stop the task's waiting runs.
A periodic pass also ends tasks past their deadline and delayed runs past their delivery deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta

from opsplane.domain.ids import run_id_for
from opsplane.domain.policy import ERROR_STATUSES, TaskPolicy
from opsplane.domain.states import IN_FLIGHT_RUN_STATUSES, RunStatus, TaskStatus
from opsplane.engine.archive import LogArchive
from opsplane.engine.background import Supervised
from opsplane.engine.changes import Changes, run_event_data
from opsplane.engine.dispatcher import CancelOrder, Dispatcher, DispatchPlan
from opsplane.logcontext import about
from opsplane.store import queries
from opsplane.store.tables import RunRow, TaskRow, utcnow

log = logging.getLogger(__name__)

WAITING = (RunStatus.PENDING, RunStatus.DELAYED)


def start_clocks(task: TaskRow, now: datetime) -> None:
    """Set the task's deadline and delivery deadline as it starts."""
    policy = TaskPolicy.from_json(task.policy)
    task.deadline_at = now + timedelta(seconds=policy.deadline) if policy.deadline else None
    task.deliver_by = (
        now + timedelta(seconds=policy.delivery_deadline) if policy.delivery_deadline else None
    )


def assign_waves(policy: TaskPolicy, count: int) -> list[int]:
    """The canary wave of each of ``count`` runs, in order: the first ``canary`` runs first."""
    canary = policy.rollout.canary if policy.rollout else count
    return [0 if i < canary else 1 for i in range(count)]


class Scheduler:
    def __init__(
        self,
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        dispatcher: Dispatcher,
        archive: LogArchive,
        *,
        max_running: int = 0,
        max_per_host: int = 0,
        host_limits: Mapping[str, int] | None = None,
        start_delay: float = 0.0,
        tick: float = 1.0,
        batch: int = 5000,
        max_tasks: int = 500,
        duty: Callable[[], bool] = lambda: True,
        claims: bool = False,
    ) -> None:
        """``duty()`` says whether this instance holds the ``monitor`` lease: only its holder
        ends what is past a deadline. ``claims``: other instances may plan at once, so runs
        are claimed: with ``FOR UPDATE SKIP LOCKED`` on a server database, by taking the
        write lock first on SQLite (docs/instances.md)."""
        self._duty = duty
        self._claims = claims
        #: Passes that ended what was past its deadline (this instance held the lease).
        self.expire_passes = 0
        self._write = write
        self._dispatcher = dispatcher
        self._archive = archive
        self._max_running = max_running
        self._max_per_host = max_per_host
        # Per-host limits that override max_per_host (the control plane's own script workers).
        self._host_limits = {host: n for host, n in (host_limits or {}).items() if n > 0}
        self._start_delay = start_delay
        self._tick = tick
        self._batch = batch
        self._max_tasks = max_tasks
        self._wake = asyncio.Event()
        self._waited_start_delay = False
        self.loop = Supervised("scheduler", self._loop)

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    async def _loop(self) -> None:
        # After a restart, agents get a moment to reconnect before waiting runs are judged
        # against who is connected (recovery: runs a previous process never sent). Once per
        # process: a loop restarted after a failure goes on at once.
        if not self._waited_start_delay:
            await asyncio.sleep(self._start_delay)
            self._waited_start_delay = True
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tick):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.pass_once()
            except Exception:
                log.exception("scheduler pass failed; retrying on the next tick")

    async def pass_once(self) -> None:
        """End what is past its deadline, then dispatch what may go."""
        async with self._write() as changes:
            cancels = await self._expire(changes) if self._duty() else []
            plan = await self.plan(changes)
        await self._dispatcher.send(plan)
        await self._dispatcher.send_cancels(cancels)

    # Dispatching ---------------------------------------------------------------------------

    async def plan(self, changes: Changes, *, task_id: str | None = None) -> DispatchPlan:
        """Within the caller's transaction: mark the runs that may go now ``dispatched`` (and
        those whose host is offline ``delayed`` or ``undeliverable``); returns what to send once
        the transaction commits. ``task_id`` limits the pass to one task (its creation)."""
        session = changes.session
        now = utcnow()
        tasks = await queries.tasks_with_waiting_runs(
            session, now, task_id=task_id, limit=self._max_tasks
        )
        if not tasks:
            return DispatchPlan()
        if self._claims:
            await queries.begin_claims(session)
        policies = {task.id: TaskPolicy.from_json(task.policy) for task in tasks}
        paced = [tid for tid, policy in policies.items() if policy.paced]
        if self._claims and paced:
            # A paced task's in-flight count decides how many of its runs go: one scheduler
            # at a time counts it (another instance planning it now: it waits a pass).
            locked = await queries.lock_tasks(session, paced)
            tasks = [task for task in tasks if task.id in locked or task.id not in paced]
            paced = [tid for tid in paced if tid in locked]
        waves = await queries.wave_status_counts(session, paced)
        per_task = {
            tid: sum(
                n
                for (wave_task, _), counts in waves.items()
                if wave_task == tid
                for status, n in counts.items()
                if status in IN_FLIGHT_RUN_STATUSES
            )
            for tid in paced
        }
        running_total = await queries.in_flight_total(session) if self._max_running else 0
        # Read only as many runs of each task as could go now: a task with ten thousand
        # waiting runs and room for ten must not hide the tasks after it.
        rows: list[tuple[RunRow, TaskRow]] = []
        # Tasks all of whose runs go in this pass, unsent before: only these may go out as one
        # group or broadcast message (a fan-out reaches every bound queue, so a task sent in
        # slices, paced, or retried goes host by host and never reaches a host twice).
        whole: set[str] = set()
        budget = self._batch
        if self._max_running and not self._max_per_host:
            # (With a per-host limit too, runs read might be held by it: read a full batch.)
            budget = min(budget, max(0, self._max_running - running_total))
        for task in tasks:
            if budget <= 0:
                break
            if task.stop_reason:
                continue
            want = budget
            policy = policies[task.id]
            if policy.paced:
                want = min(want, _task_cap(policy, task.total, 0) - per_task[task.id])
            elif task_id is not None:
                # A task's first pass reads all its runs, so that it can go as one message.
                want = max(want, task.total)
            if want <= 0:
                continue
            runs = await queries.waiting_runs(session, task.id, now, limit=want, claim=self._claims)
            if (
                not policy.paced
                and len(runs) == task.total
                and all(r.status == RunStatus.PENDING and r.attempt == 1 for r in runs)
            ):
                whole.add(task.id)
            rows += [(run, task) for run in runs]
            budget -= len(runs)
        if not rows:
            return DispatchPlan()
        hosts = await queries.hosts_by_name(session, {run.host for run, _ in rows})
        limited = hosts.keys() if self._max_per_host else self._host_limits.keys() & hosts.keys()
        per_host = await queries.in_flight_by_host(session, limited)
        chosen: dict[str, list[RunRow]] = {}
        for run, task in rows:
            if not self._dispatcher.reachable(run.host, hosts):
                link_name = self._dispatcher.link_name(run.host, hosts)
                self._hold_or_drop(changes, run, task, now, link_name)
                continue
            policy = policies[task.id]
            if policy.paced:
                if not _wave_open(task.id, run.wave, waves):
                    continue
                if per_task[task.id] >= _task_cap(policy, task.total, run.wave):
                    continue
            host_cap = self._host_limits.get(run.host, self._max_per_host)
            if host_cap and per_host.get(run.host, 0) >= host_cap:
                whole.discard(task.id)
                continue
            if self._max_running and running_total >= self._max_running:
                whole.difference_update(t.id for _, t in rows)
                break
            chosen.setdefault(task.id, []).append(run)
            running_total += 1
            per_host[run.host] = per_host.get(run.host, 0) + 1
            if policy.paced:
                per_task[task.id] += 1
        plan = DispatchPlan()
        by_id = {task.id: task for task in tasks}
        for tid, runs in chosen.items():
            plan.extend(
                await self._dispatcher.mark_deliverable(
                    changes, by_id[tid], runs, hosts, whole=tid in whole
                )
            )
        return plan

    @staticmethod
    def _hold_or_drop(
        changes: Changes, run: RunRow, task: TaskRow, now: datetime, link_name: str
    ) -> None:
        """An offline host's run waits until the delivery deadline, if the task has one."""
        if task.deliver_by is not None and now < task.deliver_by:
            if run.status == RunStatus.PENDING:
                until = task.deliver_by.isoformat(timespec="seconds")
                changes.move(run, RunStatus.DELAYED, error=f"waiting for {run.host} until {until}")
            return
        if run.status == RunStatus.DELAYED:
            error = _past_delivery(run)
        else:
            error = f"host offline: {run.host} has no live {link_name} connection"
        changes.move(run, RunStatus.UNDELIVERABLE, error=error)

    # Deadlines -----------------------------------------------------------------------------

    async def _expire(self, changes: Changes) -> list[CancelOrder]:
        """Runs delayed past their delivery deadline end ``undeliverable``; tasks past their
        deadline end every unfinished run. Returns the cancels to send after commit."""
        self.expire_passes += 1
        session = changes.session
        now = utcnow()
        for run in await queries.delayed_runs_past_delivery(session, now, limit=self._batch):
            changes.move(run, RunStatus.UNDELIVERABLE, error=_past_delivery(run))
        expired = await queries.tasks_past_deadline(session, now, limit=100)
        if not expired:
            return []
        runs = await queries.latest_runs_in(
            session, [task.id for task in expired], [*WAITING, *IN_FLIGHT_RUN_STATUSES]
        )
        reasons: dict[str, str] = {}
        for task in expired:
            task.stop_reason = "deadline"
            seconds = TaskPolicy.from_json(task.policy).deadline
            reasons[task.id] = f"task deadline of {seconds}s passed"
            changes.touch(task.id)
            log.info(
                "task %s passed its deadline; ending its unfinished runs",
                task.id,
                extra=about(task.id),
            )
        in_flight: list[RunRow] = []
        for run in runs:
            reason = reasons[run.task_id]
            if run.status in WAITING:
                changes.move(run, RunStatus.CANCELED, error=f"{reason} before the run was sent")
                continue
            changes.move(run, RunStatus.TIMED_OUT, error=reason)
            in_flight.append(run)
        return await self._dispatcher.cancel_orders(
            session, in_flight, lambda run: reasons[run.task_id]
        )

    # When runs end -------------------------------------------------------------------------

    async def follow_up(
        self, changes: Changes, tasks: dict[str, TaskRow], ended: list[RunRow]
    ) -> None:
        """Retries, ``max_errors`` and the canary verdict for runs that just ended."""
        by_task: dict[str, list[RunRow]] = {}
        for run in ended:
            by_task.setdefault(run.task_id, []).append(run)
        now = utcnow()
        for task_id, runs in by_task.items():
            task = tasks.get(task_id)
            if task is None or task.status != TaskStatus.RUNNING or not task.policy:
                continue
            policy = TaskPolicy.from_json(task.policy)
            if task.cancel_requested or task.stop_reason:
                continue
            retries = policy.retries
            if retries is not None:
                for run in runs:
                    if run.status in retries.on and run.attempt < retries.max_attempts:
                        self._retry(changes, task, run, retries.delay_before(run.attempt + 1), now)
            final = [run for run in runs if not run.superseded]
            if policy.rollout is not None:
                bad = [r for r in final if r.wave == 0 and r.status != RunStatus.SUCCEEDED]
                if bad:
                    what = ", ".join(f"{r.host} {r.status}" for r in bad[:5])
                    await self._stop(changes, task, "canary", f"canary failed ({what})")
                    continue
            if policy.max_errors is not None:
                counts = (await queries.run_status_counts(changes.session, [task_id]))[task_id]
                errors = sum(counts.get(status, 0) for status in ERROR_STATUSES)
                limit = policy.max_errors.of(task.total)
                if errors >= limit:
                    reason = f"max_errors reached: {errors} errors (limit {limit})"
                    await self._stop(changes, task, "max_errors", reason)

    def _retry(
        self, changes: Changes, task: TaskRow, run: RunRow, delay: float, now: datetime
    ) -> None:
        run.superseded = True
        run_id = run_id_for(task.id, run.host, run.attempt + 1)
        retry = RunRow(
            id=run_id,
            task_id=task.id,
            host=run.host,
            attempt=run.attempt + 1,
            status=RunStatus.PENDING,
            wave=run.wave,
            not_before=now + timedelta(seconds=delay) if delay > 0 else None,
            log_path=str(self._archive.path_for(task.id, run_id, task.created_at)),
            updated_at=now,
        )
        changes.session.add(retry)
        changes.add_event(task.id, "run", run_event_data(retry), run_id=run_id)
        changes.schedule_again = True
        log.info(
            "run %s on %s ended %s; attempt %d follows in %.1fs",
            run.id,
            run.host,
            run.status,
            retry.attempt,
            delay,
            extra=about(run.task_id, run.id, run.host),
        )

    @staticmethod
    async def _stop(changes: Changes, task: TaskRow, code: str, reason: str) -> None:
        """End the task's waiting runs; runs already on their hosts finish."""
        task.stop_reason = code
        for run in await queries.latest_runs_in(changes.session, [task.id], WAITING):
            changes.move(run, RunStatus.CANCELED, error=reason)
        changes.touch(task.id)
        log.info("task %s stopped: %s", task.id, reason, extra=about(task.id))


def _past_delivery(run: RunRow) -> str:
    return f"delivery deadline passed: {run.host} did not come back in time"


def _wave_open(task_id: str, wave: int, waves: Mapping[tuple[str, int], dict[str, int]]) -> bool:
    """Wave 0 is always open; wave 1 once every wave-0 run succeeded."""
    if wave == 0:
        return True
    canary = waves.get((task_id, 0), {})
    return bool(canary) and set(canary) <= {RunStatus.SUCCEEDED.value}


def _task_cap(policy: TaskPolicy, total: int, wave: int) -> int:
    caps = [policy.max_concurrency.of(total)] if policy.max_concurrency else []
    if policy.rollout is not None and wave > 0 and policy.rollout.then is not None:
        caps.append(policy.rollout.then.of(total))
    return min(caps) if caps else total
