"""Simulated agents of the RabbitMQ link (DESIGN §3.2, docs/amqp.md), many per connection.

A real agent (agent/amqp_link.py) holds one connection of its own; 10,000 of them would be
10,000 connections from a handful of processes, which bounds the swarm (and the broker's
connection processes) long before the control plane. Here one :class:`AmqpHub` (a connection,
a publisher-confirm channel, and a consume channel per :data:`AGENTS_PER_CHANNEL` agents) is
shared by many :class:`AmqpAgent`; everything an agent says on the wire is the real agent's:

- its own exclusive, auto-delete queue ``cmd.node.{name}`` bound to its node key, each of its
  groups and ``cmd.all``; prefetch as the agent's;
- a signed hello heartbeat (``hello: true``, its public key, groups, empty run-id lists), then
  a signed heartbeat every ``heartbeat_interval`` with fixed host figures;
- for every command: the control plane's signature checked (with its public key, when the
  swarm has it), the signed ``target`` checked, the run id derived for a fan-out
  (domain/ids.py ``run_id_for``), a run id seen before refused as a replay (counted in
  ``duplicates``), the delivery acked, then signed ``started`` and ``result`` messages
  (``result`` mandatory and confirmed, as the agent's).

One shortcut, stated: a fan-out body is the same bytes for every agent of a worker, so its
signature is verified once per worker process (:class:`_Verifier`); 10,000 real agents verify
on 10,000 machines, not on the two cores the swarm shares with the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aio_pika
import pamqp.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError, PublishError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bench.swarm.simulator import WELCOME_TIMEOUT, AgentSimulator, Mode, SwarmStats
from opsplane.agent.amqp_link import PREFETCH
from opsplane.agent.grpc_link import Backoff
from opsplane.domain.ids import run_id_for
from opsplane.security.signing import sign, verify
from opsplane.transport.amqp import messages as m

# Consumers per channel: a channel's RPCs (declare, bind, consume) are serialized, so a few
# hundred agents per channel set up in a second; fewer would cost the broker a process each.
AGENTS_PER_CHANNEL: Final = 100
# The host figures every simulated heartbeat reports (percentages, as an opsplane agent's).
_FIGURES: Final = {"cpu_usage": 1.0, "memory_usage": 10.0, "load": 0.1, "disk_usage": 20.0}
_ERRORS: Final = (
    AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
    pamqp.exceptions.PAMQPException,
)


@dataclass
class AmqpStats(SwarmStats):
    """:class:`SwarmStats` and what only the RabbitMQ link can show."""

    duplicates: int = 0  # a command for a run id this agent had already received
    refused: int = 0  # a command failing the agent's checks (signature, target, shape)
    unconfirmed: int = 0  # a result the broker did not confirm, five times
    cancels: int = 0  # cancels received (runs the control plane gave up on)

    def as_dict(self) -> dict[str, Any]:
        return {
            **super().as_dict(),
            "duplicates": self.duplicates,
            "refused": self.refused,
            "unconfirmed": self.unconfirmed,
            "cancels": self.cancels,
        }


def _setter(event: asyncio.Event) -> Callable[..., None]:
    """A close callback that sets ``event`` (whatever the callback is called with)."""

    def callback(*_: object) -> None:
        event.set()

    return callback


class _Verifier:
    """The control plane's signature on command bodies, checked once per distinct body."""

    def __init__(self, key: Ed25519PublicKey | None) -> None:
        self._key = key
        self._seen: OrderedDict[bytes, bool] = OrderedDict()

    def valid(self, body: bytes, data: Mapping[str, Any]) -> bool:
        if self._key is None:
            return True
        known = self._seen.get(body)
        if known is None:
            known = self._seen[body] = verify(self._key, data, "sign")
            if len(self._seen) > 1024:
                self._seen.popitem(last=False)
        return known


@dataclass(eq=False)
class _Slot:
    channel: AbstractChannel
    closed: asyncio.Event


@dataclass(eq=False)
class _HubSession:
    """One live connection of a hub and what was opened on it."""

    connection: AbstractConnection
    results: AbstractExchange
    monitor: AbstractExchange
    lost: asyncio.Event
    slots: dict[int, _Slot] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def slot(self, index: int) -> _Slot:
        """The consume channel ``index`` (opened on first use, again after it closed)."""
        async with self.lock:
            slot = self.slots.get(index)
            if slot is not None and not slot.closed.is_set():
                return slot
            channel = await self.connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=PREFETCH)
            slot = self.slots[index] = _Slot(channel, asyncio.Event())
            channel.close_callbacks.add(_setter(slot.closed))
            return slot


