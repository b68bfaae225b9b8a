"""Database retention: task events of ended tasks, and hosts gone for good (docs/operations.md,
*Database retention*).

A periodic duty in the archive pruner's shape (``engine.archive.ArchivePruner``): each pass
deletes in bounded batches, one short write transaction per batch, so that ingest and the
scheduler wait at most one batch for the write lock (DESIGN §7: claim, bounded batch, release).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from opsplane.engine.background import Supervised
from opsplane.engine.changes import Changes
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
    ) -> None:
        self._write = write
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

    async def run_once(self, now: datetime | None = None) -> RetentionResult:
        moment = now or utcnow()
        budget = self._max_batches
        events = hosts = 0
        complete = True
        if self._event_days > 0:
            cutoff = moment - timedelta(days=self._event_days)
            while True:
                if budget <= 0:
                    complete = False
                    break
                budget -= 1
                async with self._write() as changes:
                    ids = await queries.prunable_event_ids(changes.session, cutoff, self._batch)
                    await queries.delete_events(changes.session, ids)
                events += len(ids)
                if len(ids) < self._batch:
                    break
        if self._host_days > 0:
            cutoff = moment - timedelta(days=self._host_days)
            while True:
                if budget <= 0:
                    complete = False
                    break
                budget -= 1
                async with self._write() as changes:
                    names = await queries.hosts_gone_since(
                        changes.session, cutoff, exclude_links=self._keep_links, limit=self._batch
                    )
                    await queries.delete_hosts(changes.session, names)
                    for name in names:
                        changes.host_changed(name)
                hosts += len(names)
                if names:
                    log.info(
                        "host retention: forgot %d hosts gone since %s (%s%s)",
                        len(names),
                        cutoff.isoformat(),
                        ", ".join(names[:5]),
                        ", …" if len(names) > 5 else "",
                    )
                if len(names) < self._batch:
                    break
        if events:
            log.info("event retention: removed %d task events", events)
        return RetentionResult(events=events, hosts=hosts, complete=complete)

    async def _loop(self) -> None:
        while True:
            delay = self._interval
            try:
                if not (await self.run_once()).complete:
                    delay = min(1.0, self._interval)
            except Exception:
                log.exception("database retention pass failed; retrying in %.0fs", delay)
            await asyncio.sleep(delay)
