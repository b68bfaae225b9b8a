"""Agents' connections and disconnections, written to the store in batches (docs/scale.md).

A link learns at once whether a hello may connect (the host registry's in-memory view, see
``HostService.claim``) and welcomes the agent without waiting for the database; the host row
and the reconciliation of the host's in-flight runs follow here, one transaction per batch of
hellos (bulk statements, one query for the runs of every host in the batch). A connect storm of
10,000 agents is then some twenty transactions instead of 10,000 serialized ones.

Connections and disconnections share one queue, written in arrival order: a host whose
disconnect was recorded never ends online because its connect was written later. A batch that
fails is retried (the database is down: after a pause; the database answers: the batch is
written one operation at a time, so one bad row fails alone), never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from opsplane.domain.errors import NameTaken
from opsplane.domain.states import IN_FLIGHT_RUN_STATUSES, RunStatus
from opsplane.engine.background import Supervised
from opsplane.engine.changes import Changes
from opsplane.store import queries
from opsplane.store.tables import RunRow, utcnow
from opsplane.transport.base import AGENT_LINKS, AgentHello

log = logging.getLogger(__name__)

NEVER_RECEIVED = (
    "the agent reconnected and never received this command (its queue or stream was gone)"
)
UNKNOWN_TO_AGENT = "the agent reconnected without this run (it restarted while the run was going)"

Write = Callable[[], AbstractAsyncContextManager[Changes]]


@dataclass(frozen=True)
class _Connect:
    hello: AgentHello
    # The agent proved the enrolled key of its name: it may move its host to another agent link.
    enrolled: bool
    at: datetime


@dataclass(frozen=True)
class _Disconnect:
    hostname: str
    link: str


_Op = _Connect | _Disconnect


@dataclass
class BatchOutcome:
    """What one written batch did, for the engine's follow-ups."""

    connected: list[str] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    # Hellos refused because the database holds the name for another link's host.
    refused: dict[str, NameTaken] = field(default_factory=dict)


