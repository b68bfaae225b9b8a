"""The agent daemon: runs the commands the control plane sends and reports what they did.
Past the house's 500 lines: the guarantees below are kept by one class's state (spool, running
commands, policy) and are easier to check in one file; the links and the spool are apart.

Guarantees, resting on the spool (``spool.py``):

* a command is executed at most once per run id, across reconnects, redeliveries and restarts;
* every result is kept on disk until the control plane acknowledges it, and re-sent on every
  reconnect until then;
* so is the output of a run (``outbox.py``, up to ``output_spool_bytes``): sent in order,
  re-sent after a reconnect, and always before the run's result;
* a run outlives the stream it came on: a broken connection does not touch running commands;
* what the agent's own policy (``policy.py``) refuses never starts, and the rest runs as its
  ``run_as`` user;
* nothing is left behind: on shutdown running commands are cancelled (their whole process
  group) and their results spooled; after a crash, leftovers of interrupted runs are killed at
  the next start and those runs abandoned (the control plane reports them ``lost``).

The link is gRPC (``grpc_link.py``) or, with ``amqp_url``, RabbitMQ (``amqp_link.py``); both
speak ``pb.CommandMessage`` to the daemon, so nothing here depends on which one it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Protocol

import psutil
from google.protobuf.message import Message

from opsplane.agent.config import AgentConfig
from opsplane.agent.files import FileReceiver, PushResult, sweep_parts
from opsplane.agent.outbox import Connections, OutputJournal, RunOutput
from opsplane.agent.policy import CommandPolicy, RunAsRefused, working_dir
from opsplane.agent.spool import Spool
from opsplane.domain.errors import InvalidInput
from opsplane.execution import Outcome, ProcessResult, ProcessRun, Stream
from opsplane.security.signing import (
    load_or_create_private_key,
    public_key_text,
    sign,
)
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc.convert import BATCH_SIGNED, hello_claims, signed_fields

logger = logging.getLogger(__name__)

DONE_RETENTION: Final = timedelta(days=7)
# Acknowledged results still listed as finished in a hello. On RabbitMQ the acknowledgement
# is the broker's confirm, not the control plane's commit: a result may sit in cmd.result
# for a while, and the control plane must not take its run for one the agent never had.
RECENTLY_FINISHED: Final = timedelta(minutes=10)
# Abandoned runs listed in hellos: long enough to outlive a predecessor that crashed again
# before it could report them, short enough to keep hellos small.
ABANDONED_RETENTION: Final = timedelta(days=1)
_PRUNE_EVERY: Final = 3600.0
# On shutdown a cancelled command gets kill_grace to go (SIGTERM, then SIGKILL) plus this much
# for its output to drain and its result to be spooled, before its task is cut short.
_SHUTDOWN_SLACK: Final = 5.0
_CREATE_TIME_TOLERANCE: Final = 0.05

DEADLINE_PASSED: Final = "delivery deadline passed before the agent received the command"


class _Link(Protocol):
    """What the daemon needs of a link (gRPC or RabbitMQ)."""

    @property
    def connected(self) -> bool: ...

    @property
    def confirms_delivery(self) -> bool: ...

    async def send(self, message: pb.CommandMessage, *, droppable: bool = False) -> bool: ...

    async def run(self) -> None: ...


@dataclass(eq=False)
class _Run:
    """The little an agent keeps in memory about a run while it executes."""

    run_id: str
    task_id: str
    attempt: int
    process: ProcessRun | None = None
    task: asyncio.Task[None] | None = None
    output: RunOutput | None = None


class Agent:
    """One agent daemon: a link to the control plane, a spool, and the running commands."""

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._spool = Spool(config.state_dir)
        self._journal = OutputJournal(config.state_dir / "output", config.output_spool_bytes)
        self._connections = Connections()
        # Output of runs running, or finished with a result not yet acknowledged.
        self._outputs: dict[str, RunOutput] = {}
        # The agent's own identity: it signs results and heartbeats (DESIGN §3.3).
        key_path = config.state_dir / "agent.key"
        self._key, created = load_or_create_private_key(key_path)
        self._public_key = public_key_text(self._key.public_key())
        if created:
            logger.info("created agent key %s (public key %s)", key_path, self._public_key)
        self._policy = CommandPolicy(config.deny, config.allow)
        self._run_as_policy = config.run_as_policy()
        self._refusals_of: Callable[[], Counter[str]]
        self._link: _Link
        if config.amqp_url is None:
            # Imported here, like the AMQP link below: an agent loads only its own link.
            from opsplane.agent.grpc_link import GrpcLink

            grpc_link = GrpcLink(config, self)
            self._refusals_of = lambda: grpc_link.refusals
            self._link = grpc_link
        else:
            # Imported here: aio-pika is an optional extra, not needed by gRPC agents.
            from opsplane.agent.amqp_link import AmqpLink

            amqp = AmqpLink(config, self, signing_key=self._key)
            self._refusals_of = lambda: amqp.refusals
            self._link = amqp
        self._running: dict[str, _Run] = {}
        # Uploads: the chunks runs asked for, checked against their manifests (agent/files.py).
        self._files = FileReceiver(config.upload_roots, self._request_chunks)
        self._abandoned: list[str] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self._last_prune = 0.0

    @property
    def config(self) -> AgentConfig:
        """The settings this agent runs with."""
        return self._config

    @property
    def connected(self) -> bool:
        """Whether the agent is connected to (and welcomed by) the control plane."""
        return self._link.connected

    @property
    def running_run_ids(self) -> list[str]:
        """Runs executing right now."""
        return list(self._running)

    @property
    def public_key(self) -> str:
        """The agent's Ed25519 public key (base64), as it sends it in hellos and heartbeats."""
        return self._public_key

    @property
    def refusals(self) -> Counter[str]:
        """Commands refused so far, by reason (a copy)."""
        return Counter(self._refusals_of())

    def request_stop(self) -> None:
        """Make :meth:`run` cancel running commands, spool their results and return.

        Call it from the event loop's thread (e.g. from a ``loop.add_signal_handler`` callback).
        """
        self._stop.set()

    async def run(self) -> None:
        """Serve until :meth:`request_stop` (then return) or cancellation (then re-raise).

        Either way running commands are cancelled with a bounded wait, so that no process
        outlives the agent, and their results are spooled for the next start.
        """
        self._spool.lock()
        try:
            self._reap_interrupted()
            self._load_outputs()
            # Also those of an earlier crash that a predecessor may not have got to report.
            self._abandoned = self._spool.recently_abandoned(ABANDONED_RETENTION)
            self._prune()
            sweep = asyncio.create_task(self._sweep_parts(), name="agent-sweep-parts")
            link_task = asyncio.create_task(self._link.run(), name="agent-link")
            stop_task = asyncio.create_task(self._stop.wait(), name="agent-stop")
            try:
                await asyncio.wait({link_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_task.cancel()
                sweep.cancel()
                link_failed = link_task.done()
                await self._shutdown(link_task)
            if link_failed:
                link_task.result()  # the link only ends by a bug: let it be seen
        finally:
            self._spool.unlock()

    async def _sweep_parts(self) -> None:
        """Delete what uploads interrupted long ago left behind (docs/filepush.md)."""
        roots, max_age = self._config.upload_roots, self._config.upload_part_max_age
        if not roots:
            return
        try:
            removed = await asyncio.to_thread(sweep_parts, roots, max_age)
        except OSError as exc:
            logger.warning("could not sweep old upload parts: %s", exc)
            return
        for path in removed:
            logger.info("deleted %s: an upload interrupted over %g s ago", path, max_age)

    # -- LinkHandler ---------------------------------------------------------------------

    def hello(self, challenge: str = "") -> pb.Hello:
        """The ``pb.Hello`` this agent opens every stream (or AMQP connection) with; on gRPC
        its signature covers the server's ``challenge`` for that stream.

        ``finished_run_ids`` holds the results about to be re-sent and, for
        :data:`RECENTLY_FINISHED`, results already acknowledged (see there why).
        """
        config = self._config
        pending = [str(r.get("run_id", "")) for r in self._spool.pending_results()]
        try:
            recent = self._spool.recently_acknowledged(RECENTLY_FINISHED)
        except OSError as exc:
            logger.warning("cannot list recently finished runs: %s", exc)
            recent = []
        hello = pb.Hello(
            hostname=config.name,
            version=config.version,
            groups=list(config.groups),
            labels=config.labels,
            os=platform.platform(),
            running_run_ids=list(self._running),
            finished_run_ids=list(dict.fromkeys(pending + recent)),
            abandoned_run_ids=self._abandoned,
            public_key=self._public_key,
            timestamp=time.time(),
            challenge=challenge,
            features=[BATCH_SIGNED],
        )
        # Proves this agent holds the key it presents (an enrolled name is bound to its key),
        # now: the challenge is fresh for each stream.
        hello.signature = sign(self._key, hello_claims(hello))
        return hello

    def already_seen(self, run_id: str) -> bool:
        """Whether ``run_id`` was accepted here before (raises InvalidInput if not a run id)."""
        return self._spool.seen(run_id)

    async def on_connected(self) -> None:
        """Re-send the output and results the control plane may not have yet."""
        self._connections.reconnected()
        # Chunks asked on the old stream are lost with it: ask them again now (resume).
        self._files.reconnected()
        for run in self._running.values():
            if run.output is not None:
                run.output.wake()
        for payload in self._spool.pending_results():
            if not await self._send_result(payload):
                return  # the stream broke again; the next welcome retries

    async def _send_result(self, payload: dict[str, Any]) -> bool:
        """Send a finished run's result, after whatever of its output may not have arrived."""
        output = self._outputs.get(str(payload.get("run_id", "")))
        if output is not None and not await output.drain():
            return False
        return await self._link.send(self._result_message(payload))

    async def on_message(self, message: pb.CommandMessage) -> None:
        """Act on one message from the control plane."""
        kind = message.WhichOneof("message")
        if kind == "command_content":
            await self._on_command(message.command_content)
        elif kind == "file_chunk":
            self._files.on_chunk(message.file_chunk)
        elif kind == "cancel":
            self._on_cancel(message.cancel.run_id, message.cancel.reason)
        elif kind == "ack":
            if message.ack.kind == "result":
                self._on_result_ack(message.ack.run_id)
        else:
            logger.debug("ignoring a %s message from the control plane", kind)

    # -- commands ------------------------------------------------------------------------

    def signature(self, message: Message) -> str:
        """This agent's signature of a result or heartbeat it sends over gRPC."""
        return sign(self._key, signed_fields(message))

    def _result_message(self, payload: dict[str, Any]) -> pb.CommandMessage:
        fields = {k: payload[k] for k in _RESULT_FIELDS if payload.get(k) is not None}
        result = pb.CommandResult(**fields)
        result.signature = self.signature(result)
        return pb.CommandMessage(command_result=result)

    async def _on_command(self, cmd: pb.CommandContent) -> None:
        run_id = cmd.run_id
        if self._stopping:
            logger.info("shutting down; command for run %s not accepted", run_id)
            return
        try:
            accepted = self._spool.accept(
                run_id, cmd.task_id, {"attempt": cmd.attempt, "sent_at": cmd.timestamp}
            )
        except InvalidInput:
            logger.warning("refused a command with an invalid run id %r", run_id[:80])
            return
        except OSError as exc:
            # Without a durable record a restart could run it again: better not at all.
            logger.error("cannot record run %s in the spool, not running it: %s", run_id, exc)
            return
        if not accepted:
            await self._on_duplicate(run_id)
            return
        self._maybe_prune()
        await self._send_ack(run_id)

        run = _Run(run_id=run_id, task_id=cmd.task_id, attempt=cmd.attempt)
        if cmd.deliver_by > 0 and time.time() > cmd.deliver_by:
            await self._report(
                run, _synthetic(run, self._config, Outcome.UNDELIVERABLE, DEADLINE_PASSED)
            )
            return
        if cmd.HasField("manifest"):
            # An upload: no command runs; the upload roots, not the command policy, govern it.
            self._running[run_id] = run
            run.task = asyncio.create_task(self._upload(run, cmd), name=f"upload-{run_id}")
            return
        refusal = self._policy.refusal(cmd.command)
        if refusal is not None:
            logger.warning("run %s (task %s) %s", run_id, cmd.task_id, refusal)
            await self._report(run, _synthetic(run, self._config, Outcome.FAILED, refusal))
            return
        try:
            run_as = self._run_as_policy.identity_for(cmd.user)
        except RunAsRefused as exc:
            logger.warning("run %s (task %s) %s", run_id, cmd.task_id, exc)
            await self._report(run, _synthetic(run, self._config, Outcome.FAILED, str(exc)))
            return
        try:
            run.process = ProcessRun(
                cmd.command,
                timeout=cmd.timeout or None,
                env=dict(cmd.env),
                cwd=working_dir(run_as) if run_as is not None else None,
                run_as=run_as,
                env_passthrough=self._config.env_passthrough,
                kill_grace=self._config.kill_grace,
                output_cap=self._config.output_cap,
                on_started=lambda pid: self._on_started(run, pid),
                on_output=lambda stream, data: self._on_output(run, stream, data),
            )
        except InvalidInput as exc:
            await self._report(run, _synthetic(run, self._config, Outcome.FAILED, str(exc)))
            return
        run.output = self._outputs[run_id] = RunOutput(
            run_id, cmd.task_id, self._journal, self._link, self._connections
        )
        self._running[run_id] = run
        run.task = asyncio.create_task(self._execute(run), name=f"run-{run_id}")
        logger.info("run %s (task %s) started", run_id, run.task_id)

    async def _on_duplicate(self, run_id: str) -> None:
        if run_id in self._running:
            # Redelivered while running: the first ack may have been lost with a stream.
            await self._send_ack(run_id)
            return
        payload = self._spool.pending_result(run_id)
        if payload is not None:
            await self._send_result(payload)
            return
        logger.info("run %s was already handled here; duplicate command ignored", run_id)

    def _on_cancel(self, run_id: str, reason: str) -> None:
        run = self._running.get(run_id)
        if run is None or run.process is None:
            logger.info("cancel for run %s, which is not running here; ignored", run_id)
            return
        logger.info("cancelling run %s%s", run_id, f": {reason}" if reason else "")
        run.process.cancel()

    def _on_result_ack(self, run_id: str) -> None:
        try:
            self._spool.acknowledge(run_id)
        except InvalidInput:
            logger.warning("result ack with an invalid run id %r ignored", run_id[:80])
            return
        except OSError as exc:
            logger.error("cannot record the ack of run %s: %s", run_id, exc)
            return
        # The result came after the output: the control plane has both.
        output = self._outputs.pop(run_id, None)
        if output is not None:
            output.cancel()
            self._journal.discard(run_id)

    async def _execute(self, run: _Run) -> None:
        assert run.process is not None
        try:
            result = await run.process.run()
            payload = _payload(run, self._config, result)
        except asyncio.CancelledError:
            # Cut short on shutdown: ProcessRun killed the group before re-raising.
            if run.output is not None:
                run.output.end()
            self._spool_result(
                run, _synthetic(run, self._config, Outcome.CANCELED, "the agent stopped")
            )
            raise
        except Exception as exc:
            logger.exception("run %s failed inside the agent", run.run_id)
            payload = _synthetic(run, self._config, Outcome.FAILED, f"agent error: {exc}")
        finally:
            self._running.pop(run.run_id, None)
        logger.info("run %s %s", run.run_id, payload["status"])
        await self._report(run, payload)

    async def _upload(self, run: _Run, cmd: pb.CommandContent) -> None:
        started = time.time()
        await self._link.send(
            pb.CommandMessage(
                started=pb.Started(run_id=run.run_id, task_id=run.task_id, started_at=started)
            )
        )
        outcome = Outcome.SUCCEEDED
        try:
            async with asyncio.timeout(cmd.timeout or None):
                result = await self._files.push(run.run_id, run.task_id, cmd.manifest)
        except TimeoutError:
            result = PushResult(error=f"timed out after {cmd.timeout} s")
            outcome = Outcome.TIMED_OUT
        except asyncio.CancelledError:
            self._running.pop(run.run_id, None)
            self._spool_result(
                run, _synthetic(run, self._config, Outcome.CANCELED, "the agent stopped")
            )
            raise
        except Exception as exc:
            logger.exception("upload of run %s failed inside the agent", run.run_id)
            result = PushResult(error=f"agent error: {exc}")
        finally:
            self._running.pop(run.run_id, None)
        error = result.summary()
        if error is not None and outcome is Outcome.SUCCEEDED:
            outcome = Outcome.FAILED
        now = time.time()
        payload = {
            **_synthetic(run, self._config, outcome, error or ""),
            "exit_code": 0 if outcome is Outcome.SUCCEEDED else None,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "started_at": started,
            "finished_at": now,
            "duration_ms": int((now - started) * 1000),
        }
        logger.info(
            "upload %s: %d written, %d unchanged, %d failed",
            run.run_id,
            len(result.written),
            len(result.unchanged),
            len(result.failed),
        )
        await self._report(run, payload)

    async def _request_chunks(self, request: pb.ChunkRequest) -> bool:
        return await self._link.send(pb.CommandMessage(chunk_request=request))

    async def _report(self, run: _Run, payload: dict[str, Any]) -> None:
        """Spool the result (first: it must survive us), then send it if connected, after
        the run's output."""
        if run.output is not None:
            run.output.end()
        self._spool_result(run, payload)
        await self._send_result(payload)

    def _spool_result(self, run: _Run, payload: dict[str, Any]) -> None:
        try:
            self._spool.finish(run.run_id, payload)
        except OSError as exc:
            logger.error("cannot spool the result of run %s: %s", run.run_id, exc)

    async def _on_started(self, run: _Run, pid: int) -> None:
        create_time: float | None = None
        # Already gone: then nothing could be left to kill after a crash anyway.
        with contextlib.suppress(psutil.Error):
            create_time = psutil.Process(pid).create_time()
        try:
            self._spool.record_pid(run.run_id, pid, create_time)
        except OSError as exc:
            logger.error("cannot record the pid of run %s: %s", run.run_id, exc)
        started = pb.Started(
            run_id=run.run_id, task_id=run.task_id, started_at=time.time(), pid=pid
        )
        await self._link.send(pb.CommandMessage(started=started))

    async def _on_output(self, run: _Run, stream: Stream, data: bytes) -> None:
        # Kept and queued at once: sending is the run's output task's job (outbox.py).
        if run.output is not None:
            run.output.add(stream, data)

    async def _send_ack(self, run_id: str) -> None:
        await self._link.send(pb.CommandMessage(ack=pb.Ack(run_id=run_id, kind="command")))

    # -- lifecycle -----------------------------------------------------------------------

    def _reap_interrupted(self) -> None:
        for run in self._spool.interrupted():
            if run.pid is not None:
                _kill_leftovers(run.run_id, run.pid, run.create_time)
            try:
                self._spool.mark_abandoned(run.run_id)
            except InvalidInput:
                logger.warning("stray file for %r in the spool left alone", run.run_id[:80])
                continue
            logger.warning(
                "run %s (task %s) was interrupted by an agent restart; abandoned",
                run.run_id,
                run.task_id,
            )

    def _load_outputs(self) -> None:
        """Output of runs whose results wait to be re-sent goes before them; the rest of
        the journals (acknowledged or abandoned runs) is dropped."""
        pending = {str(r.get("run_id", "")): r for r in self._spool.pending_results()}
        self._journal.load(pending)
        for run_id, payload in pending.items():
            if self._journal.last_seq(run_id.lower()):
                self._outputs[run_id] = RunOutput(
                    run_id.lower(),
                    str(payload.get("task_id", "")),
                    self._journal,
                    self._link,
                    self._connections,
                    finished=True,
                )

    def _prune(self) -> None:
        self._last_prune = time.monotonic()
        try:
            removed = self._spool.prune(DONE_RETENTION)
        except OSError as exc:
            logger.warning("cannot prune the spool: %s", exc)
            return
        if removed:
            logger.info("forgot %d runs done more than %s ago", removed, DONE_RETENTION)

    def _maybe_prune(self) -> None:
        if time.monotonic() - self._last_prune >= _PRUNE_EVERY:
            self._prune()

    async def _shutdown(self, link_task: asyncio.Task[None]) -> None:
        self._stopping = True
        runs = list(self._running.values())
        tasks = {run.task for run in runs if run.task is not None}
        if tasks:
            logger.info("stopping %d running commands", len(tasks))
            for run in runs:
                if run.process is not None:
                    run.process.cancel()
            # While the link is still up their results go out at once.
            _, pending = await asyncio.wait(
                tasks, timeout=self._config.kill_grace + _SHUTDOWN_SLACK
            )
            if pending:
                logger.warning("%d commands did not stop in time; killing them", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=_SHUTDOWN_SLACK)
        for output in self._outputs.values():
            output.cancel()
        if not link_task.done():
            link_task.cancel()
            await asyncio.wait({link_task})


def _kill_leftovers(run_id: str, pid: int, create_time: float | None) -> None:
    """SIGKILL what is left of an interrupted run's process group, if anything.

    The group id is the leader's pid. Linux does not hand out a pid while a process group of
    that id still exists, so: if no process has that pid, whatever is in the group is ours;
    if one does, it is our leader only if it started when ours did.
    """
    try:
        leader = psutil.Process(pid)
        if create_time is None or abs(leader.create_time() - create_time) > _CREATE_TIME_TOLERANCE:
            return  # the pid now belongs to someone else, so our group is long gone
    except psutil.NoSuchProcess:
        pass
    except psutil.Error as exc:
        logger.warning("cannot inspect pid %d of interrupted run %s: %s", pid, run_id, exc)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    except PermissionError as exc:
        logger.warning("cannot kill process group %d of run %s: %s", pid, run_id, exc)
        return
    logger.warning("killed leftover process group %d of interrupted run %s", pid, run_id)


def _payload(run: _Run, config: AgentConfig, result: ProcessResult) -> dict[str, Any]:
    return {
        "task_id": run.task_id,
        "run_id": run.run_id,
        "attempt": run.attempt,
        "status": str(result.outcome),
        "exit_code": result.exit_code,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "truncated": result.truncated,
        "error": result.error or "",
        "started_at": result.started_at.timestamp(),
        "finished_at": result.finished_at.timestamp(),
        "duration_ms": result.duration_ms,
        "timestamp": time.time(),
        "hostname": config.name,
    }


def _synthetic(run: _Run, config: AgentConfig, outcome: Outcome, error: str) -> dict[str, Any]:
    """A result for a run whose command never ran (or whose end we could not observe)."""
    now = time.time()
    return {
        "task_id": run.task_id,
        "run_id": run.run_id,
        "attempt": run.attempt,
        "status": str(outcome),
        "exit_code": None,
        "stdout": "",
        "stderr": "",
        "truncated": False,
        "error": error,
        "started_at": now,
        "finished_at": now,
        "duration_ms": 0,
        "timestamp": now,
        "hostname": config.name,
    }


_RESULT_FIELDS: Final = (
    "task_id",
    "run_id",
    "attempt",
    "status",
    "exit_code",
    "stdout",
    "stderr",
    "truncated",
    "error",
    "started_at",
    "finished_at",
    "duration_ms",
    "timestamp",
    "hostname",
)


def run_agent(config: AgentConfig) -> None:
    """Run an agent in the foreground until SIGTERM or SIGINT (the ``opsplane agent`` verb)."""

    async def main() -> None:
        agent = Agent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        try:
            logger.info(
                "agent %s (%s) for %s over %s, state in %s",
                config.name,
                config.version,
                config.endpoint,
                config.link,
                config.state_dir,
            )
            if config.deny or config.allow:
                logger.info(
                    "refusing commands by %d deny and %d allow patterns",
                    len(config.deny),
                    len(config.allow),
                )
            if config.run_as is not None:
                logger.info("running commands as %s", config.run_as)
            if config.allowed_run_as is not None:
                allowed = ", ".join(config.allowed_run_as) or "none"
                logger.info("commands may ask to run as: %s", allowed)
            await agent.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    asyncio.run(main())
