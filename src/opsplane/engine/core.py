"""The engine: the only place that changes task and run state (DESIGN §1).

Composes the store, the links and the long-lived services (ingest, monitor) under one
lifecycle, and implements ``LinkEvents`` for the links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from opsplane.config import Settings
from opsplane.domain.errors import InvalidInput, ReportRejected
from opsplane.domain.records import AgentRecord, TaskRecord
from opsplane.domain.redaction import Redactor
from opsplane.domain.states import TERMINAL_TASK_STATUSES
from opsplane.engine.archive import ArchivePruner, LogArchive
from opsplane.engine.background import Loops
from opsplane.engine.changes import Changes, TaskEvent
from opsplane.engine.connections import BatchOutcome
from opsplane.engine.dispatcher import Dispatcher
from opsplane.engine.hosts import HostService
from opsplane.engine.hub import EventHub
from opsplane.engine.ingest import Ingest
from opsplane.engine.leases import INSTANCE_PREFIX, Duties, Lease, instance_name
from opsplane.engine.monitor import Monitor
from opsplane.engine.ports import AgentKeysFactory, InstanceRouter, SecretOpener
from opsplane.engine.recovery import settle_interrupted_runs
from opsplane.engine.retention import Retention
from opsplane.engine.scheduler import Scheduler
from opsplane.engine.schedules import ScheduleService
from opsplane.engine.service import TaskService
from opsplane.engine.sshapi import SshApi
from opsplane.engine.templates import TemplateService
from opsplane.store import queries
from opsplane.store.database import create_engine, session_factory
from opsplane.store.leases import current_holders
from opsplane.store.migrate import upgrade_to_head
from opsplane.store.tables import utcnow
from opsplane.transport.base import (
    LOCAL_LINK,
    SSH_LINK,
    AgentHello,
    AgentKey,
    HostReport,
    Link,
    check_report,
)

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        settings: Settings,
        links: list[Link],
        db: AsyncEngine | None = None,
        *,
        agents: AgentKeysFactory,
        secrets: SecretOpener,
        router: InstanceRouter | None = None,
    ) -> None:
        """``agents`` and ``secrets`` come from the composition root
        (``opsplane.app_factory.make_engine``), which wires them to the security side.
        ``router``: how this instance reaches the others sharing its database (set with
        ``amqp_url``; docs/instances.md)."""
        self.settings = settings
        # This process among the instances sharing the database (the holder of its leases).
        self.instance = instance_name()
        # Runs dispatched before this start on links that execute here, not settled yet: a
        # predecessor may have been executing them (engine/recovery.py).
        self._interrupted_before: datetime | None = None
        self.router = router
        self.db = db or create_engine(settings.effective_database_url)
        self.sessions = session_factory(self.db)
        self.links = {link.name: link for link in links}
        self.hub = EventHub()
        self.archive = LogArchive(
            settings.logs_dir,
            retention_days=settings.log_retention_days,
            retention_bytes=settings.log_retention_bytes,
            max_bytes_per_run=settings.archive_max_bytes_per_run,
        )
        self.archive_pruner = ArchivePruner(self.archive, interval=settings.log_prune_interval)
        # One writer at a time within this instance: SQLite has one writer anyway, and on a
        # server database it keeps a task's counts consistent without row-lock retries.
        self._write_lock = asyncio.Lock()
        self.ingest = Ingest(
            self.write,
            self.archive,
            batch_size=settings.ingest_batch_size,
            linger=settings.ingest_linger,
            redactor=Redactor(settings.redact_patterns),
            event_output_cap=settings.event_output_cap,
            output_cap=settings.output_cap,
            max_queue_bytes=settings.ingest_queue_bytes,
            probe=self.ping_database,
            on_rejected=lambda _why: self.message_refused("ingest", "unprocessable"),
        )
        self.secrets = secrets
        self.dispatcher = Dispatcher(
            self.write, self.links, secrets=secrets, router=router, instance=self.instance
        )
        # This instance's liveness lease and its claims on the singleton duties.
        self.duties = Duties(
            self.write,
            holder=self.instance,
            ttl=settings.instance_lease_ttl,
            alive=router.alive if router is not None else None,
        )
        self.scheduler = Scheduler(
            self.write,
            self.dispatcher,
            self.archive,
            max_running=settings.max_running_runs,
            max_per_host=settings.max_runs_per_host,
            host_limits={settings.local_host: settings.script_workers},
            start_delay=settings.heartbeat_interval,
            duty=lambda: self.duties.holds("monitor"),
            # Other instances may share the database: runs are claimed before they are sent.
            claims=True,
        )
        self.tasks = TaskService(
            self.sessions,
            self.write,
            self.dispatcher,
            self.scheduler,
            self.ingest,
            self.archive,
            self.links,
            default_timeout=settings.default_timeout,
            upload_roots=settings.effective_upload_roots,
            upload_max_bytes=settings.upload_max_bytes,
        )
        self.hosts = HostService(
            self.sessions,
            self.write,
            self.links,
            group_bastions=settings.ssh_group_bastions,
            probe=self.ping_database,
            on_written=self._connections_written,
            connect_batch_size=settings.connect_batch_size,
            connect_linger=settings.connect_linger,
            instance=self.instance,
        )
        self.templates = TemplateService(self.sessions, self.write, self.tasks, self.secrets)
        self.schedules = ScheduleService(self.sessions, self.write, self.templates, self.secrets)
        self.ssh_api = SshApi(self.hosts, self.tasks, self.wait_task, self.write, self.sessions)
        self.monitor = Monitor(
            self.write,
            heartbeat_interval=settings.heartbeat_interval,
            offline_after_missed=settings.offline_after_missed,
            lost_grace=settings.lost_grace,
            start_timeout=settings.start_timeout,
            silent_links=[n for n, link in self.links.items() if not link.liveness_by_heartbeat],
            held_links=[n for n, link in self.links.items() if link.executes_here],
            silent_starter_links=[n for n, ln in self.links.items() if ln.has_silent_starters],
            on_silent=self._drop_silent,
            hearing=lambda: not self.ingest.paused,
            timeout_grace=settings.timeout_grace,
            send_cancels=self.dispatcher.send_cancels,
            heard=self._heard,
            instance=self.instance,
            duty=lambda: self.duties.ran("monitor"),
            on_duty=self._settle_interrupted_when_alone,
        )
        self.retention = Retention(
            self.write,
            event_retention_days=settings.event_retention_days,
            host_retention_days=settings.host_retention_days,
            # Inventory hosts are registered by an operator, not by a connecting agent.
            keep_links=(SSH_LINK, LOCAL_LINK),
            interval=settings.retention_interval,
            on_forgotten=self.hosts.forget,
            # Held past the next pass, so that the holder keeps it while it lives.
            lease=Lease(
                self.write,
                "retention",
                holder=self.instance,
                ttl=2 * settings.retention_interval + 60,
            ),
        )
        self.agents = agents(self.sessions, self.write)
        if router is not None:
            self.agents.on_change(lambda names: router.notify({"agents": names}))
        # Messages the links refused, by (link, reason): the metrics read them.
        self.refused: Counter[tuple[str, str]] = Counter()
        # Every long-lived loop, supervised (restarted with backoff); /readyz reports them.
        self.loops = Loops()
        for loop in (self.ingest.loop, self.monitor.loop, self.scheduler.loop, self.duties.loop):
            self.loops.add(loop)
        self.loops.add(self.archive_pruner.loop)
        self.loops.add(self.retention.loop)
        self.loops.add(self.schedules.loop)
        self.loops.add(self.hosts.connections.loop)
        self.ready = False

    async def ping_database(self) -> None:
        """Raises unless the database answers a trivial query."""
        async with self.sessions() as session:
            await session.execute(text("SELECT 1"))

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Changes]:
        """A write transaction; its task events are published once it has committed."""
        async with self._write_lock, self.sessions() as session, session.begin():
            changes = Changes(session, self.scheduler.follow_up)
            yield changes
            await changes.settle()
        if changes.schedule_again:
            self.scheduler.wake()
        self.hub.publish(changes.events)
        self.hub.publish_hosts(changes.hosts_changed)
        if self.router is not None and (changes.events or changes.hosts_changed):
            self.router.notify(
                {
                    "events": [_event_json(e) for e in changes.events],
                    "hosts": sorted(changes.hosts_changed),
                }
            )

    async def start(self) -> None:
        """Migrate the database, then start ingest, links, monitor and recovery. Idempotent:
        the CLI starts the engine before the server so that a bad setting is one clear line."""
        if self.ready:
            return
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await upgrade_to_head(self.db)
        if self.router is not None:
            await self.router.start(self.instance, self.dispatcher.deliver_routed, self._notice)
        # Alive before holding any stream: another instance's monitor takes over only the
        # hosts of instances whose liveness lease has expired.
        await self.duties.start()
        async with self.write() as changes:
            # Connections died with the previous process: hosts are offline until they return.
            # Hosts of silent links have no connection to lose. Streams another running
            # instance holds are alive: that instance judges them.
            for name, link in self.links.items():
                if not link.liveness_by_heartbeat:
                    continue
                alive = None
                if self.router is not None and link.liveness_by_stream:
                    held = await queries.host_instances(changes.session, link=name)
                    alive = await self.router.alive(held)
                await queries.mark_all_hosts(changes.session, "offline", link=name, alive=alive)
            # Runs this process's predecessor executed itself can never report: they end now.
            # Not while another instance lives: the runs do not say which instance executes
            # them, and the other's are alive (docs/instances.md).
            self._interrupted_before = utcnow()
            await self._settle_interrupted_when_alone(changes)
        await self.agents.load()
        await self.hosts.load()
        await self.hosts.connections.start()
        await self.ingest.start()
        await self.archive_pruner.start()
        for link in self.links.values():
            await link.start(self)
        await self.hosts.load_inventory()
        await self.monitor.start()
        await self.retention.start()
        # Recovery: runs a previous process created but never sent are waiting runs like any
        # other; the scheduler's first pass, a heartbeat interval after start, sends them.
        await self.scheduler.start()
        # Seed-000 requests whose later commands a previous process had not started yet.
        await self.ssh_api.start()
        await self.schedules.start()
        self.ready = True

    async def _settle_interrupted_when_alone(self, changes: Changes) -> None:
        """End ``lost`` the runs a dead predecessor executed in its own process, once no other
        instance lives (their runs do not say which instance executes them): at start, or at a
        later pass of the monitor when a killed predecessor's lease was still current then."""
        if self._interrupted_before is None:
            return
        others = await current_holders(changes.session, INSTANCE_PREFIX)
        if not others <= {INSTANCE_PREFIX + self.instance}:
            return
        await settle_interrupted_runs(
            changes,
            [name for name, link in self.links.items() if link.executes_here],
            dispatched_before=self._interrupted_before,
        )
        self._interrupted_before = None

    async def stop(self) -> None:
        self.ready = False
        await self.schedules.stop()
        await self.scheduler.stop()
        await self.ssh_api.stop()
        for link in self.links.values():
            await link.stop()
        if self.router is not None:
            await self.router.stop()
        await self.hosts.connections.stop()
        if self.router is not None:
            # The streams ended with the links: the other instances must not route to them.
            # (One instance alone marks its hosts offline when it starts again.)
            try:
                async with self.write() as changes:
                    await queries.release_hosts(changes.session, self.instance)
            except Exception as e:
                log.warning("could not release this instance's hosts: %s", e)
        await self.monitor.stop()
        await self.duties.stop()
        await self.retention.stop()
        await self.archive_pruner.stop()
        await self.ingest.stop()
        await self.db.dispose()

    async def wait_task(self, task_id: str) -> TaskRecord:
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

    def host_connecting(self, hello: AgentHello) -> asyncio.Future[None]:
        # Only an agent that proved its enrolled key may move its host to another agent link
        # (an agent moved from gRPC to RabbitMQ); see HostService.claim.
        identity = self.agents.identity(hello.hostname)
        enrolled = (
            identity is not None
            and not identity.revoked
            and bool(hello.public_key)
            and identity.public_key == hello.public_key
        )
        return self.hosts.connect(hello, enrolled=enrolled)

    async def host_connected(self, hello: AgentHello) -> None:
        await self.host_connecting(hello)

    async def host_disconnected(self, hostname: str, link: str) -> None:
        await self.hosts.host_disconnected(hostname, link)

    def _connections_written(self, outcome: BatchOutcome) -> None:
        if outcome.connected:
            # Runs delayed for these hosts may go now.
            self.scheduler.wake()

    async def report(self, report: HostReport) -> asyncio.Future[None]:
        # The links check what hosts send (and count refusals by link); this guards ingest
        # against a report built wrong by any link, ours included.
        try:
            check_report(report)
        except InvalidInput as e:
            log.warning("refused a report from %s: %s", report.hostname, e)
            self.message_refused("engine", "malformed")
            refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            refused.set_exception(ReportRejected(str(e)))
            return refused
        return await self.ingest.report(report)

    def _heard(self, name: str, link_name: str) -> bool:
        """Whether a host past the heartbeat silence limit is alive all the same: its link heard
        it (an open stream that checks its peer, a RabbitMQ heartbeat received lately), or a
        heartbeat of it waits in ingest."""
        link = self.links.get(link_name)
        if link is not None and link.heard(name):
            return True
        return self.ingest.beat_waiting(name)

    async def _drop_silent(self, hosts: list[tuple[str, str]]) -> None:
        """Close the connections of hosts the monitor found silent. A stream can look open to
        a peer that stopped answering without closing it (a frozen agent, a cut cable: no
        FIN); left open, it would still count as a way to reach the host, and a run sent on
        it (a retry of the run it lost) would be lost as well. The agent, if it comes back,
        reconnects and says hello."""
        for name, link_name in hosts:
            link = self.links.get(link_name)
            if link is not None:
                await link.drop(name, "no heartbeat: the host is offline")

    async def _notice(self, notice: dict[str, Any]) -> None:
        """What another instance said (docs/instances.md): its task events and host changes,
        for this instance's live streams; agents it enrolled or revoked."""
        events = notice.get("events")
        if isinstance(events, list):
            self.hub.publish_foreign(
                [
                    TaskEvent(
                        int(e["id"]),
                        str(e["task_id"]),
                        str(e["kind"]),
                        dict(e["data"]),
                        bool(e.get("durable", True)),
                    )
                    for e in events
                ]
            )
        hosts = notice.get("hosts")
        if isinstance(hosts, list) and hosts:
            self.hub.publish_hosts({str(name) for name in hosts})
        agents = notice.get("agents")
        if isinstance(agents, list) and agents:
            await self.agents.load()
            for name in map(str, agents):
                identity = self.agents.identity(name)
                if identity is not None and identity.revoked:
                    for link in self.links.values():
                        await link.drop(name, f"agent {name} was revoked")

    async def revoke_agent(self, name: str, *, revoked_by: str) -> AgentRecord:
        """Revoke an enrolled agent and drop its live connections."""
        row = await self.agents.revoke(name, revoked_by=revoked_by)
        for link in self.links.values():
            await link.drop(name, f"agent {name} was revoked")
        return row

    def agent_refusal(self, hostname: str, public_key: str, groups: Iterable[str]) -> str | None:
        return self.agents.refusal(hostname, public_key, groups)

    def agent_key(self, hostname: str) -> AgentKey | None:
        identity = self.agents.identity(hostname)
        return AgentKey(identity.key, identity.revoked) if identity is not None else None

    def message_refused(self, link: str, reason: str) -> None:
        self.refused[(link, reason)] += 1

    async def handle_host_connection_change(
        self, hello_or_name: AgentHello | str, connected: bool, link: str = "grpc"
    ) -> None:
        """Seed 001's HandleHostConnectionChange."""
        if connected and isinstance(hello_or_name, AgentHello):
            await self.host_connected(hello_or_name)
        elif not connected:
            name = hello_or_name if isinstance(hello_or_name, str) else hello_or_name.hostname
            await self.host_disconnected(name, link)


def _event_json(event: TaskEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "task_id": event.task_id,
        "kind": event.kind,
        "data": event.data,
        "durable": event.durable,
    }
