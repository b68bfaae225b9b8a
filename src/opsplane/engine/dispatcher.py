"""Dispatcher: hands runs to links. A run is marked ``dispatched`` durably before it is sent,
so a result can never arrive for a run the database still calls pending."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from opsplane.domain.errors import TransportError
from opsplane.domain.states import RunStatus
from opsplane.domain.tasks import ExecSpec
from opsplane.engine.changes import Changes
from opsplane.store import queries
from opsplane.store.tables import RunRow, TaskRow, utcnow
from opsplane.transport.base import CommandEnvelope, Link

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatch:
    """A run marked dispatched, to be sent once its transaction has committed."""

    link: str
    host: str
    envelope: CommandEnvelope


class Dispatcher:
    def __init__(
        self,
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        links: Mapping[str, Link],
        *,
        max_in_flight_sends: int = 500,
    ) -> None:
        self._write = write
        self._links = links
        self._send_slots = asyncio.Semaphore(max_in_flight_sends)

    def mark_deliverable(
        self, changes: Changes, task: TaskRow, runs: list[RunRow], link_of: Mapping[str, str]
    ) -> list[Dispatch]:
        """Within the caller's transaction: runs whose host is reachable become ``dispatched``,
        the others ``undeliverable``. Returns what to send once the transaction commits."""
        now = utcnow()
        spec = ExecSpec.from_json(task.spec)
        to_send: list[Dispatch] = []
        for run in runs:
            link_name = link_of.get(run.host, "grpc")
            link = self._links.get(link_name)
            if link is None or not link.is_connected(run.host):
                error = f"host offline: {run.host} has no live {link_name} connection"
                changes.move(run, RunStatus.UNDELIVERABLE, error=error)
                continue
            changes.move(run, RunStatus.DISPATCHED, dispatched_at=now)
            envelope = CommandEnvelope(
                task_id=task.id,
                run_id=run.id,
                attempt=run.attempt,
                command=task.command,
                timeout=task.timeout,
                user=task.created_by,
                env=spec.env,
                argv=spec.argv,
                handler=spec.handler,
                args=spec.args,
                cwd=spec.cwd,
            )
            to_send.append(Dispatch(link_name, run.host, envelope))
        return to_send

    async def send(self, to_send: list[Dispatch]) -> None:
        """Send committed dispatches; a failed send makes its run ``undeliverable``."""
        if not to_send:
            return
        results = await asyncio.gather(*(self._send_one(item) for item in to_send))
        failed = {run_id: error for run_id, error in results if error is not None}
        if not failed:
            return
        async with self._write() as changes:
            runs = await queries.runs_by_id(changes.session, failed)
            for run_id, run in runs.items():
                changes.move(run, RunStatus.UNDELIVERABLE, error=failed[run_id])

    async def _send_one(self, item: Dispatch) -> tuple[str, str | None]:
        run_id = item.envelope.run_id
        async with self._send_slots:
            try:
                await self._links[item.link].send_command(item.host, item.envelope)
            except TransportError as e:
                log.info("could not deliver run %s to %s: %s", run_id, item.host, e)
                return run_id, f"delivery failed: {e}"
        return run_id, None
