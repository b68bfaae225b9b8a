"""Simulated agents: the seam between the swarm and a link's protocol.

An :class:`AgentSimulator` is one simulated agent that connects, stays connected (reconnecting
like a real agent), and answers commands; :class:`SwarmStats` is what every simulator of one
worker process counts. Only the gRPC protocol is implemented (:class:`GrpcAgent`); an AMQP
simulator is another subclass speaking the RabbitMQ contract (DESIGN §3.2) with the same stats.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import grpc.aio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.agent.grpc_link import retry_after
from opsplane.agent.link import Backoff
from opsplane.security.signing import public_key_text, sign
from opsplane.security.signing_tree import proves
from opsplane.transport.grpc import convert
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc

Mode = Literal["reply", "execute"]

# As a real agent (agent/grpc_link.py): wait this long for the challenge, then the welcome.
WELCOME_TIMEOUT = 30.0
# How long an abandoned command is named in hellos (the real agent: ABANDONED_RETENTION).
ABANDONED_KEPT = 600.0
# Output kept of an executed command, per stream (the swarm is not about output).
_OUTPUT_KEEP = 4096

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # One TCP connection per simulated agent, as real agents have: without this, channels with
    # the same target share one connection (gRPC's global subchannel pool).
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 360_000),
    ("grpc.keepalive_permit_without_calls", 0),
]


@dataclass
class SwarmStats:
    """Counters of one worker process; summed by the orchestrator."""

    connected: int = 0  # welcomed streams open right now
    welcomes: int = 0
    dials: int = 0
    give_ups: int = 0  # no challenge or welcome within WELCOME_TIMEOUT
    shed: int = 0  # refused with RESOURCE_EXHAUSTED (a retry hint honoured)
    errors: Counter[str] = field(default_factory=Counter)
    commands: int = 0
    results: int = 0
    heartbeats: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "welcomes": self.welcomes,
            "dials": self.dials,
            "give_ups": self.give_ups,
            "shed": self.shed,
            "errors": dict(self.errors),
            "commands": self.commands,
            "results": self.results,
            "heartbeats": self.heartbeats,
        }


class AgentSimulator(abc.ABC):
    """One simulated agent. ``run`` connects and serves until cancelled."""

    def __init__(self, name: str, groups: tuple[str, ...], stats: SwarmStats, mode: Mode) -> None:
        self.name = name
        self.groups = groups
        self.stats = stats
        self.mode = mode
        self.key = Ed25519PrivateKey.generate()
        self.public_key = public_key_text(self.key.public_key())
        # Set by ``--record``: every command this agent executes is appended to it, so that a
        # test counts executions on the hosts' side, whatever the control plane says.
        self.record: str | None = None

    def recorded(self, run_id: str, attempt: int) -> None:
        """Append ``NAME RUN_ID ATTEMPT`` to the record file (one ``O_APPEND`` write: lines of
        several worker processes never interleave)."""
        if self.record is None:
            return
        fd = os.open(self.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{self.name} {run_id} {attempt}\n".encode())
        finally:
            os.close(fd)

    @abc.abstractmethod
    async def run(self) -> None:
        """Connect, serve, reconnect; returns only by cancellation."""

    async def outcome(self, command: str, seconds: float) -> tuple[int, str, str, str]:
        """(exit code, stdout, stderr, status) of ``command``: ``true``'s at once in reply
        mode, else the command's own, run by the shell."""
        if self.mode == "reply":
            return 0, "", "", "succeeded"
        process = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(seconds or None):
                out, err = await process.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return -9, "", "", "timed_out"
        code = process.returncode if process.returncode is not None else -1
        text = out.decode(errors="replace")[-_OUTPUT_KEEP:]
        error = err.decode(errors="replace")[-_OUTPUT_KEEP:]
        return code, text, error, "succeeded" if code == 0 else "failed"


