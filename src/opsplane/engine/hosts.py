"""Host registry: connections, disconnections and reconciliation of a reconnecting agent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.errors import ConfigError, Conflict, NameTaken, NotFound
from opsplane.domain.inventory import SshHostRequest
from opsplane.domain.paging import PageOf, PageRequest
from opsplane.domain.records import HeartbeatRecord, HostRecord, RunRecord, TaskRecord
from opsplane.domain.targeting import check_host_name, normalize_names
from opsplane.engine.changes import Changes
from opsplane.engine.connections import BatchOutcome, ConnectionWriter, taken_by_other_link
from opsplane.store import queries
from opsplane.store.records import record_of, records_of
from opsplane.store.tables import HostRow, utcnow
from opsplane.transport.base import LOCAL_LINK, SSH_LINK, AgentHello, Link

log = logging.getLogger(__name__)


class HostService:
    """The hosts: their rows, and an in-memory view of which link holds each name, loaded at
    start and updated on every change this instance makes, so that a link can decide a hello
    at once (NameTaken) and welcome the agent before its row is written (docs/scale.md)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        links: Mapping[str, Link],
        *,
        group_bastions: Mapping[str, str] | None = None,
        probe: Callable[[], Awaitable[None]] | None = None,
        on_written: Callable[[BatchOutcome], None] | None = None,
        connect_batch_size: int = 500,
        connect_linger: float = 0.05,
        instance: str | None = None,
    ) -> None:
        self._sessions = sessions
        self._write = write
        self._links = links
        self._group_bastions = dict(group_bastions or {})
        # Host name → link, for every host in the store.
        self._link_of: dict[str, str] = {}
        self.connections = ConnectionWriter(
            write,
            probe=probe or _no_probe,
            batch_size=connect_batch_size,
            linger=connect_linger,
            on_written=on_written,
            stream_links=frozenset(n for n, link in links.items() if link.liveness_by_stream),
            instance=instance,
        )

    async def load(self) -> None:
        """Read every host's link into the in-memory view (at start, before links start)."""
        async with self._sessions() as session:
            self._link_of = await queries.host_links(session)

    def claim(self, hello: AgentHello, *, enrolled: bool = False) -> None:
        """Decide at once whether ``hello`` may hold its name, and record that it does.

        An agent never takes over a host of another link (NameTaken): not an SSH host, not the
        control plane's own, and not another agent link's host unless it is ``enrolled`` (it
        proved the enrolled key of that name: the same agent, moved to another link)."""
        current = self._link_of.get(hello.hostname)
        if current is not None and taken_by_other_link(current, hello.link, enrolled):
            raise NameTaken(
                f"{hello.hostname} is a {current} host: an agent on {hello.link} "
                "cannot take it over"
            )
        self._link_of[hello.hostname] = hello.link

    def forget(self, names: list[str]) -> None:
        """Hosts deleted from the store (retention): their names are free again."""
        for name in names:
            self._link_of.pop(name, None)

    def connect(self, hello: AgentHello, *, enrolled: bool = False) -> asyncio.Future[None]:
        """Claim the name (NameTaken at once) and queue the host's row and the reconciliation
        of its in-flight runs; the future completes once they are durable.

        A run the control plane thinks is on the host, but which the agent neither runs nor
        holds a result for, will never report: it ends then rather than after a timeout."""
        self.claim(hello, enrolled=enrolled)
        return self.connections.connect(hello, enrolled=enrolled)

    async def host_connected(self, hello: AgentHello, *, enrolled: bool = False) -> None:
        """``connect`` and wait until it is durable."""
        await self.connect(hello, enrolled=enrolled)

    async def host_disconnected(self, hostname: str, link: str) -> None:
        """Mark the host offline if ``link`` still holds it, after any connect queued before."""
        await self.connections.disconnect(hostname, link)
        log.debug("host %s disconnected from %s", hostname, link)

    async def get_host(self, name: str) -> HostRecord:
        async with self._sessions() as session:
            host = await queries.get_host(session, name)
        if host is None:
            raise NotFound(f"host {name} not found")
        return record_of(HostRecord, host)

    async def register_agent_host(
        self, name: str, link: str, groups: tuple[str, ...], labels: Mapping[str, str]
    ) -> HostRecord:
        """Add or update the inventory entry of an agent's host: its groups and labels, which
        an agent whose heartbeat names none (seed 002's) keeps (``AgentHello.reports_groups``).
        Its status stays what its heartbeats say ("unknown" until the first)."""
        check_host_name(name)
        groups = tuple(normalize_names(groups, "group"))
        async with self._write() as changes:
            host = await queries.get_host(changes.session, name)
            if host is not None and host.link != link:
                raise Conflict(f"{name} is a {host.link} host; it cannot become a {link} host")
            if host is None:
                host = HostRow(name=name, link=link, status="unknown", created_at=utcnow())
                changes.session.add(host)
                self._link_of[name] = link
            host.groups = list(groups)
            host.labels = dict(labels)
            changes.host_changed(name)
        log.info("host %s (%s) registered with groups %s", name, link, ",".join(groups))
        return record_of(HostRecord, host)

    async def register_ssh_host(
        self, request: SshHostRequest, *, adhoc: bool = False
    ) -> HostRecord:
        """Add or update an agentless host; secrets go to the link only, never the store.

        ``adhoc``: a target a seed-000 request brought (engine/sshapi.py). A new host is then
        flagged ad hoc (selected by name only, domain/targeting.py); an inventory host of that
        name stays one — its groups and labels are kept, the request's connection details
        apply. An operator's registration (``adhoc`` false) makes any host an inventory host.
        """
        request = request.validated()
        if not request.bastions:
            # A host without its own jump chain takes the first of its groups' defaults.
            chain = next(
                (self._group_bastions[g] for g in request.groups if g in self._group_bastions), ""
            )
            request = replace(request, bastions=chain)
        link = self._links.get(SSH_LINK)
        if link is None:
            raise ConfigError("the SSH link is not available: pip install 'opsplane[ssh]'")
        async with self._write() as changes:
            host = await queries.get_host(changes.session, request.name)
            if host is not None and host.link != SSH_LINK:
                raise Conflict(
                    f"{request.name} is a {host.link} host; it cannot become an SSH host"
                )
            if host is None:
                host = HostRow(name=request.name, link=SSH_LINK, adhoc=adhoc, created_at=utcnow())
                changes.session.add(host)
            if not adhoc or host.adhoc:
                host.groups = list(request.groups)
                host.labels = dict(request.labels)
                host.adhoc = adhoc
            host.ssh = request.stored()
            # Agentless hosts have no heartbeat: reachable means "known"; a failed connect
            # is that run's result.
            host.status = "online"
            changes.host_changed(request.name)
        self._link_of[request.name] = SSH_LINK
        link.update_inventory(request.name, request.for_link())
        return record_of(HostRecord, host)

    async def hand_to_agent(self, name: str, link: str) -> None:
        """An SSH host becomes an agent's host (``opsplane agents deploy``): from now on its
        runs go to the agent on ``link``, which may enroll under its name. Its SSH access is
        kept (the row's ``ssh`` and the SSH link's target), for the agent's upgrades. The host
        is offline until the agent says hello."""
        async with self._write() as changes:
            host = await queries.get_host(changes.session, name)
            if host is None:
                raise NotFound(f"host {name} not found")
            if host.link == link:
                return
            if host.link != SSH_LINK or not host.ssh:
                raise Conflict(f"{name} is a {host.link} host, not an SSH host")
            busy = await queries.busy_runs_of_host(changes.session, name)
            if busy:
                raise Conflict(f"{name} has {busy} SSH run(s) waiting or in flight")
            host.link = link
            host.status = "offline"
            changes.host_changed(name)
        self._link_of[name] = link
        log.info("host %s handed from ssh to its %s agent", name, link)

    async def runs_in_flight(self, name: str) -> int:
        async with self._sessions() as session:
            return await queries.runs_in_flight_on_host(session, name)

    async def hosts_reachable_by_ssh(self) -> list[HostRecord]:
        """Every inventory host with SSH access: SSH hosts and agents deployed over SSH."""
        async with self._sessions() as session:
            hosts = await queries.hosts_with_ssh(session)
        return [record_of(HostRecord, host) for host in hosts if not host.adhoc]

    async def remove_host(self, name: str) -> HostRecord:
        """Forget a host: its row and heartbeat history (its runs stay, as history).

        Refused (Conflict) for the control plane's own host, for an agent that is connected
        (it would only register again: stop or revoke it first), and for a host with runs
        waiting or in flight (cancel them or let them end: a removed host's runs could never
        be reconciled). An agent that connects after its host was removed registers anew."""
        async with self._write() as changes:
            host = await queries.get_host(changes.session, name)
            if host is None:
                raise NotFound(f"host {name} not found")
            if host.link == LOCAL_LINK:
                raise Conflict(f"{name} is the control plane's own host")
            link = self._links.get(host.link)
            connected = link is not None and link.is_connected(name)
            if host.link != SSH_LINK and (host.status == "online" or connected):
                raise Conflict(
                    f"{name} is connected over {host.link}: stop (or revoke) its agent first"
                )
            busy = await queries.busy_runs_of_host(changes.session, name)
            if busy:
                raise Conflict(
                    f"{name} has {busy} run(s) waiting or in flight: "
                    "cancel their tasks or let them end first"
                )
            await queries.delete_hosts(changes.session, [name])
            changes.host_changed(name)
        self._link_of.pop(name, None)
        if host.ssh and (ssh_link := self._links.get(SSH_LINK)) is not None:
            ssh_link.update_inventory(name, None)
        log.info("host %s (%s) removed", name, host.link)
        return record_of(HostRecord, host)

    async def load_inventory(self) -> None:
        """Tell the links about the inventory hosts the store holds (at start-up)."""
        async with self._sessions() as session:
            # An agent host deployed over SSH keeps its SSH access, for its upgrades.
            hosts = await queries.hosts_with_ssh(session)
        link = self._links.get(SSH_LINK)
        for host in hosts:
            if link is not None and host.ssh:
                link.update_inventory(host.name, host.ssh)

    async def heartbeat_history(self, name: str, since: datetime) -> list[HeartbeatRecord]:
        """Downsampled heartbeats (one a minute, kept a day) since ``since``."""
        await self.get_host(name)
        async with self._sessions() as session:
            rows = await queries.heartbeat_history(session, name, since, limit=2000)
        return [record_of(HeartbeatRecord, row) for row in rows]

    async def runs_of_host(
        self, name: str, page: PageRequest, *, output: bool = False
    ) -> PageOf[tuple[RunRecord, TaskRecord]]:
        await self.get_host(name)
        async with self._sessions() as session:
            found = await queries.runs_of_host(session, name, page, output=output)
        items = [
            (record_of(RunRecord, run), record_of(TaskRecord, task)) for run, task in found.items
        ]
        return PageOf(items, found.total, found.next_cursor)

    async def hosts_named(self, names: set[str]) -> list[HostRecord]:
        """The hosts of these names that exist, by name (read in chunks that every backend
        accepts in one IN list)."""
        wanted = sorted(names)
        hosts: dict[str, HostRow] = {}
        async with self._sessions() as session:
            for start in range(0, len(wanted), 500):
                hosts.update(await queries.hosts_by_name(session, wanted[start : start + 500]))
        return [record_of(HostRecord, hosts[name]) for name in sorted(hosts)]

    async def fleet_summary(self) -> dict[str, int]:
        """Hosts by status and the number of running tasks, for dashboards."""
        async with self._sessions() as session:
            by_status = await queries.host_status_counts(
                session, exclude_link=LOCAL_LINK, include_adhoc=False
            )
            running = await queries.count_tasks(session, "running")
        summary = {status: by_status.get(status, 0) for status in ("online", "offline", "unknown")}
        summary["total"] = sum(by_status.values())
        summary["running_tasks"] = running
        return summary

    async def list_hosts(
        self,
        page: PageRequest,
        *,
        status: str | None = None,
        group: str | None = None,
        name: str | None = None,
        include_adhoc: bool = False,
    ) -> PageOf[HostRecord]:
        async with self._sessions() as session:
            # The control plane's own host runs catalog scripts; it is not part of the fleet,
            # and neither are seed-000's ad-hoc targets unless asked for.
            found = await queries.list_hosts(
                session,
                page,
                status=status,
                group=group,
                name=name,
                exclude_link=LOCAL_LINK,
                include_adhoc=include_adhoc,
            )
        return records_of(HostRecord, found)


async def _no_probe() -> None:
    """Without a probe, a failed batch is taken for the database being down: retried whole."""
    raise ConnectionError("no database probe")
