"""The engine: the only place that changes task and run state (DESIGN §1).

Composes the store, the links and the long-lived services (ingest, monitor) under one
lifecycle, and implements ``LinkEvents`` for the links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncEngine

from opsplane.config import Settings
from opsplane.domain.redaction import Redactor
from opsplane.domain.states import TERMINAL_TASK_STATUSES, RunStatus, TaskStatus
from opsplane.engine.archive import LogArchive
from opsplane.engine.changes import Changes
from opsplane.engine.dispatcher import Dispatcher
from opsplane.engine.hosts import HostService
from opsplane.engine.hub import EventHub
from opsplane.engine.ingest import Ingest
from opsplane.engine.monitor import Monitor
from opsplane.engine.service import TaskService
from opsplane.engine.sshapi import SshApi
from opsplane.store import queries
from opsplane.store.database import create_engine, session_factory
from opsplane.store.migrate import upgrade_to_head
from opsplane.store.tables import TaskRow
from opsplane.transport.base import AgentHello, HostReport, Link

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self, settings: Settings, links: list[Link], db: AsyncEngine | None = None
    ) -> None:
        self.settings = settings
        self.db = db or create_engine(settings.effective_database_url)
        self.sessions = session_factory(self.db)
        self.links = {link.name: link for link in links}
        self.hub = EventHub()
        self.archive = LogArchive(settings.logs_dir)
        # One writer at a time within this instance: SQLite has one writer anyway, and on a
        # server database it keeps a task's counts consistent without row-lock retries.
        self._write_lock = asyncio.Lock()
        self.ingest = Ingest(
            self.write,
            self.archive,
            batch_size=settings.ingest_batch_size,
            linger=settings.ingest_linger,
            redactor=Redactor(settings.redact_patterns),
        )
        self.dispatcher = Dispatcher(self.write, self.links)
        self.tasks = TaskService(
            self.sessions,
            self.write,
            self.dispatcher,
            self.ingest,
            self.archive,
            self.links,
            default_timeout=settings.default_timeout,
            upload_roots=settings.effective_upload_roots,
        )
        self.hosts = HostService(
            self.sessions, self.write, self.links, group_bastions=settings.ssh_group_bastions
        )
        self.ssh_api = SshApi(self.hosts, self.tasks, self.wait_task)
        self.monitor = Monitor(
            self.write,
            heartbeat_interval=settings.heartbeat_interval,
            offline_after_missed=settings.offline_after_missed,
            lost_grace=settings.lost_grace,
            start_timeout=settings.start_timeout,
            silent_links=[n for n, link in self.links.items() if not link.liveness_by_heartbeat],
        )
        self._recovery: asyncio.Task[None] | None = None
        self.ready = False

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Changes]:
        """A write transaction; its task events are published once it has committed."""
        async with self._write_lock, self.sessions() as session, session.begin():
            changes = Changes(session)
            yield changes
            await changes.settle()
        self.hub.publish(changes.events)
        self.hub.publish_hosts(changes.hosts_changed)

    async def start(self) -> None:
        """Migrate the database, then start ingest, links, monitor and recovery. Idempotent:
        the CLI starts the engine before the server so that a bad setting is one clear line."""
        if self.ready:
            return
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await upgrade_to_head(self.db)
        async with self.write() as changes:
            # Connections died with the previous process: hosts are offline until they return.
            # Hosts of silent links have no connection to lose.
            for name, link in self.links.items():
                if link.liveness_by_heartbeat:
                    await queries.mark_all_hosts(changes.session, "offline", link=name)
        await self.ingest.start()
        for link in self.links.values():
            await link.start(self)
        await self.hosts.load_inventory()
        await self.monitor.start()
        self._recovery = asyncio.create_task(self._recover(), name="recovery")
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        await self.ssh_api.stop()
        for link in self.links.values():
            await link.stop()
        await self.monitor.stop()
        await self.ingest.stop()
        await self.db.dispose()

    async def _recover(self) -> None:
        """Dispatch runs that a previous process created but never sent, once agents have had
        a heartbeat interval to reconnect."""
        async with self.sessions() as session:
            pending = await queries.runs_in_status(session, [RunStatus.PENDING])
            tasks = await queries.tasks_by_id(session, {run.task_id for run in pending})
        running = [t.id for t in tasks.values() if t.status == TaskStatus.RUNNING]
        if not running:
            return
        await asyncio.sleep(self.settings.heartbeat_interval)
        for task_id in running:
            log.info("recovery: dispatching pending runs of task %s", task_id)
            await self.tasks.dispatch_pending(task_id)

    async def wait_task(self, task_id: str) -> TaskRow:
        """The task once it has ended (bound the wait with ``asyncio.timeout`` at the caller)."""
        subscription = self.hub.subscribe(task_id)
        try:
            while True:
                task = await self.tasks.get_task(task_id)
                if task.status in TERMINAL_TASK_STATUSES:
                    return task
                # Woken by the task's own events; the timeout is a backstop if the hub dropped
                # this subscriber for falling behind.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        while (await subscription.queue.get()).kind != "task":
                            pass
        finally:
            self.hub.unsubscribe(subscription)

    # LinkEvents -------------------------------------------------------------------------

    async def host_connected(self, hello: AgentHello) -> None:
        await self.hosts.host_connected(hello)

    async def host_disconnected(self, hostname: str, link: str) -> None:
        await self.hosts.host_disconnected(hostname, link)

    async def report(self, report: HostReport) -> asyncio.Future[None]:
        return await self.ingest.report(report)

    async def handle_host_connection_change(
        self, hello_or_name: AgentHello | str, connected: bool, link: str = "grpc"
    ) -> None:
        """Seed 001's HandleHostConnectionChange."""
        if connected and isinstance(hello_or_name, AgentHello):
            await self.host_connected(hello_or_name)
        elif not connected:
            name = hello_or_name if isinstance(hello_or_name, str) else hello_or_name.hostname
            await self.host_disconnected(name, link)