class GrpcAgent(AgentSimulator):
    """An agent of the gRPC link (DESIGN §3.1): challenge → signed hello → welcome, signed
    heartbeats at the welcome's interval, ack/started/result for every command, and redial
    with full-jitter backoff, honouring the control plane's retry hint."""

    def __init__(
        self,
        name: str,
        groups: tuple[str, ...],
        stats: SwarmStats,
        mode: Mode,
        *,
        address: str,
    ) -> None:
        super().__init__(name, groups, stats, mode)
        self.address = address
        self._backoff = Backoff(0.5, 30.0)
        self._welcomed = False
        # Commands received and not reported when their stream ended: they are abandoned (as a
        # real agent whose predecessor crashed says), named in every hello for a while (as the
        # real agent's spool keeps them, agent/daemon.py): a welcome does not mean that the
        # control plane has reconciled that hello yet, and the next one may be the one it does.
        self._in_flight: set[str] = set()
        self._abandoned: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            welcomed = False
            hint: float | None = None
            try:
                welcomed = await self._serve_once()
            except grpc.aio.AioRpcError as e:
                # Whether the stream had been welcomed (then it broke) or not (it was refused).
                phase = "stream" if self._welcomed else "handshake"
                self.stats.errors[f"{phase} {e.code().name}: {(e.details() or '')[:60]}"] += 1
                hint = retry_after(e)
                if hint is not None:
                    self.stats.shed += 1
            except TimeoutError:
                self.stats.give_ups += 1
            except (grpc.aio.UsageError, asyncio.InvalidStateError, OSError) as e:
                self.stats.errors[type(e).__name__] += 1
            if welcomed:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            if hint is not None:
                delay = max(delay, hint + self._backoff.jitter(hint))
            await asyncio.sleep(delay)

    async def _serve_once(self) -> bool:
        """One stream from dial to its end; whether it was welcomed. Raises what ended it."""
        self.stats.dials += 1
        channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        welcomed = self._welcomed = False
        try:
            call = pb_grpc.CommandServiceStub(channel).ConnectForCommands()
            try:
                metadata = await asyncio.wait_for(call.initial_metadata(), WELCOME_TIMEOUT)
                if call.done():
                    # Refused before the challenge (shed, unreachable): reading raises the
                    # status with its trailing metadata (the retry hint).
                    await call.read()
                    raise _aio_error(await call.code(), await call.details())
                challenge = (metadata or {}).get(convert.CHALLENGE_KEY) if metadata else None
                await call.write(pb.CommandMessage(hello=self._hello(str(challenge or ""))))
                first = await asyncio.wait_for(call.read(), WELCOME_TIMEOUT)
                if not isinstance(first, pb.CommandMessage) or not first.HasField("welcome"):
                    code = await call.code()
                    raise _aio_error(code, await call.details())
                welcomed = self._welcomed = True
                self.stats.welcomes += 1
                self.stats.connected += 1
                try:
                    await self._serve(call, float(first.welcome.heartbeat_interval_seconds or 10))
                finally:
                    self.stats.connected -= 1
            finally:
                call.cancel()
        finally:
            await channel.close(None)
        return welcomed

    def _hello(self, challenge: str) -> pb.Hello:
        hello = pb.Hello(
            hostname=self.name,
            version="swarm",
            groups=list(self.groups),
            public_key=self.public_key,
            timestamp=time.time(),
            challenge=challenge,
            features=[convert.BATCH_SIGNED],
            abandoned_run_ids=self._still_abandoned(),
        )
        hello.signature = sign(self.key, convert.hello_claims(hello))
        return hello

    def _still_abandoned(self) -> list[str]:
        horizon = time.monotonic() - ABANDONED_KEPT
        self._abandoned = {run: at for run, at in self._abandoned.items() if at > horizon}
        return sorted(self._abandoned)

    async def _serve(
        self,
        call: grpc.aio.StreamStreamCall[pb.CommandMessage, pb.CommandMessage],
        interval: float,
    ) -> None:
        lock = asyncio.Lock()

        async def send(message: pb.CommandMessage) -> None:
            async with lock:
                await call.write(message)

        beats = asyncio.create_task(self._heartbeats(send, interval))
        commands: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await call.read()
                if not isinstance(message, pb.CommandMessage):
                    return
                if message.HasField("command_content"):
                    self.stats.commands += 1
                    if not self._bound_here(message.command_content):
                        self.stats.errors["refused: not bound to this host"] += 1
                        continue
                    task = asyncio.create_task(self._command(send, message.command_content))
                    commands.add(task)
                    task.add_done_callback(commands.discard)
        finally:
            beats.cancel()
            for task in commands:
                task.cancel()
            now = time.monotonic()
            self._abandoned.update(dict.fromkeys(self._in_flight, now))
            self._in_flight.clear()

    def _bound_here(self, cmd: pb.CommandContent) -> bool:
        """The agent's binding checks (agent/grpc_link.py): the signed ``target`` is this host
        and, for a command signed once for a batch, its leaf leads to the signed root. The
        signature itself is not checked here: the swarm holds no control-plane key for gRPC."""
        if cmd.target != self.name:
            return False
        return not cmd.run_root or proves(
            cmd.run_root, cmd.target, cmd.run_id, cmd.run_index, cmd.run_path
        )

    async def _heartbeats(self, send: Any, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            beat = pb.Heartbeat(hostname=self.name, status="online", timestamp=time.time())
            beat.signature = sign(self.key, convert.signed_fields(beat))
            await send(pb.CommandMessage(heartbeat=beat))
            self.stats.heartbeats += 1

    async def _command(self, send: Any, cmd: pb.CommandContent) -> None:
        self.recorded(cmd.run_id, cmd.attempt)
        self._in_flight.add(cmd.run_id)
        await send(pb.CommandMessage(ack=pb.Ack(run_id=cmd.run_id, kind="command")))
        started = time.time()
        await send(
            pb.CommandMessage(
                started=pb.Started(
                    run_id=cmd.run_id, task_id=cmd.task_id, started_at=started, pid=1
                )
            )
        )
        code, out, err, status = await self.outcome(cmd.command, float(cmd.timeout))
        finished = time.time()
        result = pb.CommandResult(
            task_id=cmd.task_id,
            run_id=cmd.run_id,
            attempt=cmd.attempt,
            status=status,
            exit_code=code,
            stdout=out,
            stderr=err,
            started_at=started,
            finished_at=finished,
            duration_ms=int((finished - started) * 1000),
            timestamp=finished,
            hostname=self.name,
        )
        result.signature = sign(self.key, convert.signed_fields(result))
        await send(pb.CommandMessage(command_result=result))
        self._in_flight.discard(cmd.run_id)
        self.stats.results += 1


def _aio_error(code: grpc.StatusCode, details: str | None) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
