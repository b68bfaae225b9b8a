"""The agent's end of the RabbitMQ link (DESIGN §3.2, §3.3; the wire protocol is docs/amqp.md).

After each (re)connection the agent declares the three topic exchanges, its own exclusive,
auto-delete queue ``cmd.node.{name}`` (bound to its node key, each of its groups and
``cmd.all``), sends a hello heartbeat, re-sends the results the broker has not confirmed yet
and then beats every ``heartbeat_interval``. It declares nothing durable of the control
plane's: ``cmd.result`` and ``monitor.heartbeat`` are the control plane's to create.

Every command is checked before the daemon sees it: the control plane's signature (pinned
key), the replay window, and the run id not seen before. A refused command is counted by
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
import math
import platform
import time
from collections import Counter
from collections.abc import Callable, Mapping
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
from opsplane.agent.config import AgentConfig, mask_url
from opsplane.agent.grpc_link import Backoff, LinkHandler
from opsplane.agent.spool import check_run_id
from opsplane.domain.errors import InvalidInput
from opsplane.domain.ids import run_id_for
from opsplane.security.signing import load_public_key, public_key_text, sign, verify
from opsplane.security.tls import amqp_ssl_context
from opsplane.transport.amqp.messages import ALL_TARGET, group_target
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
# Attempts remembered for "started" messages (pb.Started has none); a run's entry goes with
# its result, this only bounds what runs without a result could leave behind.
_MAX_TRACKED_RUNS: Final = 10_000

UNSIGNED: Final = "unsigned"
BAD_SIGNATURE: Final = "bad_signature"
STALE: Final = "stale"
REPLAY: Final = "replay"
MALFORMED: Final = "malformed"
WRONG_TARGET: Final = "wrong_target"
REFUSAL_REASONS: Final = (UNSIGNED, BAD_SIGNATURE, STALE, REPLAY, MALFORMED, WRONG_TARGET)

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


class _Refused(Exception):
    """A command that fails a check; ``reason`` is one of :data:`REFUSAL_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


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
        self._control_plane_key = load_public_key(config.control_plane_key)
        self._public_key = public_key_text(signing_key.public_key())
        self._host_metrics = host_metrics
        self._os = platform.platform()
        self._backoff = Backoff(config.reconnect_initial, config.reconnect_max)
        self._refusals: Counter[str] = Counter(dict.fromkeys(REFUSAL_REASONS, 0))
        self._session: _Session | None = None
        self._stalled: asyncio.Future[bool] | None = None
        self._attempts: dict[str, int] = {}
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
        body, run_id = self._translate_up(message, kind)
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

    def _translate_up(
        self, message: pb.CommandMessage, kind: str | None
    ) -> tuple[dict[str, Any] | None, str]:
        """The JSON body (unsigned) for an outgoing pb message, and its run id."""
        name = self._config.name
        if kind == "command_result":
            r = message.command_result
            self._attempts.pop(r.run_id, None)
            body = {
                "type": "result",
                "task_id": r.task_id,
                "run_id": r.run_id,
                "attempt": r.attempt,
                "hostname": r.hostname or name,
                "status": r.status,
                "exit_code": r.exit_code if r.HasField("exit_code") else None,
                "stdout": r.stdout,
                "stderr": r.stderr,
                "truncated": r.truncated,
                "error": r.error,
                "started_at": r.started_at,
                "finished_at": r.finished_at,
                "duration_ms": r.duration_ms,
                # When this message was sent (it is signed with it); finished_at is when
                # the run ended, which for a re-sent result may be long before.
                "timestamp": time.time(),
            }
            return body, r.run_id
        if kind == "started":
            s = message.started
            body = {
                "type": "started",
                "task_id": s.task_id,
                "run_id": s.run_id,
                "attempt": self._attempts.get(s.run_id, 1),
                "hostname": name,
                "started_at": s.started_at,
                "pid": s.pid,
                "timestamp": time.time(),
            }
            return body, s.run_id
        if kind == "output":
            o = message.output
            body = {
                "type": "output",
                "task_id": o.task_id,
                "run_id": o.run_id,
                "hostname": name,
                "stream": o.stream,
                "seq": o.seq,
                # The daemon cuts chunks between characters (agent/outbox.py): each one
                # decodes alone, the same when it is re-sent.
                "data": o.data.decode("utf-8", "replace"),
                "timestamp": time.time(),
            }
            return body, o.run_id
        logger.debug("nothing to publish for a %s message on RabbitMQ", kind)
        return None, ""

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

    def _heartbeat(self, hello: pb.Hello | None = None) -> dict[str, Any]:
        config = self._config
        figures = self._host_metrics()
        body: dict[str, Any] = {
            "hostname": config.name,
            "status": "online",
            "timestamp": time.time(),
            "cpu_usage": figures.get("cpu_usage", 0.0),
            "memory_usage": figures.get("memory_usage", 0.0),
            "load": figures.get("load", 0.0),
            "disk_usage": figures.get("disk_usage", 0.0),
            "groups": list(config.groups),
            "labels": dict(config.labels),
            "version": config.version,
            "os": self._os,
            "public_key": self._public_key,
        }
        if hello is not None:
            body |= {
                "hello": True,
                "running_run_ids": list(hello.running_run_ids),
                "finished_run_ids": list(hello.finished_run_ids),
                "abandoned_run_ids": list(hello.abandoned_run_ids),
            }
        return body

    async def _beat(self, session: _Session, hello: pb.Hello | None = None) -> bool:
        # Bounded: a broker that blocks publishers must not pile heartbeats up behind it.
        publish = asyncio.ensure_future(
            self._publish(
                session, session.monitor, HEARTBEAT_KEY, self._heartbeat(hello), mandatory=False
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
            return self._translate_down(body)
        except _Refused as refusal:
            self._refusals[refusal.reason] += 1
            logger.warning("refused a command (%s): %s", refusal.reason, refusal)
            # The text of a refused command may be anything; only for whoever debugs.
            logger.debug("the refused message: %r", body[:4096])
            return None

    def _translate_down(self, body: bytes) -> pb.CommandMessage | None:
        """The pb message for a valid command or cancel; None if it is not for this host."""
        try:
            data = json.loads(body)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise _Refused(MALFORMED, f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _Refused(MALFORMED, "not a JSON object")
        what = _describe_command(data)
        signature = data.get("sign")
        if not isinstance(signature, str) or not signature:
            raise _Refused(UNSIGNED, f"{what} has no signature")
        if not verify(self._control_plane_key, data, "sign"):
            raise _Refused(BAD_SIGNATURE, f"{what} is not signed by the pinned control plane key")
        timestamp = _number(data, "timestamp", what)
        skew = time.time() - timestamp
        if abs(skew) > self._config.replay_window:
            raise _Refused(
                STALE,
                f"{what} is {abs(skew):.0f}s {'old' if skew > 0 else 'in the future'}; "
                f"the window is ±{self._config.replay_window:g}s",
            )
        kind = data.get("type", "command")
        if kind not in ("command", "cancel"):
            raise _Refused(MALFORMED, f"{what} has an unknown type {str(kind)[:40]!r}")
        self._check_target(data, what)
        run_id = self._own_run_id(data, what)
        task_id = _text(data, "task_id", what, default="")
        if kind == "cancel":
            reason = _text(data, "reason", what, default="")
            cancel = pb.Cancel(run_id=run_id, task_id=task_id, reason=reason)
            return pb.CommandMessage(cancel=cancel)
        try:
            seen = self._handler.already_seen(run_id)
        except InvalidInput:
            raise _Refused(MALFORMED, f"{what} has an invalid run id") from None
        if seen:
            raise _Refused(REPLAY, f"{what} was received before")
        timeout = _number(data, "timeout", what, default=0)
        if timeout >= 2**62:
            raise _Refused(MALFORMED, f"{what}: timeout is out of range")
        content = pb.CommandContent(
            task_id=task_id,
            run_id=run_id,
            attempt=_integer(data, "attempt", what, default=1),
            command=_text(data, "command", what),
            timeout=math.ceil(timeout),
            env=_env(data, what),
            user=_text(data, "user", what, default=""),
            timestamp=timestamp,
            sign=signature,
            deliver_by=_number(data, "deliver_by", what, default=0),
        )
        if len(self._attempts) >= _MAX_TRACKED_RUNS:
            self._attempts.clear()
        self._attempts[run_id] = content.attempt
        return pb.CommandMessage(command_content=content)

    def _check_target(self, data: Mapping[str, Any], what: str) -> None:
        """Refuse a command addressed (in its signed ``target``) to another host: one sent
        to a single host (``run_id``) names that host; a fan-out (no run id) names ``all``
        or a group of this host's. A captured command published into this host's queue is
        therefore refused, whatever its signature."""
        target = data.get("target")
        config = self._config
        if data.get("run_id") is not None:
            allowed = {config.name}
        else:
            allowed = {ALL_TARGET, *(group_target(g) for g in config.groups)}
        if not isinstance(target, str) or target not in allowed:
            shown = str(target)[:80] if target is not None else "nobody"
            raise _Refused(WRONG_TARGET, f"{what} is addressed to {shown!r}, not to this host")

    def _own_run_id(self, data: Mapping[str, Any], what: str) -> str:
        """This host's run id: ``run_id`` (unicast), else derived from the task id, this
        host's name and the attempt (a group or broadcast message carries no per-host map)."""
        run_id = data.get("run_id")
        if run_id is None:
            task_id = _text(data, "task_id", what)
            if not task_id:
                raise _Refused(MALFORMED, f"{what} has neither run_id nor task_id")
            attempt = _integer(data, "attempt", what, default=1)
            run_id = run_id_for(task_id, self._config.name, attempt)
        if not isinstance(run_id, str):
            raise _Refused(MALFORMED, f"{what} has a run id that is not a string")
        try:
            check_run_id(run_id)
        except InvalidInput:
            raise _Refused(MALFORMED, f"{what} has an invalid run id {run_id[:80]!r}") from None
        return run_id

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


def _describe_command(data: Mapping[str, Any]) -> str:
    """How a (maybe hostile) command is named in a log line: its ids, short, never its text."""
    parts = [str(data.get("type", "command"))[:20]]
    for key in ("task_id", "run_id"):
        value = data.get(key)
        if value is not None:
            parts.append(f"{key}={str(value)[:80]!r}")
    return " ".join(parts)


def _text(data: Mapping[str, Any], key: str, what: str, *, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise _Refused(MALFORMED, f"{what}: {key} must be a string")
    return value


def _number(data: Mapping[str, Any], key: str, what: str, *, default: float | None = None) -> float:
    value = data.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise _Refused(MALFORMED, f"{what}: {key} must be a non-negative number")
    return float(value)


def _integer(data: Mapping[str, Any], key: str, what: str, *, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise _Refused(MALFORMED, f"{what}: {key} must be a non-negative integer")
    return value


def _env(data: Mapping[str, Any], what: str) -> dict[str, str]:
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise _Refused(MALFORMED, f"{what}: env must map strings to strings")
    return env


def _really_cancelled() -> bool:
    """Whether the current task itself is being cancelled (not just a future under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _retrieve(future: asyncio.Future[bool]) -> None:
    # Nobody may be waiting for a publish that outlived its caller; reading its outcome
    # keeps asyncio from reporting "exception was never retrieved".
    if not future.cancelled():
        future.exception()
