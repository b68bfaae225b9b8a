"""Database retention: task events of ended tasks, and hosts gone for good (docs/operations.md,
*Database retention*).

A periodic duty in the archive pruner's shape (``engine.archive.ArchivePruner``): each pass
deletes in bounded batches, one short write transaction per batch, so that ingest and the
scheduler wait at most one batch for the write lock (DESIGN §7: claim, bounded batch, release).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from opsplane.engine.background import Supervised, run_periodically
from opsplane.engine.changes import Changes
from opsplane.engine.leases import Lease
from opsplane.store import queries
from opsplane.store.tables import utcnow

log = logging.getLogger(__name__)

#: Rows deleted per transaction.
BATCH = 1000
#: Batches per pass at most; a pass that stops here is followed by another one soon.
MAX_BATCHES_PER_PASS = 50


@dataclass(frozen=True)
class RetentionResult:
    """What one :meth:`Retention.run_once` pass removed."""

    events: int = 0
    hosts: int = 0
    #: False when the pass stopped at its batch limit with more left to remove.
    complete: bool = True


class Retention:
    """Deletes task events of tasks ended more than ``event_retention_days`` ago, and hosts
    neither online nor heard from for ``host_retention_days``, with no run waiting or in flight
    (0 turns either rule off). Hosts of ``keep_links`` (inventory hosts) are never forgotten."""

    def __init__(
        self,
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        *,
        event_retention_days: float,
        host_retention_days: float,
        keep_links: Sequence[str] = (),
        interval: float = 600.0,
        batch: int = BATCH,
        max_batches: int = MAX_BATCHES_PER_PASS,
        on_forgotten: Callable[[list[str]], None] | None = None,
        lease: Lease | None = None,
    ) -> None:
        self._write = write
        # Several instances on one database: only the lease's holder runs passes.
        self._lease = lease
        # Told the names of the hosts a pass deleted (the host registry's in-memory view).
        self._on_forgotten = on_forgotten
        self._event_days = event_retention_days
        self._host_days = host_retention_days
        self._keep_links = tuple(keep_links)
        self._interval = interval
        self._batch = batch
        self._max_batches = max_batches
        self.loop = Supervised("retention", self._loop)

    @property
    def retains_all(self) -> bool:
        return self._event_days <= 0 and self._host_days <= 0

    async def start(self) -> None:
        if not self.retains_all:
            self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()
        if self._lease is not None:
            await self._lease.release()

    async def run_once(self, now: datetime | None = None) -> RetentionResult:
        moment = now or utcnow()
        budget = _Budget(self._max_batches)
        events = hosts = 0
        if self._event_days > 0:
            cutoff = moment - timedelta(days=self._event_days)
            events = await self._in_batches(budget, lambda: self._delete_events(cutoff))
        if self._host_days > 0:
            cutoff = moment - timedelta(days=self._host_days)
            hosts = await self._in_batches(budget, lambda: self._forget_hosts(cutoff))
        if events:
            log.info("event retention: removed %d task events", events)
        return RetentionResult(events=events, hosts=hosts, complete=not budget.ran_out)

    async def _in_batches(self, budget: _Budget, batch: Callable[[], Awaitable[int]]) -> int:
        """Runs ``batch`` (one transaction; how many rows it removed) until one removes less
        than a full batch, or the pass's budget of batches is spent; how many it removed."""
        removed = 0
        while True:
            if budget.batches <= 0:
                budget.ran_out = True
                return removed
            budget.batches -= 1
            count = await batch()
            removed += count
            if count < self._batch:
                return removed

    async def _delete_events(self, cutoff: datetime) -> int:
        async with self._write() as changes:
            ids = await queries.prunable_event_ids(changes.session, cutoff, self._batch)
            await queries.delete_events(changes.session, ids)
        return len(ids)

    async def _forget_hosts(self, cutoff: datetime) -> int:
        async with self._write() as changes:
            names = await queries.hosts_gone_since(
                changes.session, cutoff, exclude_links=self._keep_links, limit=self._batch
            )
            await queries.delete_hosts(changes.session, names)
            for name in names:
                changes.host_changed(name)
        if names and self._on_forgotten is not None:
            self._on_forgotten(names)
        if names:
            log.info(
                "host retention: forgot %d hosts gone since %s (%s%s)",
                len(names),
                cutoff.isoformat(),
                ", ".join(names[:5]),
                ", …" if len(names) > 5 else "",
            )
        return len(names)

    async def _loop(self) -> None:
        await run_periodically(
            self._complete_pass,
            interval=self._interval,
            what="database retention pass",
            log=log,
        )

    async def _complete_pass(self) -> bool:
        if self._lease is not None and not await self._lease.claim():
            return True  # another instance holds it: nothing of ours to do until the next pass
        return (await self.run_once()).complete


@dataclass
class _Budget:
    """The batches a pass may still run; ``ran_out`` once it wanted one more than it had."""

    batches: int
    ran_out: bool = False
