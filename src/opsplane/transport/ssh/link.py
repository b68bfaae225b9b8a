"""Agentless hosts as a link: runs go over SSH, through bastions, executed by ``SshExecutor``.

The engine tells the link which hosts exist and how to reach them (``set_targets`` and
friends); the link never reads the store. An SSH host has no connection to be "online" with:
it counts as reachable while it is a known target, and a connect that fails ends that run
``failed`` with the reason (refused, authentication, host key, which bastion), like any
other failure of the run. Each run executes in a task of its own and reports ``RunStarted``,
``RunOutput`` (``seq`` from 1) and ``RunFinished`` through ``LinkEvents``, as the agents do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shlex
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from opsplane.domain.errors import InvalidInput, NotConnected
from opsplane.execution import Outcome, OutputCapture
from opsplane.transport.base import (
    SSH_LINK,
    CommandEnvelope,
    Link,
    LinkEvents,
    RunFinished,
    RunOutput,
    RunStarted,
    Stream,
)
from opsplane.transport.ssh.endpoints import SshEndpoint, SshTarget
from opsplane.transport.ssh.executor import SshExecutor
from opsplane.transport.ssh.work import WorkPublisher

log = logging.getLogger(__name__)


_Emit = Callable[[Stream, bytes], Awaitable[None]]
_Started = Callable[[datetime], Awaitable[None]]


_SECRET_FIELDS = ("password", "private_key", "passphrase")


def worker_start_window(start_timeout: float) -> float:
    """How long after its dispatch an SSH worker may still start a run: the engine's
    ``start_timeout`` less a margin (a fifth, at most 5 s) for the worker's "started" report to
    reach the engine before the engine's own verdict."""
    return start_timeout - min(5.0, start_timeout / 5)


def target_from_spec(name: str, spec: Mapping[str, Any]) -> SshTarget:
    """An inventory entry as the engine stores it — ``address``, ``port``, ``user``,
    ``key_file``, ``bastions`` (``ops@edge:22,ops@inner``), ``bastion_key_file`` — plus, in
    memory only, ``password`` / ``private_key`` / ``passphrase`` and their ``bastion_``
    counterparts."""
    credentials = {k: spec[k] for k in (*_SECRET_FIELDS, "key_file") if spec.get(k)}
    options: dict[str, Any] = {"port": int(spec.get("port") or 22), **credentials}
    if spec.get("user"):
        options["username"] = str(spec["user"])
    endpoint = SshEndpoint.parse(str(spec["address"]), **options)
    hop_options = {
        k: spec[f"bastion_{k}"] for k in (*_SECRET_FIELDS, "key_file") if spec.get(f"bastion_{k}")
    }
    bastions = SshEndpoint.parse_chain(str(spec.get("bastions") or ""), **hop_options)
    return SshTarget(name, endpoint, bastions)


