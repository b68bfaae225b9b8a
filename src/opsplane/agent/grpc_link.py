"""The agent's end of the gRPC link (DESIGN §3.1): dial, say hello, beat, read, redial.

The agent dials ``CommandService.ConnectForCommands`` and keeps that one stream open. The
first message up is ``hello``; the control plane answers ``welcome``; from then on commands
and cancels come down and acks, started/output/result messages and heartbeats go up. When
the stream breaks the agent dials again after an exponentially growing, fully jittered delay,
so that a fleet cut off at once does not come back as a connect storm. What the stream
carries is decided by a :class:`LinkHandler` (the daemon); this module only moves messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio

from opsplane.agent import metrics
from opsplane.agent.config import AgentConfig
from opsplane.agent.link import Backoff as Backoff
from opsplane.agent.link import LinkHandler as LinkHandler
from opsplane.security.signing import load_public_key, verify
from opsplane.security.signing_tree import proves
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.convert import CHALLENGE_KEY, command_claims

logger = logging.getLogger(__name__)

# How long to wait for the challenge, then for the welcome. The control plane answers a busy
# moment with RESOURCE_EXHAUSTED and a retry hint, so a long wait means it is unreachable or
# overloaded, not queueing us: long enough for a loaded control plane, short enough to redial.
WELCOME_TIMEOUT: Final = 30.0
# Trailing metadata of a RESOURCE_EXHAUSTED refusal: milliseconds to wait before dialing again.
RETRY_AFTER_KEY: Final = "opsplane-retry-after-ms"
# A hint is honoured up to this long (a control plane cannot park an agent for hours).
MAX_RETRY_AFTER: Final = 60.0
# Why commands are refused (counted by reason, as on the RabbitMQ link).
BAD_SIGNATURE: Final = "bad_signature"
STALE: Final = "stale"
WRONG_TARGET: Final = "wrong_target"
REFUSAL_REASONS: Final = (BAD_SIGNATURE, STALE, WRONG_TARGET)
DEFAULT_HEARTBEAT_INTERVAL: Final = 10.0
# A droppable message is given up when the stream does not take it within this long.
OUTPUT_SEND_TIMEOUT: Final = 5.0

_CHANNEL_OPTIONS: Final[list[tuple[str, Any]]] = [
    # A dead peer must not keep the stream "open" for the ~15 minutes TCP takes to notice.
    # gRPC servers by default refuse pings more often than every 5 minutes (GOAWAY
    # too_many_pings), so stay just above that.
    ("grpc.keepalive_time_ms", 360_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # Reconnecting is ours to pace (with jitter); a fresh channel per attempt must not add
    # gRPC's own backoff on top.
    ("grpc.enable_retries", 0),
]


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    """The seconds a RESOURCE_EXHAUSTED refusal asks to wait (bounded), or None."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    # grpc.aio.Metadata iterates as (key, value) pairs (the stubs describe the sync API's).
    metadata: Any = error.trailing_metadata()
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return min(MAX_RETRY_AFTER, max(0.0, int(value) / 1000))
            except (TypeError, ValueError):
                return None
    return None


class _StreamClosed(Exception):
    """The stream ended in a way that is not a gRPC error."""


