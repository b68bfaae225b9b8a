"""Liveness: hosts silent for too long go offline (a host whose link holds an open stream to
it, or whose heartbeat waits in ingest, is not silent: docs/scale.md); runs on hosts gone past
the grace period become ``lost``; runs past their timeout plus a grace end and are canceled on
their host; heartbeat history is pruned. Each pass is a bounded batch (DESIGN §7)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta

from sqlalchemy import delete

from opsplane.domain.states import IN_FLIGHT_RUN_STATUSES, TERMINAL_RUN_STATUSES, RunStatus
from opsplane.engine.background import Supervised
from opsplane.engine.changes import Changes
from opsplane.engine.dispatcher import CancelOrder, Dispatcher
from opsplane.logcontext import about
from opsplane.store import queries
from opsplane.store.tables import HeartbeatRow, RunRow, utcnow

log = logging.getLogger(__name__)


_OPEN_RUN_STATUSES = [status.value for status in RunStatus if status not in TERMINAL_RUN_STATUSES]


class Monitor:
    def __init__(
        self,
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        *,
        heartbeat_interval: float,
        offline_after_missed: int,
        lost_grace: float,
        start_timeout: float,
        silent_links: Sequence[str] = (),
        held_links: Sequence[str] = (),
        silent_starter_links: Sequence[str] = (),
        history_retention: timedelta = timedelta(days=1),
        batch: int = 1000,
        on_silent: Callable[[list[tuple[str, str]]], Awaitable[None]] | None = None,
        hearing: Callable[[], bool] = lambda: True,
        timeout_grace: float = 30.0,
        send_cancels: Callable[[list[CancelOrder]], Awaitable[None]] | None = None,
        heard: Callable[[str, str], bool] = lambda _name, _link: False,
        instance: str | None = None,
        duty: Callable[[], bool] = lambda: True,
        on_duty: Callable[[Changes], Awaitable[None]] | None = None,
    ) -> None:
        """``hearing`` says whether heartbeats are being written now (False while ingest is
        paused because the database is unreachable). ``heard(name, link)`` says whether a host
        whose row is past the silence limit is alive all the same: its link holds an open
        stream to it (the stream's keepalive is its liveness), or a heartbeat of it is on its
        way to the database. ``duty()`` says whether this instance holds the ``monitor``
        lease (engine/leases.py ``Duties``): only its holder ends runs (lost, undeliverable,
        overdue) and prunes the heartbeat history; every instance judges the silence of the
        hosts whose streams it holds."""
        self._duty = duty
        # More work of the monitor's holder, in its pass's transaction (the engine's deferred
        # recovery of runs a killed predecessor executed: engine/recovery.py).
        self._on_duty = on_duty
        self._heard = heard
        # Each instance judges the hosts whose streams it holds (and those nobody holds).
        self._instance = instance
        self._write = write
        # The control plane's own timeout clock: a run still in flight ``timeout_grace`` after
        # its command's timeout has ended on its host or never will; its cancel goes out
        # through ``send_cancels`` (the dispatcher's, as for a task's cancel).
        self._timeout_grace = timedelta(seconds=timeout_grace)
        self._send_cancels = send_cancels
        # Told (after the commit) which hosts just went offline for silence, with their links.
        self._on_silent = on_silent
        self._hearing = hearing
        self._silent_links = tuple(silent_links)
        # Links whose runs wait in this process for a slot (Link.executes_here): waiting
        # there is not undelivered, and the link reports every run's end itself.
        self._held_links = tuple(held_links)
        # Links whose seed-002 agents (no ``version``) never say ``started``: the start
        # timeout would end their runs while they execute (issue 16 item 1).
        self._silent_starter_links = tuple(silent_starter_links)
        self._silence_limit = timedelta(seconds=heartbeat_interval * offline_after_missed)
        self._lost_grace = timedelta(seconds=lost_grace)
        self._start_timeout = timedelta(seconds=start_timeout)
        self._history_retention = history_retention
        self._batch = batch
        self._tick = max(0.2, min(1.0, heartbeat_interval / 4))
        self.loop = Supervised("monitor", self._loop)
        #: Passes that checked runs (this instance held the monitor lease).
        self.run_checks = 0
        # Set by a failed pass: the next pass starts the clocks again (see ``_loop``).
        self._blind = False
        # Nobody could be heard while the control plane was down: grace periods and start
        # timeouts count from this process's start at the earliest, or a restart after a long
        # outage would end every run before its agent had a chance to reconnect and report.
        self.started_at: datetime | None = None

    async def start(self) -> None:
        self.started_at = utcnow()
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    async def _loop(self) -> None:
        passes = 0
        while True:
            await asyncio.sleep(self._tick)
            if not self._hearing():
                self._blind = True
                continue
            if self._blind:
                # The database was unreachable: no heartbeat could be written meanwhile, and
                # those queued in ingest may not be written yet. Silence is judged from now
                # on, as after a start, or every host would go offline and its runs be lost.
                self.started_at = utcnow()
            try:
                await self.check_once(prune=passes % 600 == 0)
                self._blind = False
            except Exception:
                log.exception("monitor pass failed; retrying on the next tick")
                self._blind = True
            passes += 1

    async def check_once(self, *, prune: bool = False) -> None:
        now = utcnow()
        silent: list[tuple[str, str]] = []
        cancels: list[CancelOrder] = []
        async with self._write() as changes:
            # Work in proportion to what changed, never to the fleet: the hosts that crossed
            # the silence limit since the last pass (marked offline, so not found again), and
            # the runs in flight on hosts gone past the grace period, each a bounded batch.
            # Hosts of silent links send no heartbeats: silence says nothing about them.
            stale = (
                await queries.stale_online_hosts(
                    changes.session,
                    now - self._silence_limit,
                    exclude_links=self._silent_links,
                    limit=self._batch,
                    instance=self._instance,
                )
                if self._since_start(now) >= self._silence_limit
                else []
            )
            for host in stale:
                if self._heard(host.name, host.link):
                    # Alive by its stream (or a beat not yet written): seen now, so that the
                    # next pass does not find it again until it has been silent that long.
                    host.last_seen_at = now
                    continue
                host.status = "offline"
                changes.host_changed(host.name)
                silent.append((host.name, host.link))
                log.info(
                    "host %s is offline: no heartbeat since %s",
                    host.name,
                    host.last_seen_at,
                    extra=about(host=host.name),
                )
            # Several instances on one database: one of them ends runs (docs/instances.md).
            runs_checked = self._duty()
            if runs_checked:
                await self._check_runs(changes, now)
                cancels = await self._end_overdue(changes, now)
                if self._on_duty is not None:
                    await self._on_duty(changes)
                if prune:
                    await changes.session.execute(
                        delete(HeartbeatRow).where(HeartbeatRow.at < now - self._history_retention)
                    )
        if runs_checked:
            self.run_checks += 1
        if silent and self._on_silent is not None:
            await self._on_silent(silent)
        if cancels and self._send_cancels is not None:
            await self._send_cancels(cancels)

    async def _check_runs(self, changes: Changes, now: datetime) -> None:
        """Runs on hosts gone past the grace end lost; dispatched runs never started past the
        start timeout end undeliverable."""
        runs = (
            await queries.runs_on_hosts_gone_since(
                changes.session,
                now - self._lost_grace,
                IN_FLIGHT_RUN_STATUSES,
                limit=self._batch,
            )
            if self._since_start(now) >= self._lost_grace
            else []
        )
        grace = int(self._lost_grace.total_seconds())
        for run in runs:
            changes.move(
                run, RunStatus.LOST, error=f"host {run.host} unreachable for more than {grace}s"
            )
        unstarted = (
            await queries.runs_dispatched_before(
                changes.session,
                now - self._start_timeout,
                limit=self._batch,
                exclude_links=self._held_links,
                exclude_unversioned_links=self._silent_starter_links,
            )
            if self._since_start(now) >= self._start_timeout
            else []
        )
        waited = int(self._start_timeout.total_seconds())
        for run in unstarted:
            error = f"the host did not start the command within {waited}s of its dispatch"
            changes.move(run, RunStatus.UNDELIVERABLE, error=error)
        # Two instances settling one task's last runs at once each count the other's run as
        # open and neither ends it (docs/instances.md, `monitor`): recounted, it ends as any
        # task does when its last run ends.
        for task_id in await queries.running_tasks_with_every_run_ended(
            changes.session, _OPEN_RUN_STATUSES, limit=self._batch
        ):
            log.info("task %s: every run had ended; ending it", task_id, extra=about(task_id))
            changes.touch(task_id)

    async def _end_overdue(self, changes: Changes, now: datetime) -> list[CancelOrder]:
        """Runs past their timeout plus the grace end ``timed_out`` (their host said it started
        them) or ``lost`` (it never did); returns the cancels to send after the commit. A
        result arriving later changes nothing: the run has ended."""
        if self._since_start(now) < self._timeout_grace:
            # As for the other clocks: agents get the grace to report after a restart.
            return []
        overdue = await queries.runs_past_timeout(
            changes.session,
            now,
            self._timeout_grace.total_seconds(),
            limit=self._batch,
            exclude_unstarted_links=self._held_links,
        )
        grace = round(self._timeout_grace.total_seconds())
        reasons: dict[str, str] = {}
        ended: list[RunRow] = []
        for run, timeout in overdue:
            if run.status == RunStatus.RUNNING:
                new = RunStatus.TIMED_OUT
                reason = f"no result {timeout}s + {grace}s after the command started"
            else:
                new = RunStatus.LOST
                reason = (
                    f"no result {timeout}s + {grace}s after the dispatch, "
                    "and the host never reported starting the command"
                )
            if changes.move(run, new, error=reason):
                reasons[run.id] = reason
                ended.append(run)
                log.info(
                    "run %s on %s: %s",
                    run.id,
                    run.host,
                    reason,
                    extra=about(run.task_id, run.id, run.host),
                )
        return await Dispatcher.cancel_orders(
            changes.session, ended, lambda run: f"{reasons[run.id]}: ended by the control plane"
        )

    def _since_start(self, now: datetime) -> timedelta:
        """How long this monitor has been watching (forever, for a monitor never started)."""
        return now - self.started_at if self.started_at is not None else timedelta.max
