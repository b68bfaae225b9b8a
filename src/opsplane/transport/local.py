"""The control plane's own host as a link: runs catalog scripts (seed 004) as ordinary runs,
so they are tasks in the database with archived output like any other.

An operator's shell command never lands here by targeting (the engine excludes this link from
command tasks); only script tasks created by the catalog do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from opsplane.domain.errors import NotConnected
from opsplane.execution import Outcome, OutputCapture, ProcessRun
from opsplane.execution.warden import Warden
from opsplane.transport.base import (
    LOCAL_LINK,
    AgentHello,
    CommandEnvelope,
    Link,
    LinkEvents,
    RunFinished,
    RunOutput,
    RunStarted,
    Stream,
)

log = logging.getLogger(__name__)


@dataclass
class HandlerContext:
    """What an in-process handler gets: its arguments, environment, and an output sink."""

    args: tuple[str, ...]
    env: Mapping[str, str]
    _emit: Callable[[Stream, bytes], Awaitable[None]] = field(repr=False)

    async def write(self, text: str, stream: Stream = "stdout") -> None:
        await self._emit(stream, text.encode())


# Returns the exit code; raising means failure with the exception as the error.
Handler = Callable[[HandlerContext], Coroutine[Any, Any, int]]


class LocalLink(Link):
    name: ClassVar[str] = LOCAL_LINK
    liveness_by_heartbeat: ClassVar[bool] = False

    @property
    def executes_here(self) -> bool:
        return True

    def __init__(
        self,
        hostname: str,
        handlers: Mapping[str, Handler] | None = None,
        *,
        kill_grace: float = 5.0,
        env_passthrough: Sequence[str] = (),
    ) -> None:
        self.hostname = hostname
        # Scripts inherit only an allow-list of the control plane's environment, which holds
        # the bootstrap token and the database URL (execution/environment.py).
        self._env_passthrough = tuple(env_passthrough)
        self._handlers = dict(handlers or {})
        self._kill_grace = kill_grace
        # Kills this link's processes if the control plane dies without stopping them.
        self._warden = Warden(grace=kill_grace)
        self._events: LinkEvents | None = None
        self._processes: dict[str, ProcessRun] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # A handler runs in a task of its own so that a cancel ends the handler, not the
        # coroutine that reports its outcome.
        self._handler_tasks: dict[str, asyncio.Task[int]] = {}

    async def start(self, events: LinkEvents) -> None:
        await asyncio.to_thread(self._warden.start)
        self._events = events
        await events.host_connected(
            AgentHello(hostname=self.hostname, link=self.name, groups=("control-plane",))
        )

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._events = None
        await asyncio.to_thread(self._warden.stop)

    def is_connected(self, hostname: str) -> bool:
        return self._events is not None and hostname == self.hostname

    async def send_command(self, hostname: str, command: CommandEnvelope) -> None:
        if not self.is_connected(hostname):
            raise NotConnected(f"{hostname} is not this control plane's host")
        run_id = command.run_id
        task = asyncio.create_task(self._execute(command), name=f"local-run-{run_id}")
        self._tasks[run_id] = task

        def _forget(_task: asyncio.Task[None]) -> None:
            self._tasks.pop(run_id, None)

        task.add_done_callback(_forget)

    async def send_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        if not self.is_connected(hostname):
            raise NotConnected(f"{hostname} is not this control plane's host")
        if (process := self._processes.get(run_id)) is not None:
            process.cancel()
        elif (handler_task := self._handler_tasks.get(run_id)) is not None:
            handler_task.cancel()

    async def _report(self, report: RunStarted | RunOutput | RunFinished) -> None:
        events = self._events
        if events is not None:
            await events.report(report)

    async def _execute(self, command: CommandEnvelope) -> None:
        seq = 0

        async def emit(stream: Stream, data: bytes) -> None:
            nonlocal seq
            seq += 1
            await self._report(RunOutput(self.hostname, command.run_id, stream, seq, data))

        if command.handler is not None:
            await self._run_handler(command, emit)
            return

        async def started(pid: int) -> None:
            self._warden.watch(pid)
            await self._report(RunStarted(self.hostname, command.run_id, datetime.now(UTC)))

        process = ProcessRun(
            list(command.argv) if command.argv is not None else command.command,
            shell=command.argv is None,
            timeout=command.timeout or None,
            env=command.env,
            cwd=command.cwd,
            on_output=emit,
            on_started=started,
            kill_grace=self._kill_grace,
            env_passthrough=self._env_passthrough,
        )
        self._processes[command.run_id] = process
        try:
            result = await process.run()
        finally:
            self._processes.pop(command.run_id, None)
            if process.pid is not None:
                self._warden.release(process.pid)
        await self._report(
            RunFinished(
                hostname=self.hostname,
                run_id=command.run_id,
                status=result.outcome.value,
                exit_code=result.exit_code,
                stdout=result.stdout,
                stderr=result.stderr,
                truncated=result.truncated,
                error=result.error,
                started_at=result.started_at,
                finished_at=result.finished_at,
                duration_ms=result.duration_ms,
            )
        )

    async def _run_handler(
        self, command: CommandEnvelope, emit: Callable[[Stream, bytes], Awaitable[None]]
    ) -> None:
        capture = OutputCapture()

        async def captured(stream: Stream, data: bytes) -> None:
            capture.feed(stream, data)
            await emit(stream, data)

        handler = self._handlers.get(command.handler or "")
        started_at = datetime.now(UTC)
        began = time.monotonic()
        await self._report(RunStarted(self.hostname, command.run_id, started_at))
        exit_code: int | None = None
        error: str | None = None
        outcome = Outcome.FAILED
        inner: asyncio.Task[int] | None = None
        try:
            if handler is None:
                raise LookupError(f"no in-process handler named {command.handler!r}")
            context = HandlerContext(command.args, command.env, captured)
            inner = asyncio.create_task(handler(context))
            self._handler_tasks[command.run_id] = inner
            try:
                async with asyncio.timeout(command.timeout or None):
                    exit_code = await asyncio.shield(inner)
            except TimeoutError:
                inner.cancel()
                raise
            finally:
                self._handler_tasks.pop(command.run_id, None)
            outcome = Outcome.SUCCEEDED if exit_code == 0 else Outcome.FAILED
            error = None if exit_code == 0 else f"exit code {exit_code}"
        except TimeoutError:
            outcome, error = Outcome.TIMED_OUT, f"timed out after {command.timeout}s"
        except asyncio.CancelledError:
            if inner is None or not inner.cancelled():
                if inner is not None:
                    inner.cancel()
                raise  # the link is stopping, not a cancel of this run
            outcome, error = Outcome.CANCELED, "canceled"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            await captured("stderr", f"{error}\n".encode())
        duration_ms = int((time.monotonic() - began) * 1000)
        await self._report(
            RunFinished(
                hostname=self.hostname,
                run_id=command.run_id,
                status=outcome.value,
                exit_code=exit_code,
                stdout=capture.text("stdout"),
                stderr=capture.text("stderr"),
                truncated=capture.truncated,
                error=error,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                duration_ms=duration_ms,
            )
        )
