"""The agent's end of the RabbitMQ link (DESIGN §3.2, §3.3; the wire protocol is docs/amqp.md).

After each (re)connection the agent declares the three topic exchanges, its own exclusive,
auto-delete queue ``cmd.node.{name}`` (bound to its node key, each of its groups and
``cmd.all``), sends a hello heartbeat, re-sends the results the broker has not confirmed yet
and then beats every ``heartbeat_interval``. It declares nothing durable of the control
plane's: ``cmd.result`` and ``monitor.heartbeat`` are the control plane's to create.

Every command is checked before the daemon sees it (``amqp_messages.py``, which also turns
the daemon's messages into JSON): the control plane's signature (pinned key), the replay
window, the target, and the run id not seen before. A refused command is counted by
reason, logged, acked and dropped — never requeued, so that a bad message cannot loop.
A good one is handed to the daemon as a ``pb.CommandMessage`` and acked once the daemon has
recorded it in its spool. Going up, the daemon's ``pb`` messages become signed JSON; a
result the broker confirms counts as acknowledged (the synthetic ``pb.Ack`` the daemon gets).

Reconnecting is our own loop with the same fully jittered backoff as the gRPC link, rather
than aio-pika's robust connection: everything above has to be redone after a reconnect
anyway, and one loop that does it all is easier to get right than restore hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import unquote, urlsplit

import aio_pika
import pamqp.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from aiormq.exceptions import ChannelLockedResource
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.agent import metrics
from opsplane.agent.amqp_messages import REFUSAL_REASONS, AmqpMessages, Refused
from opsplane.agent.config import AgentConfig, mask_url
from opsplane.agent.link import Backoff, LinkHandler
from opsplane.security.signing import load_public_key, public_key_text, sign
from opsplane.security.tls import amqp_ssl_context
from opsplane.transport.grpc import opsplane_pb2 as pb

logger = logging.getLogger(__name__)

CMD_EXCHANGE: Final = "sys_cmd_exchange"
RESULT_EXCHANGE: Final = "sys_result_exchange"
MONITOR_EXCHANGE: Final = "sys_monitor_exchange"
HEARTBEAT_KEY: Final = "heartbeat"
BROADCAST_KEY: Final = "cmd.all"

# Unacked commands the broker may push at once: enough to keep a busy agent fed, few enough
# that a flood waits in the queue (where the control plane can see it) rather than in us.
PREFETCH: Final = 100
# Connecting, declaring and the hello's confirm together; a broker that takes longer is
# treated like one that is down.
SETUP_TIMEOUT: Final = 15.0
# Live output is best effort: a publish not confirmed within this long is given up (the
# result keeps head and tail) instead of stalling the command on its pipe.
OUTPUT_SEND_TIMEOUT: Final = 5.0
CLOSE_TIMEOUT: Final = 5.0

# What an ordinary broker or network failure raises (aio-pika's own list, minus the
# RuntimeError catch-all, which would hide our bugs).
_CONNECTION_ERRORS: Final = (
    AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
    pamqp.exceptions.PAMQPException,
)


# What aiormq logs on its own about an ordinary connection failure, each time with a level
# (up to ERROR) and often a traceback; the link reports the same failure as one WARNING line.
_LIBRARY_NOISE: Final = (
    "Unexpected connection close from remote",
    "Cancelling cause reader exited abnormally",
    "error when creating transport",
)


class _DemoteConnectionNoise(logging.Filter):
    """Turns aiormq's own reports of ordinary connection failures into DEBUG records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_LIBRARY_NOISE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _quiet_library_noise() -> None:
    for name in ("aiormq.connection", "aiormq.channel"):
        library = logging.getLogger(name)
        if not any(isinstance(f, _DemoteConnectionNoise) for f in library.filters):
            library.addFilter(_DemoteConnectionNoise())


class AmqpLinkHandler(LinkHandler, Protocol):
    """What the RabbitMQ link asks of the daemon, beyond what the gRPC link does."""

    def already_seen(self, run_id: str) -> bool:
        """Whether ``run_id`` was accepted before (InvalidInput if it is not a run id)."""


class _ConnectionLost(Exception):
    """The broker connection (or our channel on it) closed."""


