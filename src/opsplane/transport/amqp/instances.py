"""What control-plane instances sharing one database say to each other over RabbitMQ
(docs/instances.md). The engine decides; this module only carries.

- ``opsplane.instances`` (topic): one exclusive, auto-delete queue per instance, bound by its
  instance name. A message for a host whose stream another instance holds goes there: the
  body is the message in the link's wire form (a command signed by the sender), the headers
  say ``kind`` (command, cancel), ``link``, ``host``, ``run_id`` and ``from``. Published
  ``mandatory``: when the instance is gone (its queue with it) the publish fails at once.
- ``opsplane.events`` (fanout): every instance's notices, each instance's own queue bound to
  it. A notice is JSON: ``{"from": instance, "events": [{id, task_id, kind, data,
  durable}...], "hosts": [names], "agents": [names]}`` (each key but ``from`` optional): task
  events committed, hosts changed, agents enrolled or revoked. An instance skips its own.

Neither exchange is durable nor are the queues: they carry nothing that outlives an instance
(events are in the database, a command whose instance died is undeliverable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from opsplane.domain.addresses import mask_url
from opsplane.domain.errors import ConfigError, NotConnected
from opsplane.transport.amqp.publish import PUBLISH_TIMEOUT, publish_mandatory
from opsplane.transport.base import RoutedMessage

log = logging.getLogger(__name__)

INSTANCES_EXCHANGE = "opsplane.instances"
EVENTS_EXCHANGE = "opsplane.events"
_KINDS = ("command", "cancel")

OnRouted = Callable[[RoutedMessage], Awaitable[None]]
OnNotice = Callable[[dict[str, Any]], Awaitable[None]]


def queue_name(instance: str) -> str:
    return f"opsplane.instance.{instance}"


class InstanceRouter:
    """This instance's end of the instances' exchanges: one RabbitMQ connection."""

    def __init__(self, url: str, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._url = url
        self._ssl_context = ssl_context
        self.instance = ""
        self._connection: AbstractRobustConnection | None = None
        self._routes: AbstractExchange | None = None
        self._events: AbstractExchange | None = None
        # Notices wait here for the publisher, in order: publishing is off the write path.
        self._notices: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._on_routed: OnRouted | None = None
        self._on_notice: OnNotice | None = None
        # Handlers under way, in tasks of our own: closing the connection must not cancel one
        # in the middle of a database write; ``stop`` waits for them.
        self._handling: set[asyncio.Task[None]] = set()
        self._consume: AbstractChannel | None = None

    async def start(self, instance: str, on_routed: OnRouted, on_notice: OnNotice) -> None:
        self.instance = instance
        self._on_routed = on_routed
        self._on_notice = on_notice
        try:
            self._connection = await aio_pika.connect_robust(
                self._url,
                timeout=10,
                ssl_context=self._ssl_context,
                client_properties={
                    "connection_name": f"opsplane-instance {socket.gethostname()} {instance}"
                },
            )
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as e:
            raise ConfigError(f"cannot reach RabbitMQ at {mask_url(self._url)}: {e}") from e
        publish = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._routes = await publish.declare_exchange(
            INSTANCES_EXCHANGE, aio_pika.ExchangeType.TOPIC
        )
        self._events = await publish.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT)
        consume = self._consume = await self._connection.channel()
        await consume.set_qos(prefetch_count=500)
        routes = await consume.declare_exchange(INSTANCES_EXCHANGE, aio_pika.ExchangeType.TOPIC)
        events = await consume.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT)
        mine = await consume.declare_queue(queue_name(instance), exclusive=True, auto_delete=True)
        await mine.bind(routes, instance)
        await mine.consume(self._routed)
        notices = await consume.declare_queue(
            f"opsplane.events.{instance}", exclusive=True, auto_delete=True
        )
        await notices.bind(events)
        await notices.consume(self._notice, no_ack=True)
        self._publisher = asyncio.create_task(self._publish_notices())
        log.info("instance %s routes through RabbitMQ at %s", instance, mask_url(self._url))

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
            self._publisher = None
        if self._consume is not None:
            with contextlib.suppress(Exception):
                await self._consume.close()
            self._consume = None
        if self._handling:
            await asyncio.wait(self._handling, timeout=10.0)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        self._routes = self._events = None

    async def forward(self, instance: str, message: RoutedMessage) -> None:
        """Hand ``message`` to ``instance``; NotConnected when that instance is gone,
        ConnectionLost when RabbitMQ did not take it."""
        if self._routes is None:
            raise NotConnected("the instance router is not started")
        amqp = aio_pika.Message(
            message.data,
            type=message.kind,
            headers={
                "link": message.link,
                "host": message.host,
                "run_id": message.run_id,
                "from": self.instance,
            },
        )
        await publish_mandatory(
            self._routes, amqp, instance, unroutable=f"instance {instance} is gone (its queue is)"
        )

    def notify(self, notice: dict[str, Any]) -> None:
        """Tell every other instance (task events, hosts or agents changed); returns at once."""
        self._notices.append(notice)
        self._wake.set()

    async def alive(self, instances: Iterable[str]) -> set[str]:
        """Those of ``instances`` that are running: their queue exists (it lives as long as
        their connection to RabbitMQ)."""
        assert self._connection is not None
        found: set[str] = set()
        for instance in instances:
            channel: AbstractChannel = await self._connection.channel()
            try:
                await channel.declare_queue(queue_name(instance), passive=True)
                found.add(instance)
            except aiormq.exceptions.ChannelLockedResource:
                found.add(instance)  # exclusive to its own connection: alive
            except aiormq.exceptions.ChannelNotFoundEntity:
                pass
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        return found

    async def _publish_notices(self) -> None:
        while True:
            if not self._notices:
                self._wake.clear()
                await self._wake.wait()
            notice = self._notices.popleft()
            body = json.dumps({"from": self.instance, **notice}, default=str).encode()
            try:
                assert self._events is not None
                await self._events.publish(
                    aio_pika.Message(body, content_type="application/json"),
                    routing_key="",
                    timeout=PUBLISH_TIMEOUT,
                )
            except Exception as e:
                # Live streams only: the events are in the database, a client resumes there.
                log.warning("could not publish a notice to the other instances: %r", e)

    async def _routed(self, message: AbstractIncomingMessage) -> None:
        assert self._on_routed is not None
        headers = message.headers or {}
        kind = message.type
        fields = [headers.get(k) for k in ("link", "host", "run_id")]
        if kind not in _KINDS or not all(isinstance(f, str) for f in fields):
            log.warning("dropped a routed message that is not one (type %r)", kind)
            await message.reject()
            return
        link, host, run_id = (str(f) for f in fields)
        routed = RoutedMessage("command" if kind == "command" else "cancel", link, host, run_id,
                               message.body)  # fmt: skip
        try:
            await self._handle(self._on_routed(routed))
        except Exception:
            log.exception("routed %s for %s failed", kind, host)
        # Acked once written to the stream or ended undeliverable: either way, handled.
        with contextlib.suppress(Exception):
            await message.ack()

    async def _notice(self, message: AbstractIncomingMessage) -> None:
        assert self._on_notice is not None
        try:
            notice = json.loads(message.body)
        except ValueError:
            log.warning("dropped a notice that is not JSON")
            return
        if not isinstance(notice, dict) or notice.get("from") == self.instance:
            return
        try:
            await self._handle(self._on_notice(notice))
        except Exception:
            log.exception("a notice from instance %s failed", notice.get("from"))

    async def _handle(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run())
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)
        await asyncio.shield(task)