class AmqpHub:
    """A RabbitMQ connection shared by many simulated agents, redialed when it is lost."""

    def __init__(self, url: str, name: str, stats: AmqpStats) -> None:
        self.url = url
        self.name = name
        self.stats = stats
        self._session: _HubSession | None = None
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def session(self) -> _HubSession:
        """The live session, once there is one (the hub starts with its first agent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"amqp-hub {self.name}")
        while True:
            await self._up.wait()
            session = self._session
            if session is not None and not session.lost.is_set():
                return session
            await asyncio.sleep(0.1)

    async def _run(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while True:
            connection: AbstractConnection | None = None
            try:
                async with asyncio.timeout(WELCOME_TIMEOUT):
                    connection = await aio_pika.connect(
                        self.url, client_properties={"connection_name": f"swarm {self.name}"}
                    )
                    publish = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    exchanges = {
                        name: await publish.declare_exchange(
                            name, aio_pika.ExchangeType.TOPIC, durable=True
                        )
                        for name in (m.CMD_EXCHANGE, m.RESULT_EXCHANGE, m.MONITOR_EXCHANGE)
                    }
                lost = asyncio.Event()
                connection.close_callbacks.add(_setter(lost))
                publish.close_callbacks.add(_setter(lost))
                self._session = _HubSession(
                    connection, exchanges[m.RESULT_EXCHANGE], exchanges[m.MONITOR_EXCHANGE], lost
                )
                self._up.set()
                backoff.reset()
                await lost.wait()
                self.stats.errors["connection lost"] += 1
            except (*_ERRORS, TimeoutError) as e:
                self.stats.errors[f"connect {type(e).__name__}"] += 1
            finally:
                self._up.clear()
                self._session = None
                if connection is not None:
                    with contextlib.suppress(*_ERRORS, TimeoutError, RuntimeError):
                        await asyncio.wait_for(connection.close(), 5)
            await asyncio.sleep(backoff.next_delay())


class AmqpAgent(AgentSimulator):
    """An agent of the RabbitMQ link on a shared :class:`AmqpHub` (consume channel ``slot``)."""

    def __init__(
        self,
        name: str,
        groups: tuple[str, ...],
        stats: AmqpStats,
        mode: Mode,
        *,
        hub: AmqpHub,
        slot: int,
        verifier: _Verifier,
        heartbeat_interval: float,
    ) -> None:
        super().__init__(name, groups, stats, mode)
        self.amqp_stats = stats
        self.hub = hub
        self.slot = slot
        self.verifier = verifier
        self.heartbeat_interval = heartbeat_interval
        self._queue = m.node_key(name)
        self._result_key = f"{m.RESULT_KEY_PREFIX}{name}"
        self._allowed = {m.ALL_TARGET, *(m.group_target(g) for g in groups)}
        self._seen: set[str] = set()
        self._commands: set[asyncio.Task[None]] = set()
        self._backoff = Backoff(0.5, 30.0)

    async def run(self) -> None:
        while True:
            session = await self.hub.session()
            welcomed = False
            try:
                welcomed = await self._serve_once(session)
            except (*_ERRORS, TimeoutError, RuntimeError) as e:
                # The message without the channel's address: one key per kind of failure.
                text = re.sub(r" at 0x[0-9a-f]+", "", str(e))[:60]
                self.stats.errors[f"agent {type(e).__name__}: {text}"] += 1
            if welcomed:
                self._backoff.reset()
            await asyncio.sleep(self._backoff.next_delay())

    async def _serve_once(self, session: _HubSession) -> bool:
        """Queue, bindings, consumer and hello on ``session``; then beat until it is lost."""
        self.stats.dials += 1
        # No timeout around the setup: aiormq closes a channel whose RPC is cancelled, and the
        # channel is a hundred agents' (a real agent's timeout cuts only its own connection).
        # A setup slower than a real agent would wait is counted as its give-up instead.
        began = time.monotonic()
        slot = await session.slot(self.slot)
        queue = await slot.channel.declare_queue(self._queue, exclusive=True, auto_delete=True)
        keys = [self._queue, *(m.group_key(g) for g in self.groups), m.BROADCAST_KEY]
        for key in dict.fromkeys(keys):
            await queue.bind(m.CMD_EXCHANGE, key)
        tag = await queue.consume(self._on_delivery, no_ack=False)
        try:
            hello = self._heartbeat(True)
            if not await self._publish(session.monitor, m.HEARTBEAT_KEY, hello):
                return False
            if time.monotonic() - began > WELCOME_TIMEOUT:
                self.stats.give_ups += 1
            self.stats.welcomes += 1
            self.stats.connected += 1
            try:
                while not (session.lost.is_set() or slot.closed.is_set()):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(session.lost.wait(), self.heartbeat_interval)
                        break
                    beat = self._heartbeat(False)
                    if await self._publish(session.monitor, m.HEARTBEAT_KEY, beat):
                        self.stats.heartbeats += 1
            finally:
                self.stats.connected -= 1
        finally:
            task = asyncio.current_task()
            stopping = task is not None and task.cancelling() > 0
            if not (stopping or session.lost.is_set() or slot.closed.is_set()):
                # The slot's channel outlives this agent's turn on it: stop its consumer and
                # drop its queue, so that the next turn starts as a reconnecting agent's.
                with contextlib.suppress(*_ERRORS, TimeoutError, RuntimeError):
                    await asyncio.wait_for(queue.cancel(tag), 5)
                    await asyncio.wait_for(queue.delete(if_unused=False, if_empty=False), 5)
        return True

    def _heartbeat(self, hello: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "hostname": self.name,
            "status": "online",
            "timestamp": time.time(),
            **_FIGURES,
            "groups": list(self.groups),
            "labels": {},
            "version": "swarm",
            "os": "swarm",
            "public_key": self.public_key,
        }
        if hello:
            body |= {
                "hello": True,
                "running_run_ids": [],
                "finished_run_ids": [],
                "abandoned_run_ids": [],
            }
        return body

    async def _publish(
        self, exchange: AbstractExchange, key: str, body: dict[str, Any], *, mandatory: bool = False
    ) -> bool:
        """Sign and publish ``body`` as the agent does; whether the broker confirmed it."""
        body["signature"] = sign(self.key, body)
        message = aio_pika.Message(
            json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await exchange.publish(message, key, mandatory=mandatory)
        except (PublishError, DeliveryError, *_ERRORS) as e:
            self.stats.errors[f"publish {type(e).__name__}"] += 1
            return False
        return True

    async def _on_delivery(self, delivery: AbstractIncomingMessage) -> None:
        command = self._check(delivery.body)
        with contextlib.suppress(*_ERRORS):
            await delivery.ack()
        if command is not None:
            self.stats.commands += 1
            task = asyncio.create_task(self._command(command))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)

    def _check(self, body: bytes) -> dict[str, Any] | None:
        """The command with its run id, or None if the agent would refuse it."""
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        cancel = isinstance(data, dict) and data.get("type") == "cancel"
        if cancel and data.get("target") == self.name:
            # For a run the control plane gave up on (undeliverable, timed out): nothing of it
            # runs here any more (a reply-mode run has ended already).
            self.amqp_stats.cancels += 1
            return None
        if not isinstance(data, dict) or data.get("type", "command") != "command":
            self.amqp_stats.refused += 1
            return None
        run_id = data.get("run_id")
        allowed = {self.name} if run_id is not None else self._allowed
        if data.get("target") not in allowed or not self.verifier.valid(body, data):
            self.amqp_stats.refused += 1
            return None
        if run_id is None:
            run_id = run_id_for(str(data.get("task_id")), self.name, int(data.get("attempt", 1)))
        if run_id in self._seen:
            self.amqp_stats.duplicates += 1
            return None
        self._seen.add(run_id)
        data["run_id"] = run_id
        return data

    async def _command(self, cmd: dict[str, Any]) -> None:
        session = await self.hub.session()
        started = time.time()
        ids = {
            "task_id": cmd.get("task_id"),
            "run_id": cmd["run_id"],
            "attempt": cmd.get("attempt", 1),
        }
        await self._publish(
            session.results,
            self._result_key,
            {"type": "started", **ids, "hostname": self.name, "started_at": started, "pid": 1,
             "timestamp": started},
        )  # fmt: skip
        code, out, err, status = await self.outcome(
            str(cmd.get("command")), float(cmd.get("timeout") or 0)
        )
        finished = time.time()
        result = {
            "type": "result",
            **ids,
            "hostname": self.name,
            "status": status,
            "exit_code": code,
            "stdout": out,
            "stderr": err,
            "truncated": False,
            "error": "",
            "started_at": started,
            "finished_at": finished,
            "duration_ms": int((finished - started) * 1000),
            "timestamp": finished,
        }
        # A real agent keeps an unconfirmed result in its spool and re-sends it; the swarm
        # retries it a few times on the hub's current connection.
        for _ in range(5):
            session = await self.hub.session()
            if await self._publish(session.results, self._result_key, result, mandatory=True):
                self.stats.results += 1
                return
            await asyncio.sleep(1)
        self.amqp_stats.unconfirmed += 1


def make_agents(
    *,
    url: str,
    prefix: str,
    first: int,
    count: int,
    groups: tuple[str, ...],
    mode: Mode,
    stats: AmqpStats,
    connections: int,
    control_plane_key: Ed25519PublicKey | None,
    heartbeat_interval: float,
) -> list[AgentSimulator]:
    """``count`` agents spread round-robin over ``connections`` hubs of this process."""
    hubs = [AmqpHub(url, f"{prefix}-{first}-{i}", stats) for i in range(max(1, connections))]
    verifier = _Verifier(control_plane_key)
    agents: list[AgentSimulator] = []
    for n in range(count):
        hub_index, position = n % len(hubs), n // len(hubs)
        agents.append(
            AmqpAgent(
                f"{prefix}-{first + n:05d}",
                groups,
                stats,
                mode,
                hub=hubs[hub_index],
                slot=position // AGENTS_PER_CHANNEL,
                verifier=verifier,
                heartbeat_interval=heartbeat_interval,
            )
        )
    return agents