class GrpcLink:
    """One agent's connection to the control plane, re-established forever until cancelled."""

    def __init__(
        self,
        config: AgentConfig,
        handler: LinkHandler,
        *,
        host_metrics: Callable[[], dict[str, float]] = metrics.snapshot,
    ) -> None:
        self._config = config
        self._handler = handler
        # Pinned at enrollment (or given): commands must then be signed with it.
        self._control_plane_key = (
            load_public_key(config.control_plane_key) if config.control_plane_key else None
        )
        self._host_metrics = host_metrics
        # From the welcome: > 0 when the control plane takes the stream as our liveness, and
        # heartbeats only carry metrics, this often or on a significant change.
        self._metrics_every = 0.0
        self._backoff = Backoff(config.reconnect_initial, config.reconnect_max)
        self._call: grpc.aio.StreamStreamCall[pb.CommandMessage, pb.CommandMessage] | None = None
        self._write_lock = asyncio.Lock()
        self._stalled: asyncio.Future[bool] | None = None
        self._credentials: grpc.ChannelCredentials | None = None
        # Whether the latest attempt got as far as the welcome (then backoff starts afresh).
        self._last_attempt_welcomed = False
        # Several control-plane instances (``--server A,B``): each attempt dials the next one,
        # so that an agent whose instance died is welcomed by another on its next try.
        self._servers = config.servers
        self._attempts = 0
        self._refusals: Counter[str] = Counter(dict.fromkeys(REFUSAL_REASONS, 0))

    @property
    def refusals(self) -> Counter[str]:
        """Commands refused so far, by reason (a copy)."""
        return Counter(self._refusals)

    @property
    def connected(self) -> bool:
        """Whether a welcomed stream is open right now."""
        return self._call is not None

    @property
    def confirms_delivery(self) -> bool:
        """False: a written message may still be lost with the stream (nothing acks output)."""
        return False

    async def send(self, message: pb.CommandMessage, *, droppable: bool = False) -> bool:
        """Write ``message`` on the open stream; False if it could not be (no stream, broken).

        Writes are serialized. A ``droppable`` message (live output) is given up after
        :data:`OUTPUT_SEND_TIMEOUT`, and while such a write is still stuck further droppable
        messages are dropped at once; others wait for the stream to take them or to break.
        """
        call = self._call
        if call is None:
            return False
        if droppable and self._stalled is not None and not self._stalled.done():
            return False
        # The write runs in its own task: a caller cancelled mid-write must not cancel the
        # gRPC call, which would tear down the whole stream.
        write = asyncio.ensure_future(self._write(call, message))
        write.add_done_callback(_retrieve)
        done, _ = await asyncio.wait({write}, timeout=OUTPUT_SEND_TIMEOUT if droppable else None)
        if not done:
            self._stalled = write
            return False
        return not write.cancelled() and write.result()

    async def run(self) -> None:
        """Connect, serve the stream, and reconnect after failures; returns only by cancellation."""
        while True:
            hint: float | None = None
            try:
                await self._serve_once()
                reason = "the control plane closed the stream"
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
                hint = retry_after(exc)
            except TimeoutError:
                reason = f"no welcome within {WELCOME_TIMEOUT:g}s"
            except (_StreamClosed, asyncio.InvalidStateError, grpc.aio.UsageError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            except asyncio.CancelledError:
                if _really_cancelled():
                    raise
                reason = "the stream was cancelled"
            except Exception as exc:
                # A bug in handling one message must not end the daemon; the stream is
                # rebuilt and the spool makes sure nothing is lost or run twice.
                logger.exception("link to %s failed unexpectedly", self.server)
                reason = f"unexpected {type(exc).__name__}"
            if self._last_attempt_welcomed:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            if hint is not None:
                # The control plane is busy and said when to come back: then, spread over as
                # long again so that the refused do not all return at the same instant.
                delay = max(delay, hint + self._backoff.jitter(hint))
            logger.warning(
                "%s %s: %s; reconnecting in %.2fs",
                "lost the control plane at" if self._last_attempt_welcomed else "cannot reach",
                self.server,
                reason,
                delay,
            )
            self._attempts += 1
            await asyncio.sleep(delay)

    @property
    def server(self) -> str:
        """The control-plane instance this attempt dials (or the open stream is on)."""
        return self._servers[self._attempts % len(self._servers)]

    async def _serve_once(self) -> None:
        """One connection from dial to the end of its stream."""
        self._last_attempt_welcomed = False
        channel = self._open_channel()
        try:
            stub = pb_grpc.CommandServiceStub(channel)
            call: grpc.aio.StreamStreamCall[pb.CommandMessage, pb.CommandMessage]
            call = stub.ConnectForCommands()
            try:
                interval = await self._handshake(call)
                self._stalled = None
                self._call = call
                logger.info("connected to %s as %s", self.server, self._config.name)
                await self._serve(call, interval)
            finally:
                self._call = None
                call.cancel()
        finally:
            # Closing can be cut short by a second cancellation; the channel is gone with us.
            await channel.close(None)

    async def _handshake(
        self, call: grpc.aio.StreamStreamCall[pb.CommandMessage, pb.CommandMessage]
    ) -> float:
        """Wait for the server's challenge, say hello answering it, wait for the welcome;
        returns the heartbeat interval the welcome asks for."""
        metadata = await asyncio.wait_for(call.initial_metadata(), WELCOME_TIMEOUT)
        if call.done():
            # It failed before the server said anything (unreachable, TLS refused, busy):
            # reading raises the status with its trailing metadata (a retry hint); else say why.
            await call.read()
            code, details = await call.code(), await call.details()
            raise _StreamClosed(f"{code.name}: {details}")
        challenge = metadata.get(CHALLENGE_KEY) if metadata is not None else None
        hello = self._handler.hello(challenge if isinstance(challenge, str) else "")
        await call.write(pb.CommandMessage(hello=hello))
        first = await asyncio.wait_for(call.read(), WELCOME_TIMEOUT)
        if not isinstance(first, pb.CommandMessage):
            raise _StreamClosed("the control plane closed the stream before welcoming us")
        kind = first.WhichOneof("message")
        if kind != "welcome":
            raise _StreamClosed(f"expected welcome, the control plane sent {kind}")
        self._last_attempt_welcomed = True
        self._metrics_every = float(first.welcome.metrics_interval_seconds)
        interval = float(first.welcome.heartbeat_interval_seconds)
        return interval if interval > 0 else DEFAULT_HEARTBEAT_INTERVAL

    async def _serve(
        self,
        call: grpc.aio.StreamStreamCall[pb.CommandMessage, pb.CommandMessage],
        heartbeat_interval: float,
    ) -> None:
        """Read messages until the stream ends, beating and re-sending results alongside."""
        # Re-sending runs alongside the read loop, not before it: re-sending many results
        # while not reading the control plane's acks could fill both flow-control windows.
        helpers = {
            asyncio.create_task(self._heartbeats(heartbeat_interval), name="agent-heartbeat"),
            asyncio.create_task(self._on_connected(), name="agent-resend"),
        }
        try:
            while True:
                message = await call.read()
                if not isinstance(message, pb.CommandMessage):
                    return  # end of stream with status OK
                if message.HasField("command_content"):
                    refusal = self._command_refusal(message.command_content)
                    if refusal is not None:
                        reason, why = refusal
                        self._refusals[reason] += 1
                        logger.warning(
                            "refused the command for run %s (%s): %s",
                            message.command_content.run_id[:80],
                            reason,
                            why,
                        )
                        continue
                await self._handler.on_message(message)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.wait(helpers)

    def _command_refusal(self, cmd: pb.CommandContent) -> tuple[str, str] | None:
        """(reason, why) a command is refused: not signed with the pinned control plane key,
        addressed to another host (its signed ``target``, or for a command signed once for a
        batch, a ``target`` and ``run_id`` whose leaf does not lead to the signed
        ``run_root``), or outside the replay window.
        None: hand it on (without a pinned key, as for agents that never enrolled, nothing is
        checked; the spool refuses a run id seen before either way)."""
        if self._control_plane_key is None:
            return None
        if not verify(self._control_plane_key, {**command_claims(cmd), "sign": cmd.sign}, "sign"):
            return BAD_SIGNATURE, "it is not signed by the pinned control plane key"
        if cmd.target != self._config.name:
            return WRONG_TARGET, f"it is addressed to {cmd.target[:80]!r}, not to this host"
        if cmd.run_root and not proves(
            cmd.run_root, cmd.target, cmd.run_id, cmd.run_index, cmd.run_path
        ):
            return WRONG_TARGET, "its run id and target are not among those it was signed for"
        skew = time.time() - cmd.timestamp
        if abs(skew) > self._config.replay_window:
            window = self._config.replay_window
            return STALE, f"its timestamp is {skew:+.0f}s off (window ±{window:g}s)"
        return None

    async def _on_connected(self) -> None:
        try:
            await self._handler.on_connected()
        except Exception:
            # The next welcome tries again; the stream itself may be fine.
            logger.exception("re-sending spooled results failed")

    async def _heartbeats(self, interval: float) -> None:
        """Beat every ``interval``; or, when the control plane takes the stream as the liveness
        (``metrics_interval_seconds`` in the welcome), look at the figures every ``interval``
        and send them only every ``metrics_every`` or when one changed significantly."""
        config = self._config
        sent: dict[str, float] | None = None
        sent_at = 0.0
        while True:
            figures = self._host_metrics()
            now = time.monotonic()
            if (
                self._metrics_every <= 0
                or sent is None
                # Half an interval early rather than a whole one late.
                or now - sent_at >= self._metrics_every - interval / 2
                or metrics.changed_significantly(sent, figures)
            ):
                beat = pb.Heartbeat(
                    hostname=config.name,
                    status="online",
                    timestamp=time.time(),
                    cpu_usage=figures.get("cpu_usage", 0.0),
                    memory_usage=figures.get("memory_usage", 0.0),
                    load=figures.get("load", 0.0),
                    disk_usage=figures.get("disk_usage", 0.0),
                )
                beat.signature = self._handler.signature(beat)
                await self.send(pb.CommandMessage(heartbeat=beat))
                sent, sent_at = figures, now
            await asyncio.sleep(interval)

    async def _write(
        self,
        call: grpc.aio.StreamStreamCall[pb.CommandMessage, pb.CommandMessage],
        message: pb.CommandMessage,
    ) -> bool:
        try:
            async with self._write_lock:
                if self._call is not call:
                    return False
                await call.write(message)
            return True
        except asyncio.CancelledError:
            # The call was cancelled (stream torn down), not this task: that is "not sent".
            if _really_cancelled():
                raise
            return False
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            logger.debug("write to %s failed: %s", self.server, exc)
            return False

    def _open_channel(self) -> grpc.aio.Channel:
        # A fresh channel per attempt: our backoff alone paces reconnects, and no state of
        # a broken connection leaks into the next one.
        config = self._config
        if config.tls_ca is None:
            return grpc.aio.insecure_channel(self.server, options=_CHANNEL_OPTIONS)
        if self._credentials is None:
            # Only ``tls_ca`` is trusted, not the system's CAs: the agent pins the control
            # plane's own CA (docs/tls.md).
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(config.tls_ca),
                private_key=_read(config.tls_key) if config.tls_key else None,
                certificate_chain=_read(config.tls_cert) if config.tls_cert else None,
            )
        options = list(_CHANNEL_OPTIONS)
        if config.tls_server_name:
            # The certificate is checked for this name instead of the host dialed (an agent
            # reaching the control plane by an address its certificate does not list).
            options.append(("grpc.ssl_target_name_override", config.tls_server_name))
        return grpc.aio.secure_channel(self.server, self._credentials, options=options)


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _really_cancelled() -> bool:
    """Whether the current task itself is being cancelled (not just a gRPC call under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _retrieve(future: asyncio.Future[bool]) -> None:
    # Nobody may be waiting for a write that outlived its caller; reading its outcome keeps
    # asyncio from reporting "exception was never retrieved".
    if not future.cancelled():
        future.exception()
