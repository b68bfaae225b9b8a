"""The control plane's side of the gRPC link: agents dial in and keep one bidirectional
``ConnectForCommands`` stream open (seed 001, DESIGN §3.1).

Per agent, only the stream's context and a write lock are held, so 10,000 agents stay cheap.
Just past the house's 600 lines: the handshake, the read loop and the stream's writes share the
per-stream state; file chunks (files.py) and message conversion (convert.py) are apart already.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError, Message
from grpc import aio

from opsplane.config import is_loopback, split_host_port
from opsplane.domain.errors import (
    ConfigError,
    ConnectionLost,
    InvalidInput,
    NameTaken,
    NotConnected,
    TransportError,
)
from opsplane.domain.targeting import check_host_name
from opsplane.security.signing import parse_public_key, verify
from opsplane.transport.base import AgentHello, CommandEnvelope, Link, LinkEvents, RunFinished
from opsplane.transport.grpc import convert
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.files import ChunkServer
from opsplane.transport.grpc.signer import CommandSigner

log = logging.getLogger(__name__)

_EOF: object = aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

# How long a stream may take to say hello after its challenge. Generous: a busy control plane
# or agent must not turn a slow hello into a reconnect storm.
HELLO_TIMEOUT = 30.0
# Trailing metadata of a RESOURCE_EXHAUSTED refusal: how long the agent should wait (ms).
RETRY_AFTER_KEY = "opsplane-retry-after-ms"
# The largest message either way. An agent's largest is a result: the head and tail of each
# stream (64 KiB each by default); a larger message ends the stream (RESOURCE_EXHAUSTED) before
# it is read into memory, and the agent reconnects.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Keepalive pings on an idle stream never stop (the default stops after two pings
    # without data): they are how an agent that stopped answering is found (docs/scale.md).
    ("grpc.http2.max_pings_without_data", 0),
    # What a keepalive ping's answer is waited for (gRPC core arms this timer, not
    # keepalive_timeout, for the pings it sends): kept equal to keepalive_timeout_ms.
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def server_options(heartbeat_interval: float, offline_after_missed: int) -> list[tuple[str, int]]:
    """``KEEPALIVE_OPTIONS`` with the keepalive paced by the heartbeat settings: a ping every
    interval, answered within the rest of the silence limit, so that a stream to an agent that
    stopped answering (frozen, cut off without a FIN) ends within ``interval * missed``, as the
    heartbeat rule would have it. Pings are answered by the peer's gRPC core: no message, no
    signature, nothing on the event loop of either side."""
    interval_ms = max(1, round(heartbeat_interval * 1000))
    timeout_ms = interval_ms * max(1, offline_after_missed - 1)
    paced = {
        "grpc.keepalive_time_ms": interval_ms,
        "grpc.keepalive_timeout_ms": timeout_ms,
        "grpc.http2.ping_timeout_ms": timeout_ms,
    }
    return [(name, paced.get(name, value)) for name, value in KEEPALIVE_OPTIONS]


@dataclass(eq=False)
class _AgentStream:
    hostname: str
    context: aio.ServicerContext[pb.CommandMessage, pb.CommandMessage]
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    # The RPC serving this stream: cancelled to drop the agent (revoked).
    task: asyncio.Task[None] | None = None
    # The key the agent proved in its hello: its results and heartbeats must be signed by it.
    key: Ed25519PublicKey | None = None
    # Whether the agent checks commands signed once for a batch (its hello's features).
    batch_signed: bool = False
    # Why the control plane dropped this stream (``GrpcLink.drop``), if it did.
    dropped: str = ""
    # Completes once the engine has recorded the connection: the host's reports wait for it,
    # so that none reaches the store before the host's row (the welcome does not wait).
    registered: asyncio.Future[None] | None = None

    async def write(self, message: pb.CommandMessage) -> None:
        if self.closed:
            raise NotConnected(f"{self.hostname} is not connected")
        try:
            async with self.write_lock:
                await self.context.write(message)
        except (aio.AioRpcError, RuntimeError, asyncio.InvalidStateError) as e:
            self.closed = True
            raise ConnectionLost(f"stream to {self.hostname} broke: {e}") from e


class GrpcLink(Link, pb_grpc.CommandServiceServicer):  # type: ignore[misc]
    name: ClassVar[str] = convert.LINK_NAME
    # An open stream is the agent's liveness: keepalive pings end one whose peer is gone.
    liveness_by_stream: ClassVar[bool] = True
    # The runs of a task dispatched together share one signature (signer.py).
    signs_batches: ClassVar[bool] = True

    def __init__(
        self,
        listen: str,
        *,
        heartbeat_interval: float,
        offline_after_missed: int = 3,
        metrics_interval: float = 60.0,
        allow_insecure: bool = False,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        max_handshakes: int = 1000,
        retry_after_ms: int = 1000,
        pending_streams: int = 20_000,
    ) -> None:
        """Agents connect with TLS when ``tls_cert``/``tls_key`` are given, and must then
        present a client certificate signed by ``tls_client_ca`` if that is given (mutual TLS),
        whose common name or DNS name is the name the agent says hello with. Plaintext is
        refused off loopback unless ``allow_insecure``.

        At most ``max_handshakes`` streams are between their start and their welcome at once;
        past it a new stream is refused at once with RESOURCE_EXHAUSTED and a hint to retry
        after about ``retry_after_ms`` (docs/scale.md), rather than left to time out.
        ``pending_streams`` (0: gRPC core's defaults) raises how many new streams gRPC core
        queues for the handler before it starts cancelling them."""
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("grpc_tls_cert and grpc_tls_key go together")
        if tls_client_ca is not None and tls_cert is None:
            raise ConfigError(
                "grpc_tls_client_ca needs TLS: set grpc_tls_cert and grpc_tls_key, or run "
                "`opsplane keys init`"
            )
        self._listen = listen
        self._heartbeat_interval = heartbeat_interval
        self._offline_after_missed = offline_after_missed
        # Told to agents in the welcome: their heartbeats carry metrics only, this often.
        self._metrics_interval = metrics_interval
        self._allow_insecure = allow_insecure
        self._tls_cert = tls_cert
        self._tls_key = tls_key
        self._tls_client_ca = tls_client_ca
        # Signs every command (DESIGN §3.3); agents that pinned its public key verify it.
        self._signer = CommandSigner(signing_key)
        self._server: aio.Server | None = None
        self._events: LinkEvents | None = None
        self._streams: dict[str, _AgentStream] = {}
        self._pending_acks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._max_handshakes = max_handshakes
        self._retry_after_ms = retry_after_ms
        self._pending_streams = pending_streams
        self._handshakes = 0
        # Hello signatures are checked here, off the event loop (one Ed25519 verify each).
        self._verifier: ThreadPoolExecutor | None = None
        # Results' signatures, checked in batches on a thread of their own (docs/scale.md).
        self._result_checks = _ResultChecks()
        self.bound_port: int | None = None
        # Uploads: manifests sent, chunks served as agents ask (docs/filepush.md).
        self._chunks = ChunkServer()
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self, events: LinkEvents) -> None:
        self._events = events
        host, _ = split_host_port(self._listen)
        server = aio.server(
            options=[
                *server_options(self._heartbeat_interval, self._offline_after_missed),
                *self._pending_options(),
            ]
        )
        pb_grpc.add_CommandServiceServicer_to_server(self, server)
        if self._tls_cert and self._tls_key:
            self.bound_port = server.add_secure_port(self._listen, self._server_credentials())
        elif is_loopback(host) or self._allow_insecure:
            self.bound_port = server.add_insecure_port(self._listen)
        else:
            raise ConfigError(
                f"refusing plaintext gRPC on non-loopback address {self._listen}: set "
                "grpc_tls_cert and grpc_tls_key, or grpc_allow_insecure=true on a trusted network"
            )
        if not self.bound_port:
            raise ConfigError(f"cannot listen for agents on {self._listen}")
        await server.start()
        self._server = server
        self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hello-verify")
        self._result_checks.start()
        if self._tls_cert is None:
            log.info("gRPC agent endpoint listening on %s (plaintext)", self._listen)
        else:
            log.info(
                "gRPC agent endpoint listening on %s with TLS, serving %s%s",
                self._listen,
                self._tls_cert,
                f"; client certificates required, signed by {self._tls_client_ca}"
                if self._tls_client_ca
                else "",
            )

    def _pending_options(self) -> list[tuple[str, int]]:
        # Past the soft limit gRPC core cancels new streams at random, past the hard one all
        # of them, before the handler runs (a connect storm's CANCELLED, docs/scale.md).
        if not self._pending_streams:
            return []
        return [
            ("grpc.server.max_pending_requests", self._pending_streams),
            ("grpc.server.max_pending_requests_hard_limit", 2 * self._pending_streams),
        ]

    def _server_credentials(self) -> grpc.ServerCredentials:
        assert self._tls_cert is not None and self._tls_key is not None
        try:
            pair = (self._tls_key.read_bytes(), self._tls_cert.read_bytes())
            client_ca = self._tls_client_ca.read_bytes() if self._tls_client_ca else None
        except OSError as e:
            raise ConfigError(f"cannot read the gRPC TLS files: {e}") from e
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    async def stop(self) -> None:
        # Streams closed by our own shutdown are not disconnections to record: the engine marks
        # every host offline when it starts again.
        self._stopping = True
        if self._server is not None:
            await self._server.stop(grace=2.0)
            self._server = None
        for task in list(self._pending_acks):
            task.cancel()
        if self._verifier is not None:
            self._verifier.shutdown(wait=False, cancel_futures=True)
            self._verifier = None
        self._result_checks.stop()

    def is_connected(self, hostname: str) -> bool:
        # Once the engine has recorded the connection too: the host's row exists then.
        stream = self._streams.get(hostname)
        return (
            stream is not None
            and not stream.closed
            and (stream.registered is None or stream.registered.done())
        )

    async def send_command(self, hostname: str, command: CommandEnvelope) -> None:
        stream = self._stream(hostname)
        await stream.write(await self._command(hostname, command, stream.batch_signed))

    async def _command(
        self, hostname: str, command: CommandEnvelope, batch_signed: bool
    ) -> pb.CommandMessage:
        manifest = None
        if command.upload is not None:
            try:
                manifest = await self._chunks.manifest_for(
                    command.task_id, command.run_id, hostname, command.upload
                )
            except OSError as e:
                raise TransportError(f"cannot read the upload's files: {e}") from e
        return self._signer.command(hostname, command, time.time(), manifest, batch_signed)

    @property
    def command_signatures(self) -> int:
        """Signatures made for commands since the start: one per host, or one per batch of
        a task's runs dispatched together (signer.py)."""
        return self._signer.signatures

    async def send_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        await self._stream(hostname).write(_cancel(task_id, run_id, reason))

    def encode_command(self, hostname: str, command: CommandEnvelope) -> bytes:
        if command.upload is not None:
            # Chunks are served by the instance that read the files (docs/filepush.md): an
            # upload to an agent on another instance would need them there too.
            raise TransportError(
                f"{hostname} is connected to another control-plane instance: uploads to it "
                "are not routed between instances yet (docs/instances.md)"
            )
        # The agent's features are known where its stream is: signed for it alone.
        return self._signer.command(hostname, command, time.time()).SerializeToString()

    def encode_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> bytes:
        return _cancel(task_id, run_id, reason).SerializeToString()

    async def send_encoded(self, hostname: str, data: bytes) -> None:
        stream = self._stream(hostname)
        try:
            message = pb.CommandMessage.FromString(data)
        except DecodeError as e:
            raise ConnectionLost(f"a routed message for {hostname} is not one: {e}") from e
        await stream.write(message)

    async def drop(self, hostname: str, reason: str) -> None:
        stream = self._streams.get(hostname)
        if stream is not None and stream.task is not None:
            log.info("dropping %s: %s", hostname, reason)
            stream.closed = True
            stream.dropped = reason
            stream.task.cancel()

    @property
    def chunks_served(self) -> int:
        """Upload chunks sent to agents since the start (docs/filepush.md)."""
        return self._chunks.chunks_served

    def _stream(self, hostname: str) -> _AgentStream:
        stream = self._streams.get(hostname)
        if stream is None or stream.closed:
            raise NotConnected(f"{hostname} has no live gRPC connection")
        return stream

    async def ConnectForCommands(
        self,
        request_iterator: object,
        context: aio.ServicerContext[pb.CommandMessage, pb.CommandMessage],
    ) -> None:
        assert self._events is not None
        if self._handshakes >= self._max_handshakes:
            # Busy with other hellos: say so at once, and when to come back, rather than let
            # this one wait until the agent gives up.
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many agents connecting at once; retry later",
                trailing_metadata=((RETRY_AFTER_KEY, str(self._retry_after_ms)),),
            )
            return
        self._handshakes += 1
        try:
            accepted = await self._handshake(context)
        finally:
            self._handshakes -= 1
        if accepted is None:
            return
        stream, hello = accepted
        previous = self._streams.get(hello.hostname)
        if previous is not None:
            # The agent reconnected before its old stream was noticed dead: the new one wins
            # (it proved its key on a fresh challenge, so it is the agent, not a replay).
            previous.closed = True
        self._streams[hello.hostname] = stream
        try:
            await stream.write(
                pb.CommandMessage(
                    welcome=pb.Welcome(
                        heartbeat_interval_seconds=max(1, round(self._heartbeat_interval)),
                        metrics_interval_seconds=max(1, round(self._metrics_interval)),
                        server_version="opsplane",
                    )
                )
            )
            await self._read_loop(stream)
        except ConnectionLost:
            pass
        except asyncio.CancelledError:
            # Dropped (revoked, or silent past the heartbeat limit): the RPC must end with a
            # status, or an agent that only stopped answering (frozen, cut off without a FIN)
            # would find its stream still open when it comes back and never say hello again.
            task = asyncio.current_task()
            if not stream.dropped or self._stopping or task is None or task.cancelling() > 1:
                raise
            task.uncancel()
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(stream.dropped)
        finally:
            stream.closed = True
            if self._streams.get(hello.hostname) is stream:
                del self._streams[hello.hostname]
            if not self._stopping and hello.hostname not in self._streams:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._events.host_disconnected(hello.hostname, self.name))

    async def _handshake(
        self, context: aio.ServicerContext[pb.CommandMessage, pb.CommandMessage]
    ) -> tuple[_AgentStream, AgentHello] | None:
        """Challenge, hello, checks, and the engine's decision: the stream to welcome and its
        hello, or None when the stream was refused."""
        assert self._events is not None
        # A fresh nonce per stream, sent before anything is read: the hello must sign it, so
        # a hello captured on the wire opens no other stream. It costs one round trip and no
        # state beyond this coroutine (nothing in the database before the welcome).
        challenge = secrets.token_urlsafe(18)
        try:
            await context.send_initial_metadata(((convert.CHALLENGE_KEY, challenge),))
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no hello within {HELLO_TIMEOUT:g} s"
            )
            return None
        except DecodeError:
            await self._refuse_undecodable(context, "-")
            return None
        if first is _EOF or not isinstance(first, pb.CommandMessage) or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
            return None
        hello = convert.hello_from_pb(first.hello)
        try:
            check_host_name(hello.hostname)
        except InvalidInput as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return None
        if self._tls_client_ca is not None:
            names = _certificate_names(context)
            if hello.hostname not in names:
                log.warning(
                    "refused an agent saying hello as %r with a certificate for %s",
                    hello.hostname,
                    ", ".join(sorted(names)) or "no name",
                )
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the client certificate is not issued to {hello.hostname!r}",
                )
                return None
        refused = await self._hello_refusal(first.hello, challenge)
        if refused is not None:
            reason, why = refused
            log.warning("refused the hello of %r: %s", hello.hostname, why)
            self._events.message_refused(self.name, reason)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
            return None
        try:
            # Decided at once from the engine's in-memory view; the host's row is written
            # in a batch with other hellos after the welcome.
            durable = self._events.host_connecting(hello)
        except NameTaken as e:
            # The name is another link's host (SSH, the control plane's own): not an agent's.
            log.warning("refused the hello of %r: %s", hello.hostname, e)
            self._events.message_refused(self.name, "refused_agent")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            return None
        stream = _AgentStream(
            hello.hostname,
            context,
            task=asyncio.current_task(),
            key=parse_public_key(first.hello.public_key) if first.hello.public_key else None,
            batch_signed=convert.BATCH_SIGNED in first.hello.features,
        )
        durable.add_done_callback(functools.partial(self._recorded, stream))
        stream.registered = durable
        return stream, hello

    def _recorded(self, stream: _AgentStream, durable: asyncio.Future[None]) -> None:
        """The host's connection was written (or not): a name the store gives another link's
        host (another control-plane instance registered it) drops the stream."""
        if durable.cancelled():
            return
        error = durable.exception()
        if isinstance(error, NameTaken):
            log.warning("dropping %s: %s", stream.hostname, error)
            if self._events is not None:
                self._events.message_refused(self.name, "refused_agent")
            stream.closed = True
            stream.dropped = str(error)
            if stream.task is not None:
                stream.task.cancel()
        elif error is not None:
            log.warning("the connection of %s was not recorded: %s", stream.hostname, error)

    async def _hello_refusal(self, message: pb.Hello, challenge: str) -> tuple[str, str] | None:
        """(reason, why) when a hello is refused: its proof (checked on the verifier thread,
        off the event loop), then whether the control plane accepts the agent (not enrolled
        when enrollment is required, revoked, another key than enrolled, groups it was not
        enrolled for)."""
        assert self._events is not None
        if self._verifier is None:
            refused = hello_proof_refusal(message, challenge, time.time())
        else:
            refused = await asyncio.get_running_loop().run_in_executor(
                self._verifier, hello_proof_refusal, message, challenge, time.time()
            )
        if refused is not None:
            return refused
        refusal = self._events.agent_refusal(message.hostname, message.public_key, message.groups)
        return ("refused_agent", refusal) if refusal is not None else None

    async def _read_loop(self, stream: _AgentStream) -> None:
        assert self._events is not None
        host = stream.hostname
        while not stream.closed:
            # A read of a message gRPC has already buffered, and a report ingest takes at once,
            # never suspend: without this, a flooding agent's stream ran hundreds of messages in
            # one step of the event loop (0.2 s under a 1 GiB flood, asyncio debug), and every
            # other stream and the API waited behind it.
            await asyncio.sleep(0)
            try:
                message = await stream.context.read()
            except (aio.AioRpcError, asyncio.InvalidStateError):
                return
            except DecodeError:
                await self._refuse_undecodable(stream.context, host)
                return
            if message is _EOF or not isinstance(message, pb.CommandMessage):
                return
            if stream.registered is not None:
                # Its outcome is _recorded's to handle; only the order matters here.
                await asyncio.wait([stream.registered])
                stream.registered = None
            kind = message.WhichOneof("message")
            # Results are verified one by one; heartbeats are not: the stream is the agent's,
            # proved by its hello's signature over this stream's challenge (docs/scale.md).
            if kind == "command_result" and not await self._signed_by_agent(
                stream, message.command_result
            ):
                continue
            try:
                if kind == "heartbeat":
                    await self._events.report(convert.heartbeat_from_pb(host, message.heartbeat))
                elif kind == "started":
                    await self._events.report(convert.started_from_pb(host, message.started))
                elif kind == "output":
                    await self._events.report(convert.output_from_pb(host, message.output))
                elif kind == "command_result":
                    result = convert.result_from_pb(host, message.command_result)
                    self._chunks.finished(result.run_id or "")
                    self._ack_when_durable(stream, result, await self._events.report(result))
                elif kind == "ack":
                    pass  # the agent got a command; the "started" report follows
                elif kind == "chunk_request":
                    # Off the read loop: a chunk's read and write must not hold the stream.
                    serve = asyncio.create_task(
                        self._chunks.serve(host, message.chunk_request, stream.write)
                    )
                    self._serving.add(serve)
                    serve.add_done_callback(self._served)
                else:
                    self._refuse(host, "unexpected", f"a {kind or 'empty'} message")
            except InvalidInput as e:
                # Not acknowledged: an agent of ours never sends this; a rogue gets nothing.
                self._refuse(host, "malformed", f"{kind}: {e}")

    def _served(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        if not task.cancelled() and isinstance(task.exception(), NotConnected | ConnectionLost):
            log.info("a chunk was not served: %s", task.exception())
        elif not task.cancelled() and task.exception() is not None:
            log.error("serving a chunk failed", exc_info=task.exception())

    async def _refuse_undecodable(
        self, context: aio.ServicerContext[pb.CommandMessage, pb.CommandMessage], host: str
    ) -> None:
        """Bytes that are not a message of the protocol: the stream cannot go on."""
        self._refuse(host, "malformed", "not a CommandMessage (undecodable protobuf)")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a CommandMessage")

    def _refuse(self, host: str, reason: str, why: str) -> None:
        log.warning("refused a message from %s (%s): %s", host, reason, why)
        if self._events is not None:
            self._events.message_refused(self.name, reason)

    async def _signed_by_agent(self, stream: _AgentStream, message: Message) -> bool:
        """Whether a result is signed by the key of the stream's hello (an agent that presented
        no key, an older one, is not held to it)."""
        if stream.key is None:
            return True
        if await self._result_checks.signed(stream.key, message):
            return True
        log.warning("refused a %s from %s: bad signature", type(message).__name__, stream.hostname)
        if self._events is not None:
            self._events.message_refused(self.name, "bad_signature")
        return False

    def _ack_when_durable(
        self, stream: _AgentStream, report: RunFinished, durable: asyncio.Future[None]
    ) -> None:
        # A task only once the result is durable, for the write: one task per result waiting
        # on its batch kept ten thousand alive through a broadcast's ingest (docs/scale.md).
        def written(future: asyncio.Future[None]) -> None:
            if future.cancelled() or self._stopping:
                return
            error = future.exception()
            if error is not None:
                # Not acknowledged: the agent keeps the result and sends it again on reconnect.
                log.warning(
                    "result of run %s from %s not stored: %s", report.run_id, stream.hostname, error
                )
                return
            task = asyncio.create_task(self._ack(stream, report.run_id or ""))
            self._pending_acks.add(task)
            task.add_done_callback(self._pending_acks.discard)

        durable.add_done_callback(written)

    @staticmethod
    async def _ack(stream: _AgentStream, run_id: str) -> None:
        ack = pb.CommandMessage(ack=pb.Ack(run_id=run_id, kind="result"))
        with contextlib.suppress(NotConnected, ConnectionLost):
            await stream.write(ack)


def _signed(key: Ed25519PublicKey, message: Message) -> bool:
    signature = getattr(message, "signature", "")
    return verify(key, {**convert.signed_fields(message), "signature": signature}, "signature")


def _all_signed(checks: list[tuple[Ed25519PublicKey, Message]]) -> list[bool]:
    return [_signed(key, message) for key, message in checks]


class _ResultChecks:
    """Results' Ed25519 signatures checked off the event loop: every result that arrives
    while a batch is being checked joins the next one, and a batch is one call on a thread of
    its own. ``cryptography`` releases the GIL in ``verify`` (measured, docs/scale.md), so the
    check itself runs beside the loop instead of on it (about 145 µs a result, 1.45 s of loop
    time for a 10,000-host broadcast), at one thread hand-over per batch rather than per
    result. A stream waits for its own result's check before it reads on, so its messages keep
    their order. Not started (a link never served): checked inline."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._waiting: list[tuple[Ed25519PublicKey, Message, asyncio.Future[bool]]] = []
        self._checking: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="result-verify")

    def stop(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
            self._checking = None
        for _, _, future in self._waiting:
            future.cancel()
        self._waiting = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def signed(self, key: Ed25519PublicKey, message: Message) -> bool:
        if self._pool is None:
            return _signed(key, message)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, message, future))
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self._check(self._pool))
        return await future

    async def _check(self, pool: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                outcomes = await loop.run_in_executor(
                    pool, _all_signed, [(key, message) for key, message, _ in batch]
                )
            except asyncio.CancelledError:
                for _, _, future in batch:
                    future.cancel()
                raise
            except Exception as e:
                # No result of the batch counts as checked: each stream's read sees the error.
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)


def _cancel(task_id: str, run_id: str, reason: str) -> pb.CommandMessage:
    return pb.CommandMessage(cancel=pb.Cancel(run_id=run_id, task_id=task_id, reason=reason))


def _certificate_names(
    context: aio.ServicerContext[pb.CommandMessage, pb.CommandMessage],
) -> set[str]:
    """The common name and DNS names of the verified client certificate on ``context``."""
    auth = context.auth_context()
    values = [
        *auth.get("x509_common_name", []),
        *auth.get("x509_subject_alternative_name", []),
    ]
    return {v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values}


# A hello older than this (or this far ahead) is refused: a replay, or a clock to fix.
HELLO_MAX_AGE = 300.0


def hello_proof_refusal(message: pb.Hello, challenge: str, now: float) -> tuple[str, str] | None:
    """(reason, why) when a hello does not prove its sender: a signature not made with the key
    it presents, one that answers another stream's challenge (a replay), an old one. Pure: it
    runs on the verifier thread."""
    if not message.public_key:
        return None
    try:
        key = parse_public_key(message.public_key)
    except ValueError as e:
        return "bad_signature", f"the hello's public key: {e}"
    claims = {**convert.hello_claims(message), "signature": message.signature}
    if not verify(key, claims, "signature"):
        return "bad_signature", "the hello is not signed by the key it presents"
    if message.challenge != challenge:
        return "replay", "the hello does not answer this stream's challenge (a replay?)"
    if abs(now - message.timestamp) > HELLO_MAX_AGE:
        return "stale", "the hello is not recent: check the agent's clock"
    return None
