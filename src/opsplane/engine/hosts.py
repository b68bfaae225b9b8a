"""Host registry: connections, disconnections and reconciliation of a reconnecting agent."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.errors import ConfigError, Conflict, NameTaken, NotFound
from opsplane.domain.inventory import SshHostRequest
from opsplane.domain.states import IN_FLIGHT_RUN_STATUSES, RunStatus
from opsplane.engine.changes import Changes
from opsplane.store import queries
from opsplane.store.tables import HeartbeatRow, HostRow, RunRow, TaskRow, utcnow
from opsplane.transport.base import AGENT_LINKS, LOCAL_LINK, SSH_LINK, AgentHello, Link

log = logging.getLogger(__name__)

NEVER_RECEIVED = (
    "the agent reconnected and never received this command (its queue or stream was gone)"
)
UNKNOWN_TO_AGENT = "the agent reconnected without this run (it restarted while the run was going)"


class HostService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        links: Mapping[str, Link],
        *,
        group_bastions: Mapping[str, str] | None = None,
    ) -> None:
        self._sessions = sessions
        self._write = write
        self._links = links
        self._group_bastions = dict(group_bastions or {})

    async def host_connected(self, hello: AgentHello, *, enrolled: bool = False) -> None:
        """Register the host and reconcile its in-flight runs with what the agent reports.

        A run the control plane thinks is on the host, but which the agent neither runs nor
        holds a result for, will never report: it ends now rather than after a timeout.

        An agent never takes over a host of another link (NameTaken): not an SSH host, not the
        control plane's own, and not another agent link's host unless it is ``enrolled`` (it
        proved the enrolled key of that name: the same agent, moved to another link).
        """
        now = utcnow()
        async with self._write() as changes:
            host = await queries.get_host(changes.session, hello.hostname)
            if host is None:
                host = HostRow(name=hello.hostname, created_at=now)
                changes.session.add(host)
            elif (
                host.link != hello.link
                and hello.link in AGENT_LINKS
                and (host.link not in AGENT_LINKS or not enrolled)
            ):
                raise NameTaken(
                    f"{hello.hostname} is a {host.link} host: an agent on {hello.link} "
                    "cannot take it over"
                )
            host.link = hello.link
            host.groups = list(hello.groups)
            host.labels = dict(hello.labels)
            host.agent_version = hello.version or None
            host.os = hello.os or None
            host.public_key = hello.public_key or host.public_key
            host.status = "online"
            host.last_seen_at = now
            host.connected_at = now
            changes.host_changed(host.name)
            runs = await queries.runs_in_status(
                changes.session, IN_FLIGHT_RUN_STATUSES, host=hello.hostname
            )
            for run in runs if hello.reconcile else ():
                self._reconcile(changes, run, hello)
        log.info(
            "host %s connected over %s (groups: %s)",
            hello.hostname,
            hello.link,
            ",".join(hello.groups),
        )

    @staticmethod
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

    async def host_disconnected(self, hostname: str, link: str) -> None:
        async with self._write() as changes:
            host = await queries.get_host(changes.session, hostname)
            if host is not None and host.link == link:
                host.status = "offline"
                stream = self._links.get(link)
                if stream is not None and stream.liveness_by_stream:
                    # The stream was the host's liveness until now (its heartbeats are only
                    # metrics, a minute apart): the grace before its runs are lost starts here.
                    host.last_seen_at = utcnow()
                changes.host_changed(hostname)
        log.info("host %s disconnected from %s", hostname, link)

    async def get_host(self, name: str) -> HostRow:
        async with self._sessions() as session:
            host = await queries.get_host(session, name)
        if host is None:
            raise NotFound(f"host {name} not found")
        return host

    async def register_ssh_host(self, request: SshHostRequest, *, adhoc: bool = False) -> HostRow:
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
        link.update_inventory(request.name, request.for_link())
        return host

    async def remove_host(self, name: str) -> HostRow:
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
        if host.link == SSH_LINK and (ssh_link := self._links.get(SSH_LINK)) is not None:
            ssh_link.update_inventory(name, None)
        log.info("host %s (%s) removed", name, host.link)
        return host

    async def load_inventory(self) -> None:
        """Tell the links about the inventory hosts the store holds (at start-up)."""
        async with self._sessions() as session:
            hosts = await queries.hosts_of_link(session, SSH_LINK)
        link = self._links.get(SSH_LINK)
        for host in hosts:
            if link is not None and host.ssh:
                link.update_inventory(host.name, host.ssh)

    async def heartbeat_history(self, name: str, since: datetime) -> list[HeartbeatRow]:
        """Downsampled heartbeats (one a minute, kept a day) since ``since``."""
        await self.get_host(name)
        async with self._sessions() as session:
            return await queries.heartbeat_history(session, name, since, limit=2000)

    async def runs_of_host(
        self, name: str, *, page: int, size: int
    ) -> tuple[list[tuple[RunRow, TaskRow]], int]:
        await self.get_host(name)
        async with self._sessions() as session:
            return await queries.runs_of_host(session, name, offset=(page - 1) * size, limit=size)

    async def hosts_named(self, names: set[str]) -> list[HostRow]:
        async with self._sessions() as session:
            hosts = await queries.hosts_by_name(session, names)
        return [hosts[name] for name in sorted(hosts)]

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
        *,
        status: str | None,
        group: str | None,
        page: int,
        size: int,
        include_adhoc: bool = False,
    ) -> tuple[list[HostRow], int]:
        async with self._sessions() as session:
            # The control plane's own host runs catalog scripts; it is not part of the fleet,
            # and neither are seed-000's ad-hoc targets unless asked for.
            return await queries.list_hosts(
                session,
                status=status,
                group=group,
                offset=(page - 1) * size,
                limit=size,
                exclude_link=LOCAL_LINK,
                include_adhoc=include_adhoc,
            )