class SshLink(Link):
    """The ``ssh`` link. Owns ``executor``: ``stop()`` closes its connections.

    With ``work_queue`` (``ssh_workers: true``) runs are not executed here: they are published
    to ``ssh.work`` for ``opsplane worker`` processes, whose reports come back over RabbitMQ
    (``AmqpLink``); cancels go to the workers too (see ``opsplane.transport.ssh.worker``).
    """

    name: ClassVar[str] = SSH_LINK
    liveness_by_heartbeat: ClassVar[bool] = False

    def __init__(
        self,
        executor: SshExecutor,
        targets: Mapping[str, SshTarget] | None = None,
        *,
        stop_grace: float = 5.0,
        work_queue: WorkPublisher | None = None,
        worker_start_within: float | None = None,
    ) -> None:
        self.executor = executor
        self.work_queue = work_queue
        # With workers: how long after its dispatch a worker may still start a run. Shorter than
        # the engine's start_timeout, which ends a run still waiting in the broker after it as
        # undeliverable: the worker must never start a run that may already be called so.
        self._worker_start_within = worker_start_within
        self._targets: dict[str, SshTarget] = dict(targets or {})
        self._stop_grace = stop_grace
        self._events: LinkEvents | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Event] = {}

    # -- targets -------------------------------------------------------------------------

    def set_targets(self, targets: Mapping[str, SshTarget]) -> None:
        """Replace every known target (host name → how to reach it; the name is the key)."""
        misnamed = [name for name, target in targets.items() if target.name != name]
        if misnamed:
            raise InvalidInput(f"SSH targets filed under another name: {', '.join(misnamed)}")
        self._targets = dict(targets)

    def upsert_target(self, target: SshTarget) -> None:
        """Add a target or change how ``target.name`` is reached (next runs use it)."""
        self._targets[target.name] = target

    def remove_target(self, name: str) -> None:
        """Forget a target; its runs in progress go on."""
        self._targets.pop(name, None)

    def update_inventory(self, hostname: str, spec: Mapping[str, Any] | None) -> None:
        """The engine's inventory entry for ``hostname`` (see ``target_from_spec``)."""
        if spec is None:
            self.remove_target(hostname)
        else:
            self.upsert_target(target_from_spec(hostname, spec))

    @property
    def executes_here(self) -> bool:
        # With workers, runs wait in the broker's ssh.work queue, outside this process.
        return self.work_queue is None

    @property
    def targets(self) -> Mapping[str, SshTarget]:
        return dict(self._targets)

    # -- Link ----------------------------------------------------------------------------

    async def start(self, events: LinkEvents) -> None:
        if self.work_queue is not None:
            await self.work_queue.start()
        self._events = events

    async def stop(self) -> None:
        """Kill the runs in progress (their remote commands too), then close connections.

        Runs cut short report nothing: like an agent going away, the engine settles them.
        """
        self._events = None
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._stop_grace)
        await self.executor.close(self._stop_grace)
        if self.work_queue is not None:
            await self.work_queue.stop()
        if any(not task.done() for task in tasks):
            log.warning("ssh link stopped with runs still unwinding")

    def is_connected(self, hostname: str) -> bool:
        return self._events is not None and hostname in self._targets

    async def send_command(self, hostname: str, command: CommandEnvelope) -> None:
        target = self._targets.get(hostname)
        if self._events is None or target is None:
            raise NotConnected(f"{hostname} is not a known SSH target")
        if self.work_queue is not None:
            if self._worker_start_within is not None:
                cutoff = time.time() + self._worker_start_within
                if command.deliver_by is None or command.deliver_by > cutoff:
                    command = dataclasses.replace(command, deliver_by=cutoff)
            await self.work_queue.publish_work(hostname, target, command)
            return
        run_id = command.run_id
        if run_id in self._tasks:
            log.info("ssh run %s on %s already in progress; ignoring a repeat", run_id, hostname)
            return
        self._cancels[run_id] = asyncio.Event()
        task = asyncio.create_task(self._execute(hostname, target, command), name=f"ssh-{run_id}")
        self._tasks[run_id] = task

        def _forget(_task: asyncio.Task[None]) -> None:
            self._tasks.pop(run_id, None)
            self._cancels.pop(run_id, None)

        task.add_done_callback(_forget)

    async def send_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        if self.work_queue is not None:
            await self.work_queue.publish_cancel(hostname, task_id, run_id, reason)
            return
        cancel = self._cancels.get(run_id)
        if cancel is not None:
            log.info("canceling ssh run %s on %s: %s", run_id, hostname, reason)
            cancel.set()
        elif hostname not in self._targets:
            raise NotConnected(f"{hostname} is not a known SSH target")
        # Otherwise the run already finished and reported so.

    # -- running -------------------------------------------------------------------------

    async def _report(self, report: RunStarted | RunOutput | RunFinished) -> None:
        events = self._events
        if events is not None:
            await events.report(report)

    async def _execute(self, hostname: str, target: SshTarget, command: CommandEnvelope) -> None:
        cancel = self._cancels[command.run_id]
        seq = 0

        async def emit(stream: Stream, data: bytes) -> None:
            nonlocal seq
            seq += 1
            await self._report(
                RunOutput(
                    hostname,
                    command.run_id,
                    stream,
                    seq,
                    data,
                    task_id=command.task_id,
                    attempt=command.attempt,
                )
            )

        async def started(at: datetime) -> None:
            await self._report(
                RunStarted(
                    hostname, command.run_id, at, task_id=command.task_id, attempt=command.attempt
                )
            )

        try:
            finished = await self._outcome(hostname, target, command, emit, started, cancel)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # A bug of ours must still end the run, or it would wait for a report forever.
            log.exception("ssh run %s on %s broke inside opsplane", command.run_id, target)
            finished = self._finished(
                hostname,
                command,
                status=Outcome.FAILED.value,
                error=f"internal error: {type(e).__name__}: {e}",
            )
        if finished.status != Outcome.SUCCEEDED.value:
            log.info(
                "ssh run %s on %s %s: %s", command.run_id, target, finished.status, finished.error
            )
        await self._report(finished)

    async def _outcome(
        self,
        hostname: str,
        target: SshTarget,
        command: CommandEnvelope,
        emit: _Emit,
        started: _Started,
        cancel: asyncio.Event,
    ) -> RunFinished:
        """Execute ``command`` on ``target`` and say how it ended."""
        if command.deliver_by and time.time() > command.deliver_by:
            return self._finished(
                hostname,
                command,
                status=Outcome.UNDELIVERABLE.value,
                error="delivery deadline passed before the command could be sent",
            )
        if command.upload is not None:
            return await self._upload(hostname, target, command, emit, started, cancel)
        if command.handler is not None:
            return self._finished(
                hostname,
                command,
                status=Outcome.FAILED.value,
                error="in-process handlers run only on the control plane's own host",
            )
        if command.user:
            # Refused at submit (engine/service.py); a host moved to SSH since must not run
            # it as its login user instead.
            return self._finished(
                hostname,
                command,
                status=Outcome.FAILED.value,
                error=f"run-as {command.user} refused: SSH hosts run commands as their login "
                "user only; not executed",
            )
        line = command.command
        if command.argv is not None:
            line = " ".join(shlex.quote(arg) for arg in command.argv)
        result = await self.executor.run(
            target,
            line,
            timeout=float(command.timeout) if command.timeout else None,
            env=command.env,
            cwd=command.cwd,
            on_output=emit,
            on_started=started,
            cancel=cancel,
            start_by=command.deliver_by,
        )
        return RunFinished(
            hostname=hostname,
            run_id=command.run_id,
            status=result.status.value,
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            truncated=result.truncated,
            error=result.error,
            started_at=result.started_at,
            finished_at=result.finished_at,
            duration_ms=result.duration_ms,
            task_id=command.task_id,
            attempt=command.attempt,
        )

    async def _upload(
        self,
        hostname: str,
        target: SshTarget,
        command: CommandEnvelope,
        emit: _Emit,
        started: _Started,
        cancel: asyncio.Event,
    ) -> RunFinished:
        spec = command.upload
        assert spec is not None

        async def on_file(path: str, error: str | None) -> None:
            if error is None:
                await emit("stdout", f"{path}\n".encode())
            else:
                await emit("stderr", f"{path}: {error}\n".encode())

        result = await self.executor.upload(
            target,
            spec.local_path,
            spec.remote_path,
            timeout=float(command.timeout) if command.timeout else None,
            on_started=started,
            on_file=on_file,
            cancel=cancel,
            owner=spec.owner,
            group=spec.group,
        )
        # The lists of the result, not the streamed lines: they also name the files that
        # were never attempted (timeout, cancel).
        capture = OutputCapture()
        capture.feed("stdout", "".join(f"{path}\n" for path in result.uploaded).encode())
        capture.feed("stderr", "".join(f"{p}: {why}\n" for p, why in result.failed).encode())
        error = result.error
        if error is None and result.failed:
            total = len(result.failed) + len(result.uploaded)
            error = f"{len(result.failed)} of {total} files failed"
        return RunFinished(
            hostname=hostname,
            run_id=command.run_id,
            status=result.status.value,
            exit_code=0 if result.status is Outcome.SUCCEEDED else None,
            stdout=capture.text("stdout"),
            stderr=capture.text("stderr"),
            truncated=capture.truncated,
            error=error,
            started_at=result.started_at,
            finished_at=result.finished_at,
            duration_ms=result.duration_ms,
            task_id=command.task_id,
            attempt=command.attempt,
        )

    def _finished(
        self, hostname: str, command: CommandEnvelope, *, status: str, error: str
    ) -> RunFinished:
        return RunFinished(
            hostname=hostname,
            run_id=command.run_id,
            status=status,
            exit_code=None,
            stdout="",
            stderr="",
            truncated=False,
            error=error,
            started_at=None,
            finished_at=datetime.now(UTC),
            duration_ms=None,
            task_id=command.task_id,
            attempt=command.attempt,
        )