@dataclass(eq=False)
class _Session:
    """One live connection and what was declared on it."""

    connection: AbstractConnection
    channel: AbstractChannel
    results: AbstractExchange
    monitor: AbstractExchange
    # Deliveries in order; None means the connection or channel closed.
    inbox: asyncio.Queue[AbstractIncomingMessage | None]
    lost_reason: str = ""
    # A result was returned unroutable or refused: re-send the spooled ones with a heartbeat.
    resend_due: bool = False
    unroutable_reported: bool = False


class AmqpLink:
    """One agent's RabbitMQ connection, re-established forever until cancelled."""

    def __init__(
        self,
        config: AgentConfig,
        handler: AmqpLinkHandler,
        *,
        signing_key: Ed25519PrivateKey,
        host_metrics: Callable[[], dict[str, float]] = metrics.snapshot,
    ) -> None:
        if config.amqp_url is None or not config.control_plane_key:
            raise ValueError("the RabbitMQ link needs amqp_url and control_plane_key")
        self._config = config
        self._url = config.amqp_url
        self._endpoint = mask_url(config.amqp_url)
        self._ssl_context = amqp_ssl_context(
            config.amqp_url, config.amqp_tls_ca, config.amqp_tls_cert, config.amqp_tls_key
        )
        self._handler = handler
        self._key = signing_key
        self._messages = AmqpMessages(
            config,
            control_plane_key=load_public_key(config.control_plane_key),
            public_key=public_key_text(signing_key.public_key()),
            # Looked up when a command comes: a handler that never receives one need not have it.
            already_seen=lambda run_id: self._handler.already_seen(run_id),
            host_metrics=host_metrics,
        )
        self._backoff = Backoff(config.reconnect_initial, config.reconnect_max)
        self._refusals: Counter[str] = Counter(dict.fromkeys(REFUSAL_REASONS, 0))
        self._session: _Session | None = None
        self._stalled: asyncio.Future[bool] | None = None
        self._queue_name = f"cmd.node.{config.name}"
        self._result_key = f"result.node.{config.name}"
        self._last_attempt_connected = False
        _quiet_library_noise()

    @property
    def connected(self) -> bool:
        """Whether a connection is up and the hello went out on it."""
        return self._session is not None

    @property
    def confirms_delivery(self) -> bool:
        """True: a message is sent once the broker confirms it (it is then durable there)."""
        return True

    @property
    def refusals(self) -> Counter[str]:
        """Commands refused so far, by reason (a copy)."""
        return Counter(self._refusals)

    # -- up: daemon → broker ---------------------------------------------------------------

    async def send(self, message: pb.CommandMessage, *, droppable: bool = False) -> bool:
        """Publish ``message`` as docs/amqp.md JSON; False if the broker did not confirm it.

        A ``command_result`` the broker confirms is acknowledged to the daemon. A
        ``droppable`` message (live output) is given up after :data:`OUTPUT_SEND_TIMEOUT`, and
        while such a publish is still stuck further droppable messages are dropped at once.
        """
        kind = message.WhichOneof("message")
        if kind == "ack":
            # The daemon acks a command it recorded; on RabbitMQ that is the basic.ack the
            # link sends once on_message has returned.
            return True
        body, run_id = self._messages.up(message, kind)
        session = self._session
        if body is None or session is None:
            return False
        if droppable and self._stalled is not None and not self._stalled.done():
            return False
        mandatory = kind == "command_result"
        # The publish runs in its own task: a caller cancelled mid-publish must not cut a
        # frame in half, and a confirmed result must still be acknowledged to the daemon.
        publish = asyncio.ensure_future(
            self._publish(
                session,
                session.results,
                self._result_key,
                body,
                mandatory=mandatory,
                acknowledge=run_id if mandatory else None,
            )
        )
        publish.add_done_callback(_retrieve)
        done, _ = await asyncio.wait({publish}, timeout=OUTPUT_SEND_TIMEOUT if droppable else None)
        if not done:
            self._stalled = publish
            return False
        return not publish.cancelled() and publish.result()

    async def _publish(
        self,
        session: _Session,
        exchange: AbstractExchange,
        routing_key: str,
        body: dict[str, Any],
        *,
        mandatory: bool,
        acknowledge: str | None = None,
    ) -> bool:
        """Sign and publish ``body``; True once the broker confirmed it."""
        body["signature"] = sign(self._key, body)
        message = aio_pika.Message(
            json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await exchange.publish(message, routing_key, mandatory=mandatory)
        except PublishError:
            # Returned unroutable: no cmd.result queue is bound (yet). The result stays in
            # the spool and is re-sent with the next heartbeat, by when the control plane
            # may have declared its queue; said once per connection, not once per retry.
            session.resend_due = True
            logger.log(
                logging.DEBUG if session.unroutable_reported else logging.WARNING,
                "%s for run %s is unroutable on %s (no queue bound to %s); kept, retrying",
                body.get("type"),
                body.get("run_id"),
                exchange.name,
                routing_key,
            )
            session.unroutable_reported = True
            return False
        except DeliveryError as exc:
            session.resend_due = acknowledge is not None
            logger.warning("the broker refused a %s message: %s", body.get("type"), exc)
            return False
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
            return False  # a future of the closed connection was cancelled under us
        except _CONNECTION_ERRORS as exc:
            logger.debug("publish to %s failed: %s", exchange.name, exc)
            return False
        if acknowledge is not None:
            # Persistent and confirmed: the broker has it, which is all the spool waits for
            # (even if the connection it went on has closed since).
            ack = pb.Ack(run_id=acknowledge, kind="result")
            await self._handler.on_message(pb.CommandMessage(ack=ack))
        return True

    async def _beat(self, session: _Session, hello: pb.Hello | None = None) -> bool:
        # Bounded: a broker that blocks publishers must not pile heartbeats up behind it.
        publish = asyncio.ensure_future(
            self._publish(
                session,
                session.monitor,
                HEARTBEAT_KEY,
                self._messages.heartbeat(hello),
                mandatory=False,
            )
        )
        publish.add_done_callback(_retrieve)
        done, _ = await asyncio.wait({publish}, timeout=self._config.heartbeat_interval)
        return bool(done) and not publish.cancelled() and publish.result()

    async def _heartbeats(self, session: _Session) -> None:
        # The hello was the first beat.
        while True:
            await asyncio.sleep(self._config.heartbeat_interval)
            await self._beat(session)
            if session.resend_due:
                # A result the broker did not take: without this it would wait for the next
                # reconnect, which on a healthy connection may be days away.
                session.resend_due = False
                await self._on_connected()

    # -- down: broker → daemon -------------------------------------------------------------

    async def _deliver(self, delivery: AbstractIncomingMessage) -> None:
        """Check one command, hand it to the daemon, then ack it (whatever became of it)."""
        try:
            message = self._check(delivery.body)
            if message is not None:
                await self._handler.on_message(message)
        except asyncio.CancelledError:
            raise  # not acked: it goes with the connection and the exclusive queue
        except Exception:
            # Acked all the same: a message that trips a bug must not come back forever.
            logger.exception("handling a command from the broker failed")
        await delivery.ack()

    def _check(self, body: bytes) -> pb.CommandMessage | None:
        try:
            return self._messages.down(body)
        except Refused as refusal:
            self._refusals[refusal.reason] += 1
            logger.warning("refused a command (%s): %s", refusal.reason, refusal)
            # The text of a refused command may be anything; only for whoever debugs.
            logger.debug("the refused message: %r", body[:4096])
            return None

    # -- connection ------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, and reconnect after failures; returns only by cancellation."""
        while True:
            try:
                await self._serve_once()
                reason = "the connection ended"
            except _ConnectionLost as exc:
                reason = str(exc)
            except TimeoutError:
                reason = f"no answer within {SETUP_TIMEOUT:g}s"
            except ChannelLockedResource:
                reason = (
                    f"queue {self._queue_name} is held by another connection (another agent "
                    "with this name, or the broker has not removed our previous one yet)"
                )
            except _CONNECTION_ERRORS as exc:
                reason = self._scrub(str(exc) or type(exc).__name__)
            except asyncio.CancelledError:
                if _really_cancelled():
                    raise
                reason = "an operation on the connection was cancelled"
            except Exception as exc:
                # A bug must not end the daemon; the spool makes sure nothing is lost or run
                # twice across the reconnect.
                logger.exception("link to %s failed unexpectedly", self._endpoint)
                reason = f"unexpected {type(exc).__name__}"
            if self._last_attempt_connected:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            logger.warning(
                "%s %s: %s; reconnecting in %.2fs",
                "lost the broker at" if self._last_attempt_connected else "cannot reach",
                self._endpoint,
                reason,
                delay,
            )
            await asyncio.sleep(delay)

    async def _serve_once(self) -> None:
        """One connection, from connect to its loss."""
        self._last_attempt_connected = False
        connection: AbstractConnection | None = None
        session: _Session | None = None
        try:
            async with asyncio.timeout(SETUP_TIMEOUT):
                connection = await aio_pika.connect(
                    self._url,
                    ssl_context=self._ssl_context,
                    client_properties={"connection_name": f"opsplane-agent {self._config.name}"},
                )
                session = await self._set_up(connection)
                hello = self._handler.hello()
                if not await self._beat(session, hello):
                    raise _ConnectionLost(session.lost_reason or "the hello was not confirmed")
            self._stalled = None
            self._session = session
            self._last_attempt_connected = True
            logger.info("connected to %s as %s", self._endpoint, self._config.name)
            await self._serve(session)
        finally:
            self._session = None
            if connection is not None:
                with contextlib.suppress(*_CONNECTION_ERRORS, TimeoutError, RuntimeError):
                    await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)

    async def _set_up(self, connection: AbstractConnection) -> _Session:
        """Open the channel, declare the topology and start consuming (DESIGN §3.2)."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=PREFETCH)
        # Declared (not just looked up) so that an agent may start before the control plane;
        # the arguments are the contract's, so both sides' declarations agree.
        exchanges = {
            name: await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
            for name in (CMD_EXCHANGE, RESULT_EXCHANGE, MONITOR_EXCHANGE)
        }
        inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        session = _Session(
            connection=connection,
            channel=channel,
            results=exchanges[RESULT_EXCHANGE],
            monitor=exchanges[MONITOR_EXCHANGE],
            inbox=inbox,
        )

        def lost(_sender: object, exc: BaseException | None = None) -> None:
            if not session.lost_reason:
                text = str(exc) if exc is not None else ""
                session.lost_reason = self._scrub(text or "the connection closed")
            inbox.put_nowait(None)

        connection.close_callbacks.add(lost)
        channel.close_callbacks.add(lost)

        # Exclusive and auto-delete: commands wait for this host only while it is here; one
        # sent to a host without a queue comes back unroutable to the control plane.
        queue = await channel.declare_queue(self._queue_name, exclusive=True, auto_delete=True)
        keys = [self._queue_name, *(f"cmd.group.{g}" for g in self._config.groups), BROADCAST_KEY]
        for key in dict.fromkeys(keys):
            await queue.bind(exchanges[CMD_EXCHANGE], key)

        async def on_delivery(delivery: AbstractIncomingMessage) -> None:
            # aiormq calls this in a task per message. The tasks start in delivery order and
            # each enqueues at once, so the one loop reading the inbox sees commands in order
            # (which the replay check and a cancel following its command rely on).
            inbox.put_nowait(delivery)

        await queue.consume(on_delivery, no_ack=False)
        return session

    async def _serve(self, session: _Session) -> None:
        """Handle deliveries until the connection is lost, beating and re-sending alongside."""
        helpers = {
            asyncio.create_task(self._heartbeats(session), name="agent-heartbeat"),
            asyncio.create_task(self._on_connected(), name="agent-resend"),
        }
        try:
            while True:
                delivery = await session.inbox.get()
                if delivery is None:
                    raise _ConnectionLost(session.lost_reason or "the connection closed")
                try:
                    await self._deliver(delivery)
                except _CONNECTION_ERRORS as exc:
                    # The ack could not be sent: the connection is going, and its loss is
                    # reported through the inbox.
                    logger.debug("ack failed: %s", exc)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.wait(helpers)

    async def _on_connected(self) -> None:
        try:
            await self._handler.on_connected()
        except Exception:
            # The next connection tries again; this one may be fine.
            logger.exception("re-sending spooled results failed")

    def _scrub(self, text: str) -> str:
        """``text`` without the broker password, should a library have put the URL in it."""
        with contextlib.suppress(ValueError):
            password = urlsplit(self._url).password
            if password:
                for form in {password, unquote(password)}:
                    text = text.replace(form, "******")
        return text


def _really_cancelled() -> bool:
    """Whether the current task itself is being cancelled (not just a future under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _retrieve(future: asyncio.Future[bool]) -> None:
    # Nobody may be waiting for a publish that outlived its caller; reading its outcome
    # keeps asyncio from reporting "exception was never retrieved".
    if not future.cancelled():
        future.exception()