class ConnectionWriter:
    """The queue of connections and disconnections and the loop that writes it in batches.

    ``connect``/``disconnect`` return at once with a future that completes once the operation
    is durable (or fails with ``NameTaken`` for a name another link's host holds in the
    database, which only another control-plane instance can have given it)."""

    def __init__(
        self,
        write: Write,
        *,
        probe: Callable[[], Awaitable[None]],
        batch_size: int = 500,
        linger: float = 0.05,
        retry_initial: float = 0.5,
        retry_max: float = 5.0,
        on_written: Callable[[BatchOutcome], None] | None = None,
        stream_links: frozenset[str] = frozenset(),
        instance: str | None = None,
    ) -> None:
        self._write = write
        # This control plane among the instances sharing the database: a stream link's host
        # row records it, so that the others route the host's commands here.
        self._instance = instance
        # Links whose open stream was the host's liveness (Link.liveness_by_stream): their
        # heartbeats are only metrics, a minute apart, so a disconnect is the last time the
        # host was known alive and the grace before its runs are lost starts there.
        self._stream_links = stream_links
        self._probe = probe
        self._batch_size = batch_size
        self._linger = linger
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._on_written = on_written
        self._pending: deque[tuple[_Op, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self.loop = Supervised("connections", self._loop)
        # Transactions written so far (tests and benchmarks count them).
        self.transactions = 0

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def connect(self, hello: AgentHello, *, enrolled: bool) -> asyncio.Future[None]:
        return self._enqueue(_Connect(hello, enrolled, utcnow()))

    def disconnect(self, hostname: str, link: str) -> asyncio.Future[None]:
        return self._enqueue(_Disconnect(hostname, link))

    def _enqueue(self, op: _Op) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wake.set()
        return future

    async def start(self) -> None:
        self.loop.start()

    async def stop(self, *, flush_within: float = 5.0) -> None:
        """Stop the loop; write what is queued if the database takes it within
        ``flush_within`` seconds, else fail those futures (hosts are marked offline at the next
        start anyway)."""
        await self.loop.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(flush_within):
                while self._pending:
                    await self._write_some()
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(ConnectionError("the control plane stopped"))

    async def _loop(self) -> None:
        delay = self._retry_initial
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            if self._linger and len(self._pending) < self._batch_size:
                # Let a wave of hellos gather: one transaction for all of them.
                await asyncio.sleep(self._linger)
            try:
                await self._write_some()
                delay = self._retry_initial
            except Exception as e:
                log.warning(
                    "writing %d host connection(s) failed; retrying in %.1fs: %s",
                    min(len(self._pending), self._batch_size),
                    delay,
                    e,
                )
                await asyncio.sleep(delay)
                delay = min(self._retry_max, delay * 2)

    async def _write_some(self) -> None:
        """Write the oldest batch; on failure the batch stays at the head of the queue."""
        batch = [self._pending[i] for i in range(min(self._batch_size, len(self._pending)))]
        try:
            outcome = await self._write_batch([op for op, _ in batch])
            failed: dict[int, Exception] = {}
        except Exception:
            if len(batch) == 1 or not await self._database_answers():
                raise
            # The database answers, so the batch itself failed (a row it refuses): one
            # operation at a time, so that only the faulty one fails.
            outcome, failed = BatchOutcome(), {}
            for i, (op, _) in enumerate(batch):
                try:
                    one = await self._write_batch([op])
                except Exception as e:
                    log.error("cannot record %s: %s", _describe(op), e)
                    failed[i] = e
                    continue
                outcome.connected += one.connected
                outcome.disconnected += one.disconnected
                outcome.refused.update(one.refused)
        for i, (op, future) in enumerate(batch):
            self._pending.popleft()
            if future.done():
                continue
            error = failed.get(i)
            if error is None and isinstance(op, _Connect):
                error = outcome.refused.get(op.hello.hostname)
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if self._on_written is not None:
            self._on_written(outcome)

    async def _database_answers(self) -> bool:
        try:
            await self._probe()
        except Exception:
            return False
        return True

    async def _write_batch(self, ops: list[_Op]) -> BatchOutcome:
        """One transaction: the hosts' rows in bulk, then their in-flight runs reconciled."""
        # The final state of each host, in arrival order.
        connects: dict[str, _Connect] = {}
        online: dict[str, bool] = {}
        disconnects: dict[str, str] = {}
        for op in ops:
            if isinstance(op, _Connect):
                name = op.hello.hostname
                earlier = connects.get(name)
                connects[name] = op if earlier is None else _merged(earlier, op)
                online[name] = True
                disconnects.pop(name, None)
            elif op.hostname in connects:
                if connects[op.hostname].hello.link == op.link:
                    online[op.hostname] = False
            else:
                disconnects[op.hostname] = op.link
        refused: dict[str, NameTaken] = {}
        async with self._write() as changes:
            session = changes.session
            links = await queries.links_of_hosts(session, connects)
            inserts: list[dict[str, Any]] = []
            updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for name, op in connects.items():
                hello = op.hello
                current = links.get(name)
                if current is not None and taken_by_other_link(current, hello.link, op.enrolled):
                    refused[name] = NameTaken(
                        f"{name} is a {current} host: an agent on {hello.link} cannot take it over"
                    )
                    continue
                values: dict[str, Any] = {
                    "name": name,
                    "link": hello.link,
                    "agent_version": hello.version or None,
                    "os": hello.os or None,
                    "status": "online" if online[name] else "offline",
                    "last_seen_at": op.at,
                    "connected_at": op.at,
                    "instance": self._instance if hello.link in self._stream_links else None,
                }
                if hello.reports_groups:
                    values["groups"] = list(hello.groups)
                    values["labels"] = dict(hello.labels)
                # else seed 002's heartbeat names no groups: the inventory's (an operator's) stay.
                if hello.public_key:
                    values["public_key"] = hello.public_key
                if current is None:
                    inserts.append({"groups": [], "labels": {}, **values, "created_at": op.at})
                else:
                    updates.setdefault(tuple(values), []).append(values)
                changes.host_changed(name)
            await queries.insert_hosts(session, inserts)
            for rows in updates.values():
                await queries.bulk_update_hosts(session, rows)
            by_link: dict[str, list[str]] = {}
            for name, link in disconnects.items():
                by_link.setdefault(link, []).append(name)
                changes.host_changed(name)
            for link, names in by_link.items():
                stream = link in self._stream_links
                await queries.mark_hosts(
                    session,
                    names,
                    "offline",
                    link=link,
                    last_seen_at=utcnow() if stream else None,
                    # The agent may have reconnected to another instance meanwhile.
                    released_by=self._instance if stream else None,
                )
            reconciled = [
                name for name, op in connects.items() if op.hello.reconcile and name not in refused
            ]
            for run in await queries.runs_of_hosts_in_status(
                session, IN_FLIGHT_RUN_STATUSES, reconciled
            ):
                _reconcile(changes, run, connects[run.host].hello)
        self.transactions += 1
        connected = [name for name in connects if name not in refused]
        for name in connected:
            log.debug("host %s connected over %s", name, connects[name].hello.link)
        log.info(
            "recorded %d connection(s) and %d disconnection(s) in one transaction",
            len(connected),
            len(disconnects) + sum(1 for v in online.values() if not v),
        )
        return BatchOutcome(connected, list(disconnects), refused)


def taken_by_other_link(current: str, link: str, enrolled: bool) -> bool:
    """Whether a host of link ``current`` may not be taken over by an agent on ``link``: never
    another link's inventory host; another agent link's host only by its enrolled agent."""
    return current != link and link in AGENT_LINKS and (current not in AGENT_LINKS or not enrolled)


def _reconcile(changes: Changes, run: RunRow, hello: AgentHello) -> None:
    """End a run the control plane thinks is on the host but the agent does not mention.

    The agent records a command before executing it, so a dispatched run it neither runs,
    holds a result for, nor abandoned was never executed: ``undeliverable``. A run that had
    started (or was abandoned by a crashed agent) has an unknown outcome: ``lost``.
    """
    if run.id in hello.running_run_ids or run.id in hello.finished_run_ids:
        return
    if hello.reconcile_before is not None and (
        run.dispatched_at is None or run.dispatched_at >= hello.reconcile_before
    ):
        return
    if run.status == RunStatus.DISPATCHED and run.id not in hello.abandoned_run_ids:
        changes.move(run, RunStatus.UNDELIVERABLE, error=NEVER_RECEIVED)
    else:
        changes.move(run, RunStatus.LOST, error=UNKNOWN_TO_AGENT)


def _merged(earlier: _Connect, later: _Connect) -> _Connect:
    """One connect for two hellos of a host in one batch: the later one, reconciled against
    the runs both named. The agent was welcomed at each hello before either was written, so
    a run the first named abandoned (or running, or finished) is one it had; the second may
    omit it (its spool forgot it, or the run was named once), and reconciling against the
    second alone would end such a run ``undeliverable``, not ``lost``."""
    first, last = earlier.hello, later.hello
    hello = replace(
        last,
        running_run_ids=first.running_run_ids | last.running_run_ids,
        finished_run_ids=first.finished_run_ids | last.finished_run_ids,
        abandoned_run_ids=first.abandoned_run_ids | last.abandoned_run_ids,
    )
    return replace(later, hello=hello)


def _describe(op: _Op) -> str:
    if isinstance(op, _Connect):
        return f"the connection of {op.hello.hostname} over {op.hello.link}"
    return f"the disconnection of {op.hostname} from {op.link}"
