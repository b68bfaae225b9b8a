"""The control plane's side of the RabbitMQ link (seed 002, DESIGN §3.2, docs/amqp.md).

Commands are signed, persistent and ``mandatory``: a command nobody can receive comes back and
its run is ``undeliverable`` at once. Results are acked only after the engine has made them
durable, so a crash in between means redelivery, never loss; duplicates change nothing.
Heartbeats are acked on receipt (docs/amqp.md, "Heartbeats are acked on receipt"): a heartbeat
carries no result, the next one replaces it, and liveness is judged from the newest one
received (``heard``), never from what the database has written yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import json_format

from opsplane.domain.addresses import mask_url as mask_url
from opsplane.domain.errors import (
    ConfigError,
    ConnectionLost,
    InvalidInput,
    NameTaken,
    NotConnected,
    ReportRejected,
    TransportError,
)
from opsplane.security.signing import sign, verify
from opsplane.transport.amqp import messages as m
from opsplane.transport.amqp.publish import PUBLISH_TIMEOUT as PUBLISH_TIMEOUT
from opsplane.transport.amqp.publish import publish_mandatory
from opsplane.transport.amqp.queues import QueueType, durable_queue
from opsplane.transport.base import CommandEnvelope, Fanout, HostReport, Link, LinkEvents
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc.convert import manifest_to_pb
from opsplane.transport.grpc.files import ChunkServer

log = logging.getLogger(__name__)

# A heartbeat older than this (or this far in the future) is a replay, or a clock to fix.
HEARTBEAT_MAX_AGE = 300.0
# A fan-out upload's chunk asked for by several of its hosts within this long is published
# once on the group (or broadcast) key instead of once per host.
COALESCE_SECONDS = 0.05
# Fan-out uploads remembered for shared publishing (a manifest each, no file data).
_SHARED_TASKS = 16
# Hashes one chunk request may name: the agent asks one at a time (its window is 8).
MAX_HASHES_PER_REQUEST = 64
# A robust connection that is down or recovering fails a publish in any of these ways.
_PUBLISH_FAILURES = (
    TimeoutError,
    OSError,
    RuntimeError,
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
)


class AmqpLink(Link):
    name: ClassVar[str] = m.LINK_NAME
    supports_fanout: ClassVar[bool] = True
    has_silent_starters: ClassVar[bool] = True

    def __init__(
        self,
        url: str,
        *,
        signing_key: Ed25519PrivateKey,
        heartbeat_interval: float,
        offline_after_missed: int,
        prefetch: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
        queue_type: QueueType = "classic",
    ) -> None:
        self._url = url
        # Of cmd.result and monitor.heartbeat, when this instance creates them (queues.py).
        self._queue_type: QueueType = queue_type
        # For amqps:// (security/tls.py amqp_ssl_context); None: the system's CAs, or the
        # URL's own ?cafile=…&certfile=…&keyfile=….
        self._ssl_context = ssl_context
        self._key = signing_key
        self._fresh_for = heartbeat_interval * offline_after_missed
        self._prefetch = prefetch
        self._events: LinkEvents | None = None
        self._connection: AbstractRobustConnection | None = None
        self._consuming: AbstractRobustConnection | None = None
        self._commands: AbstractExchange | None = None
        self._last_seen: dict[str, float] = {}
        # Uploads (docs/filepush.md): manifests sent, chunks read and published as agents
        # ask for them; the same chunk server as gRPC's (one read serves a task's hosts).
        self._chunks = ChunkServer()
        self._serving: set[asyncio.Task[None]] = set()
        # Fan-out uploads: task id → where its command went, and the hosts it was for.
        self._fanouts: dict[str, _FanoutUpload] = {}
        # (task id, hash) → hosts that asked for it in the last COALESCE_SECONDS.
        self._asked: dict[tuple[str, str], dict[str, str]] = {}
        # Chunks published once for several hosts on a group or broadcast key.
        self.chunks_shared = 0

    @property
    def chunks_served(self) -> int:
        """Chunks published to agents so far (tests and the bench read it)."""
        return self._chunks.chunks_served

    async def start(self, events: LinkEvents) -> None:
        self._events = events
        # Named as the agents' are ("opsplane-agent <name>"), so that an operator (or a fault
        # test) can tell the connections apart in `rabbitmqctl list_connections`. Publishing
        # and consuming go on connections of their own: the broker throttles a publishing
        # connection (credit flow) while a fan-out reaches thousands of queues, and reads
        # nothing else from it meanwhile, acks included; sharing one, results and heartbeats
        # stalled behind every broadcast at 3,000 agents (docs/amqp.md).
        self._connection = await self._dial("opsplane-control-plane")
        self._consuming = await self._dial("opsplane-control-plane-consumer")
        publish = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._commands = await publish.declare_exchange(
            m.CMD_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        # Results and heartbeats come on separate queues, each consumed on its own channel
        # with its own prefetch: results wait in ingest for the database (up to ``prefetch``
        # unacked), heartbeats are acked as they come and never wait behind them.
        consume = await self._consuming.channel()
        await consume.set_qos(prefetch_count=self._prefetch)
        results = await consume.declare_exchange(
            m.RESULT_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        result_queue = await durable_queue(
            self._consuming, consume, m.RESULT_QUEUE, self._queue_type
        )
        await result_queue.bind(results, m.RESULT_BINDING)
        beats = await self._consuming.channel()
        await beats.set_qos(prefetch_count=self._prefetch)
        monitor = await beats.declare_exchange(
            m.MONITOR_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        heartbeat_queue = await durable_queue(
            self._consuming, beats, m.HEARTBEAT_QUEUE, self._queue_type
        )
        await heartbeat_queue.bind(monitor, m.HEARTBEAT_KEY)
        await result_queue.consume(self._on_result)
        await heartbeat_queue.consume(self._on_heartbeat)
        log.info("RabbitMQ link up at %s", mask_url(self._url))

    async def _dial(self, name: str) -> AbstractRobustConnection:
        try:
            return await aio_pika.connect_robust(
                self._url,
                timeout=10,
                ssl_context=self._ssl_context,
                client_properties={"connection_name": f"{name} {socket.gethostname()}"},
            )
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as e:
            await self.stop()
            raise ConfigError(f"cannot reach RabbitMQ at {mask_url(self._url)}: {e}") from e

    async def stop(self) -> None:
        for connection in (self._consuming, self._connection):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
        self._connection = self._consuming = None
        self._events = None

    def is_connected(self, hostname: str) -> bool:
        seen = self._last_seen.get(hostname)
        return seen is not None and time.monotonic() - seen < self._fresh_for

    def heard(self, hostname: str) -> bool:
        # The newest heartbeat received, not the newest written: a slow database or a backlog
        # of run reports in ingest must never age a live host into offline.
        return self.is_connected(hostname)

    async def send_command(self, hostname: str, command: CommandEnvelope) -> None:
        manifest = await self._manifest(command, [(hostname, command.run_id)])
        body = m.command_body(command, time.time(), target=hostname, manifest=manifest)
        await self._publish(m.node_key(hostname), body)

    async def send_fanout(self, fanout: Fanout) -> None:
        if fanout.group:
            key, target = m.group_key(fanout.group), m.group_target(fanout.group)
        else:
            key, target = m.BROADCAST_KEY, m.ALL_TARGET
        manifest = await self._manifest(fanout.envelope, list(fanout.run_ids.items()))
        if manifest is not None:
            envelope = fanout.envelope
            self._fanouts[envelope.task_id] = _FanoutUpload(
                key, target, envelope.attempt, dict(fanout.run_ids)
            )
            while len(self._fanouts) > _SHARED_TASKS:
                self._fanouts.pop(next(iter(self._fanouts)))
        body = m.command_body(
            fanout.envelope, time.time(), target=target, fanout=True, manifest=manifest
        )
        await self._publish(key, body)

    async def _manifest(
        self, command: CommandEnvelope, runs: list[tuple[str, str]]
    ) -> dict[str, Any] | None:
        """An upload's manifest as JSON (protobuf's mapping of ``FileManifest``), hashed once
        per task; ``runs`` (host, run id) are the runs whose hosts may then ask for chunks."""
        if command.upload is None or not runs:
            return None
        (first_host, first_run), *others = runs
        try:
            manifest = await self._chunks.manifest_for(
                command.task_id, first_run, first_host, command.upload
            )
        except OSError as e:
            raise TransportError(f"cannot read the upload's files: {e}") from e
        for hostname, run_id in others:
            self._chunks.also_sent(run_id, hostname, manifest)
        message = manifest_to_pb(manifest)
        message.owner = command.upload.owner or ""
        message.group = command.upload.group or ""
        return json_format.MessageToDict(message, preserving_proto_field_name=True)

    async def send_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        await self._publish(
            m.node_key(hostname),
            m.cancel_body(task_id, run_id, reason, time.time(), target=hostname),
        )

    async def _publish(self, routing_key: str, body: dict[str, Any]) -> None:
        if self._commands is None:
            raise NotConnected("the RabbitMQ link is not started")
        body["sign"] = sign(self._key, body)
        message = aio_pika.Message(
            json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=body.get("run_id") or f"{body['task_id']}:{body.get('attempt', 1)}",
        )
        await publish_mandatory(
            self._commands,
            message,
            routing_key,
            unroutable=f"no agent queue is bound to {routing_key} (unroutable)",
            connection=self._connection,
        )

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        try:
            body = m.decode(message.body)
            if body.get("type") == "chunk_request":
                await self._on_chunk_request(message, body)
                return
            report = m.result_report(body, message.routing_key or "")
        except InvalidInput as e:
            await self._refuse(message, "malformed", f"result ({message.routing_key}): {e}")
            return
        # Results may be old (spooled while the control plane was down): no age limit. A
        # replayed result changes nothing, as a run ends once (its id is the replay guard).
        if await self._refused(message, body, report.hostname, max_age=None):
            return
        if body.get("type", "result") == "result" and isinstance(body.get("run_id"), str):
            self._chunks.finished(body["run_id"])
        await self._ack_when_durable(message, report)

    async def _on_chunk_request(
        self, message: AbstractIncomingMessage, body: dict[str, Any]
    ) -> None:
        """An agent asks for chunks of its upload: each is published to its own queue (the
        chunk server checks the run was sent to that host, and the hash is in its manifest).
        Acked on receipt: a request lost in a crash is asked again by the agent."""
        hostname = m.hostname_of(body, message.routing_key or "")
        if await self._refused(message, body, hostname, max_age=HEARTBEAT_MAX_AGE):
            return
        hashes = body.get("hashes")
        if not isinstance(hashes, list) or len(hashes) > MAX_HASHES_PER_REQUEST:
            await self._refuse(message, "malformed", f"chunk request from {hostname}: hashes")
            return
        request = pb.ChunkRequest(
            run_id=str(body.get("run_id") or ""),
            task_id=str(body.get("task_id") or ""),
            hashes=[str(h) for h in hashes],
        )
        await message.ack()
        fanout = self._fanouts.get(request.task_id)
        if fanout is not None and fanout.run_ids.get(hostname) == request.run_id:
            for digest in request.hashes:
                self._coalesce(request.task_id, hostname, request.run_id, digest)
            return

        async def write(answer: pb.CommandMessage) -> None:
            chunk = answer.file_chunk
            await self._publish(
                m.node_key(hostname),
                m.chunk_body(
                    request.task_id,
                    chunk.run_id,
                    chunk.hash,
                    chunk.data,
                    chunk.error,
                    time.time(),
                    target=hostname,
                ),
            )

        serving = asyncio.create_task(self._serve_chunks(hostname, request, write))
        self._serving.add(serving)
        serving.add_done_callback(self._serving.discard)

    def _coalesce(self, task_id: str, hostname: str, run_id: str, digest: str) -> None:
        """Note that ``hostname`` asked for ``digest``; the first asker starts the wait after
        which the chunk goes out: on the group key if more hosts asked meanwhile."""
        key = (task_id, digest)
        waiting = self._asked.get(key)
        if waiting is not None:
            waiting[hostname] = run_id
            return
        self._asked[key] = {hostname: run_id}
        publishing = asyncio.create_task(self._publish_shared(task_id, digest))
        self._serving.add(publishing)
        publishing.add_done_callback(self._serving.discard)

    async def _publish_shared(self, task_id: str, digest: str) -> None:
        await asyncio.sleep(COALESCE_SECONDS)
        askers = self._asked.pop((task_id, digest), {})
        fanout = self._fanouts.get(task_id)
        if fanout is None or len(askers) < 2:
            # One host only: answered on its own queue, as for a unicast upload.
            for hostname, run_id in askers.items():
                request = pb.ChunkRequest(run_id=run_id, task_id=task_id, hashes=[digest])
                await self._serve_chunks(hostname, request, self._unicast(hostname, task_id))
            return
        hostname, run_id = next(iter(askers.items()))
        try:
            data = await self._chunks.read_for_run(run_id, hostname, digest)
            error = ""
        except (KeyError, OSError, ValueError) as e:
            data, error = b"", str(e) or "the manifest names no such chunk"
        body = m.chunk_body(task_id, None, digest, data, error, time.time(), target=fanout.target)
        body["attempt"] = fanout.attempt
        try:
            await self._publish(fanout.key, body)
        except (NotConnected, ConnectionLost) as e:
            log.info("a shared chunk of task %s not published: %s", task_id, e)
            return
        self.chunks_shared += 1
        self._chunks.chunks_served += 1

    def _unicast(self, hostname: str, task_id: str) -> Any:
        async def write(answer: pb.CommandMessage) -> None:
            chunk = answer.file_chunk
            await self._publish(
                m.node_key(hostname),
                m.chunk_body(
                    task_id,
                    chunk.run_id,
                    chunk.hash,
                    chunk.data,
                    chunk.error,
                    time.time(),
                    target=hostname,
                ),
            )

        return write

    async def _serve_chunks(self, hostname: str, request: pb.ChunkRequest, write: Any) -> None:
        try:
            await self._chunks.serve(hostname, request, write)
        except (NotConnected, ConnectionLost) as e:
            # The agent went (its queue with it) or the broker did: it asks again if it can.
            log.info("chunks for %s not published: %s", hostname, e)

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        try:
            body = m.decode(message.body)
            report = m.heartbeat_report(body)
            hello = m.heartbeat_hello(body, datetime.now(UTC))
        except InvalidInput as e:
            await self._refuse(message, "malformed", f"heartbeat: {e}")
            return
        events = self._events
        if events is None:
            await message.nack(requeue=True)
            return
        if await self._refused(message, body, hello.hostname, max_age=HEARTBEAT_MAX_AGE):
            return
        if m.says_offline(body):
            # The agent says it is going (seed 002's ``"status": "offline"``): offline now,
            # not after the silence limit.
            self._last_seen.pop(hello.hostname, None)
            await events.host_disconnected(hello.hostname, self.name)
            await message.ack()
            return
        refusal = events.agent_refusal(hello.hostname, hello.public_key, hello.groups)
        if refusal is not None:
            await self._refuse(message, "refused_agent", refusal)
            return
        if hello.reconcile:
            # A hello carries the agent's run lists: acked once its reconciliation is written,
            # so that a crash in between means redelivery. One per agent connection.
            try:
                await events.host_connected(hello)
            except NameTaken as e:
                # The name is another link's host (SSH, the control plane's own).
                await self._refuse(message, "refused_agent", str(e))
                return
            await self._heard_now(hello.hostname, report, events)
            await message.ack()
            return
        # Any other beat is acked on receipt, before anything is written: a beat held unacked
        # holds a prefetch slot, and at 3,000 agents the slots went to beats waiting on the
        # database while the beats behind them aged the fleet offline (docs/amqp.md). Lost in
        # a crash, a beat is replaced by the next one: it carries no result.
        await message.ack()
        if not self.is_connected(hello.hostname):
            # Registered again (a host this link forgot: a restart, a long silence). Failing,
            # the next beat tries again: the host is not heard until it is registered.
            try:
                await events.host_connected(hello)
            except NameTaken as e:
                log.warning("refused a heartbeat on %s (refused_agent): %s", self.name, e)
                events.message_refused(self.name, "refused_agent")
                return
            except Exception as e:
                # The database is down (the connection writer says so, once): one line per
                # beat of every unknown host would flood the log.
                log.debug("could not register %s, at its next heartbeat: %s", hello.hostname, e)
                return
        await self._heard_now(hello.hostname, report, events)

    async def _heard_now(self, hostname: str, report: HostReport, events: LinkEvents) -> None:
        """The host is heard now (``heard``); its figures go to ingest, which keeps the latest
        beat per host in memory and writes them all in one statement."""
        self._last_seen[hostname] = time.monotonic()
        # Ingest takes a beat at once (no queue to wait in), and nobody waits for its write.
        written = await events.report(report)
        written.add_done_callback(_beat_written)

    async def _refused(
        self,
        message: AbstractIncomingMessage,
        body: dict[str, Any],
        hostname: str,
        *,
        max_age: float | None,
    ) -> bool:
        """Refuse (and count) a message whose claimed sender is enrolled but did not sign it,
        was revoked, or (with ``max_age``) a heartbeat too old or from the future: a replay.
        Messages of agents that never enrolled pass, unless enrollment is required (their
        hello is refused then)."""
        events = self._events
        if events is None:
            return False
        agent = events.agent_key(hostname)
        if agent is None:
            return False
        if agent.revoked:
            await self._refuse(message, "revoked", f"{hostname} was revoked")
            return True
        if not verify(agent.key, body, "signature"):
            await self._refuse(message, "bad_signature", f"not signed by {hostname}'s key")
            return True
        if max_age is not None:
            sent = body.get("timestamp")
            if not isinstance(sent, int | float) or abs(time.time() - sent) > max_age:
                await self._refuse(message, "stale", f"{hostname}'s message is not recent")
                return True
        return False

    async def _refuse(self, message: AbstractIncomingMessage, reason: str, why: str) -> None:
        log.warning("refused a message on %s (%s): %s", self.name, reason, why)
        if self._events is not None:
            self._events.message_refused(self.name, reason)
        await message.reject(requeue=False)

    async def _ack_when_durable(self, message: AbstractIncomingMessage, report: HostReport) -> None:
        events = self._events
        if events is None:
            await message.nack(requeue=True)
            return
        try:
            await (await events.report(report))
        except ReportRejected as e:
            # Ingest could not apply it (counted there); redelivered, it would fail again.
            log.warning("report from %s rejected by ingest, dropped: %s", report.hostname, e)
            await message.reject(requeue=False)
            return
        except Exception as e:
            # Not durable: back to the queue, to be written when the database is back.
            log.warning("report from %s not stored, requeued: %s", report.hostname, e)
            await message.nack(requeue=True)
            return
        await message.ack()


@dataclass(frozen=True)
class _FanoutUpload:
    key: str  # the routing key the command went on: its chunks may go there too
    target: str  # its signed target (``group:web``, ``all``)
    attempt: int
    run_ids: dict[str, str]  # host → run, the hosts the control plane planned


def _beat_written(future: asyncio.Future[None]) -> None:
    """A heartbeat not written is replaced by the next one: nothing to resend (already acked)."""
    if not future.cancelled() and (error := future.exception()) is not None:
        log.debug("a heartbeat was not written: %s", error)
