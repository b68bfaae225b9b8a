"""Dispatcher: hands runs to links. A run is marked ``dispatched`` durably before it is sent,
so a result can never arrive for a run the database still calls pending.

A task aimed at groups or at all hosts goes out as one message per group (or one broadcast) on a
link that can fan out (RabbitMQ, DESIGN §3.2), while the engine still tracks one run per host.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from opsplane.domain.errors import ConfigError, NotConnected, TransportError
from opsplane.domain.states import RunStatus
from opsplane.domain.tasks import ExecSpec
from opsplane.engine.changes import Changes
from opsplane.engine.ports import InstanceRouter, SecretOpener
from opsplane.logcontext import about
from opsplane.store import queries
from opsplane.store.tables import HostRow, RunRow, TaskRow, utcnow
from opsplane.transport.base import (
    CommandBatch,
    CommandEnvelope,
    Fanout,
    Link,
    RoutedMessage,
    UploadSpec,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class Dispatch:
    """A run marked dispatched, to be sent once its transaction has committed."""

    link: str
    host: str
    envelope: CommandEnvelope
    # The instance holding the host's stream, when another one does (docs/instances.md).
    instance: str | None = None


@dataclass(frozen=True)
class LinkFanout:
    link: str
    fanout: Fanout


@dataclass
class DispatchPlan:
    """What to send after commit: single runs and fan-out messages."""

    unicast: list[Dispatch] = field(default_factory=list)
    fanouts: list[LinkFanout] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unicast or self.fanouts)

    def extend(self, other: DispatchPlan) -> None:
        self.unicast.extend(other.unicast)
        self.fanouts.extend(other.fanouts)


@dataclass(frozen=True)
class CancelOrder:
    """A cancel to send once its transaction has committed."""

    host: str
    link: str
    task_id: str
    run_id: str
    reason: str
    instance: str | None = None


class Dispatcher:
    def __init__(
        self,
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        links: Mapping[str, Link],
        *,
        secrets: SecretOpener | None = None,
        max_in_flight_sends: int = 500,
        router: InstanceRouter | None = None,
        instance: str = "",
    ) -> None:
        self._write = write
        self._links = links
        self._secrets = secrets
        # Commands for hosts whose stream another instance holds go through it.
        self._router = router
        self._instance = instance
        self._max_in_flight_sends = max_in_flight_sends
        self._send_slots = asyncio.Semaphore(max_in_flight_sends)

    @staticmethod
    def link_name(host: str, hosts: Mapping[str, HostRow]) -> str:
        """The link ``host`` is reached by (a host not yet in the store is an agent's)."""
        row = hosts.get(host)
        return row.link if row is not None else "grpc"

    def reachable(self, host: str, hosts: Mapping[str, HostRow]) -> bool:
        """Whether a run sent to ``host`` now has a live connection to travel: here, or on
        the instance that holds its stream."""
        link = self._links.get(self.link_name(host, hosts))
        if link is None:
            return False
        return link.is_connected(host) or self._held_elsewhere(host, hosts, link) is not None

    def _held_elsewhere(
        self, host: str, hosts: Mapping[str, HostRow], link: Link | None
    ) -> str | None:
        """The other instance holding ``host``'s stream, when commands are to go through it
        (not when this one holds a stream to it too: the agent has just moved here)."""
        row = hosts.get(host)
        if (
            self._router is None
            or row is None
            or row.instance is None
            or row.instance == self._instance
            or row.status != "online"
            or (link is not None and link.is_connected(host))
        ):
            return None
        return row.instance

    async def mark_deliverable(
        self,
        changes: Changes,
        task: TaskRow,
        runs: list[RunRow],
        hosts: Mapping[str, HostRow],
        *,
        whole: bool = False,
    ) -> DispatchPlan:
        """Within the caller's transaction: ``runs``, whose hosts are ``reachable``, become
        ``dispatched``. Returns what to send once the transaction commits. ``whole``: these
        are all the task's runs, none sent before, so a group or broadcast task may go out as
        one message per group (every bound queue gets it; it carries no per-host run map)."""
        now = utcnow()
        spec = ExecSpec.from_json(task.spec)
        deliver_by = task.deliver_by.timestamp() if task.deliver_by is not None else None
        try:
            env = {**spec.env, **self._open_secrets(spec)}
        except ConfigError as e:
            for run in runs:
                changes.move(run, RunStatus.UNDELIVERABLE, error=str(e))
            return DispatchPlan()
        by_link: dict[str, list[Dispatch]] = {}
        # Runs whose envelopes differ only by run id, for a link that signs them once.
        batches: dict[tuple[str, int], CommandBatch] = {}
        # A delayed run's "waiting for the host" note is history once it is sent.
        moved = await changes.move_all(runs, RunStatus.DISPATCHED, dispatched_at=now, error=None)
        for run in moved:
            link_name = self.link_name(run.host, hosts)
            link = self._links.get(link_name)
            batch = None
            if link is not None and link.signs_batches:
                batch = batches.setdefault((link_name, run.attempt), CommandBatch())
                batch.run_ids[run.host] = run.id
            envelope = CommandEnvelope(
                task_id=task.id,
                run_id=run.id,
                attempt=run.attempt,
                command=task.command,
                timeout=task.timeout,
                # Seed 002's ``user``: the account to run as; empty: the agent's own.
                user=task.run_as or "",
                submitted_by=task.created_by,
                deliver_by=deliver_by,
                env=env,
                argv=spec.argv,
                handler=spec.handler,
                args=spec.args,
                cwd=spec.cwd,
                upload=UploadSpec(spec.local_path, spec.remote_path, spec.owner, spec.group)
                if spec.local_path and spec.remote_path
                else None,
                batch=batch,
            )
            instance = self._held_elsewhere(run.host, hosts, link)
            by_link.setdefault(link_name, []).append(
                Dispatch(link_name, run.host, envelope, instance)
            )
        plan = DispatchPlan()
        for link_name, dispatches in by_link.items():
            # (A link that fans out reaches its hosts from any instance: none is routed.)
            if whole and self._links[link_name].supports_fanout:
                self._plan_fanout(plan, task, dispatches, hosts)
            else:
                plan.unicast.extend(dispatches)
        return plan

    def _open_secrets(self, spec: ExecSpec) -> dict[str, str]:
        if not spec.secret_env:
            return {}
        if self._secrets is None:
            raise ConfigError("the task has secret parameters but no secret key is configured")
        return self._secrets.open(spec.secret_env)

    @staticmethod
    def _plan_fanout(
        plan: DispatchPlan, task: TaskRow, dispatches: list[Dispatch], hosts: Mapping[str, HostRow]
    ) -> None:
        targets = task.targets or {}
        groups: list[str] = list(targets.get("groups") or [])
        # One message carries one attempt number: retries of a few hosts go one by one.
        mixed_attempts = len({d.envelope.attempt for d in dispatches}) > 1
        # Two groups go host by host: a host in both would receive two messages, and an agent
        # written from seed 002 alone has no replay guard to run it once.
        if (
            mixed_attempts
            or targets.get("hosts")
            or targets.get("labels")
            or not (targets.get("all") or len(groups) == 1)
        ):
            plan.unicast.extend(dispatches)
            return
        link = dispatches[0].link
        template = replace(dispatches[0].envelope, run_id="")
        remaining = {d.host: d.envelope.run_id for d in dispatches}
        if targets.get("all"):
            plan.fanouts.append(LinkFanout(link, Fanout(None, remaining, template)))
            return
        (group,) = groups
        members = {h: r for h, r in remaining.items() if group in (hosts[h].groups or [])}
        if members:
            plan.fanouts.append(LinkFanout(link, Fanout(group, members, template)))
        plan.unicast.extend(d for d in dispatches if d.host not in members)

    async def send(self, plan: DispatchPlan) -> None:
        """Send committed dispatches; a failed send makes its runs ``undeliverable``."""
        if not plan:
            return
        failed: dict[str, str] = {}

        async def unicast(item: Dispatch) -> None:
            failed.update(await self._send_one(item))

        async def fanout(item: LinkFanout) -> None:
            failed.update(await self._send_fanout(item))

        await asyncio.gather(
            self._each(plan.unicast, unicast), *(fanout(item) for item in plan.fanouts)
        )
        if not failed:
            return
        async with self._write() as changes:
            runs = await queries.runs_by_id(changes.session, failed)
            for run_id, run in runs.items():
                changes.move(run, RunStatus.UNDELIVERABLE, error=failed[run_id])

    @staticmethod
    async def cancel_orders(
        session: AsyncSession, runs: Sequence[RunRow], reason_of: Callable[[RunRow], str]
    ) -> list[CancelOrder]:
        """Within the caller's transaction: the cancels to send for ``runs`` once it commits."""
        routes = await queries.host_routes(session, {run.host for run in runs})
        return [
            CancelOrder(
                run.host,
                routes.get(run.host, ("grpc", None))[0],
                run.task_id,
                run.id,
                reason_of(run),
                routes.get(run.host, ("grpc", None))[1],
            )
            for run in runs
        ]

    async def send_cancels(self, orders: list[CancelOrder]) -> None:
        """Ask hosts to stop runs. An unreachable host is not an error here: the monitor ends
        its runs as lost after the grace period."""
        await self._each(orders, self._cancel_one)

    async def _each(self, items: Sequence[_T], send: Callable[[_T], Awaitable[None]]) -> None:
        """``send`` every item, at most ``max_in_flight_sends`` at once, by that many senders
        taking the next item as their last one is out. Not one task per item: a broadcast to ten
        thousand hosts held ten thousand tasks (and their coroutines, waiting on the semaphore)
        alive at once, and their creation and garbage collection grew with the fleet
        (docs/scale.md, Fan-out)."""
        pending = iter(items)

        async def sender() -> None:
            for item in pending:
                await send(item)

        senders = min(len(items), self._max_in_flight_sends)
        await asyncio.gather(*(sender() for _ in range(senders)))

    async def _cancel_one(self, order: CancelOrder) -> None:
        link = self._links.get(order.link)
        if link is None:
            return
        async with self._send_slots:
            try:
                if (
                    self._router is not None
                    and order.instance not in (None, self._instance)
                    and not link.is_connected(order.host)
                ):
                    assert order.instance is not None
                    data = link.encode_cancel(order.host, order.task_id, order.run_id, order.reason)
                    routed = RoutedMessage("cancel", order.link, order.host, order.run_id, data)
                    await self._router.forward(order.instance, routed)
                else:
                    await link.send_cancel(order.host, order.task_id, order.run_id, order.reason)
            except TransportError as e:
                log.info(
                    "cancel of run %s could not reach %s: %s",
                    order.run_id,
                    order.host,
                    e,
                    extra=about(order.task_id, order.run_id, order.host),
                )

    async def _send_one(self, item: Dispatch) -> dict[str, str]:
        run_id = item.envelope.run_id
        async with self._send_slots:
            try:
                link = self._links[item.link]
                if item.instance is not None and self._router is not None:
                    data = link.encode_command(item.host, item.envelope)
                    routed = RoutedMessage("command", item.link, item.host, run_id, data)
                    await self._router.forward(item.instance, routed)
                else:
                    await link.send_command(item.host, item.envelope)
            except TransportError as e:
                log.info(
                    "could not deliver run %s to %s: %s",
                    run_id,
                    item.host,
                    e,
                    extra=about(item.envelope.task_id, run_id, item.host),
                )
                return {run_id: f"delivery failed: {e}"}
        return {}

    async def _send_fanout(self, item: LinkFanout) -> dict[str, str]:
        async with self._send_slots:
            try:
                await self._links[item.link].send_fanout(item.fanout)
            except TransportError as e:
                target = f"group {item.fanout.group}" if item.fanout.group else "all hosts"
                task_id = item.fanout.envelope.task_id
                log.info(
                    "could not deliver task %s to %s: %s", task_id, target, e, extra=about(task_id)
                )
                return {run_id: f"delivery failed: {e}" for run_id in item.fanout.run_ids.values()}
        return {}

    async def deliver_routed(self, message: RoutedMessage) -> None:
        """Write a message another instance routed here to the host's stream; a command that
        cannot be written is ``undeliverable``, as if this instance had sent it."""
        link = self._links.get(message.link)
        try:
            if link is None:
                raise NotConnected(f"no {message.link} link here")
            async with self._send_slots:
                await link.send_encoded(message.host, message.data)
        except TransportError as e:
            log.info("could not deliver routed %s to %s: %s", message.kind, message.host, e)
            if message.kind != "command":
                return
            async with self._write() as changes:
                runs = await queries.runs_by_id(changes.session, [message.run_id])
                for run in runs.values():
                    changes.move(run, RunStatus.UNDELIVERABLE, error=f"delivery failed: {e}")
