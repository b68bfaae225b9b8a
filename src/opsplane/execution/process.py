"""Running one command as a child process: live output, timeout, cancellation, cleanup.

Every command runs as the leader of its own process group, so that timing out or cancelling
it reaches everything it started, and so that the run can make sure nothing it started
outlives it. The agent runs operators' commands with it; the script catalog reuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import IO, Any, Literal

import psutil

from opsplane.domain.errors import InvalidInput
from opsplane.execution.capture import DEFAULT_CAP, OutputCapture
from opsplane.execution.environment import child_environment
from opsplane.execution.identity import Identity

logger = logging.getLogger(__name__)

Stream = Literal["stdout", "stderr"]
OutputCallback = Callable[[Stream, bytes], Awaitable[None]]
StartedCallback = Callable[[int], Awaitable[None]]

SHELL = "/bin/sh"
DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_KILL_GRACE = 5.0

# After the leader exits, a background child may still be writing its last words; it gets
# this long before the rest of the group is killed.
_DRAIN_GRACE = 1.0
# Once the group is dead only a process outside it (one that called setsid) can keep a pipe
# open; a pipe that stays silent this long is abandoned rather than waited for forever.
_ORPHAN_PIPE_IDLE = 1.0
# Bounds the wait for such an outsider that keeps writing, which idleness would never catch.
_ORPHAN_PIPE_LIMIT = 10.0
_DRAIN_POLL = 0.1
# How long a task cancellation waits for the SIGKILLed leader to be reaped.
_REAP_ON_CANCEL = 1.0


class Outcome(StrEnum):
    """How a run ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    # Never started: the command reached its host after the delivery deadline (DESIGN §2).
    UNDELIVERABLE = "undeliverable"


@dataclass(frozen=True)
class ProcessResult:
    """What a finished run produced.

    ``exit_code`` is the leader's exit status when it ended on its own: ``0`` or a positive
    code, or ``-N`` when a signal ``N`` not sent by us killed it. It is ``None`` when we
    killed it (timed out, canceled), because its status then says nothing about the command,
    and when it never started.
    """

    outcome: Outcome
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    error: str | None
    started_at: datetime
    finished_at: datetime
    duration_ms: int
    pid: int | None


class ProcessRun:
    """One command being executed.

    With ``shell=True`` the command string runs through ``/bin/sh -c``, because operators
    type shell on purpose; with ``shell=False`` an argv list runs directly and nothing in it
    is interpreted. The command's environment is ``env`` laid over an allow-list of the
    parent's (``execution/environment.py``: ``PATH``, ``HOME``, locale…, plus the names in
    ``env_passthrough``), never the whole of it: the parent holds opsplane's tokens. Output
    is read in chunks as it arrives and handed to ``on_output`` in order per stream; a
    raising callback is logged and never stops the run.

    With ``run_as`` the command runs as that user, with the user's own groups, and with
    ``HOME``, ``USER`` and ``LOGNAME`` naming it (``env`` still has the last word): a small
    helper switches user and then execs the command, keeping its pid and process group.
    Switching to another user needs root: without it the run fails with exit code 126.

    When the leader exits, whatever else is left in its process group is killed: a run owns
    everything it started. A command meant to outlive a run that ends on its own must leave
    the group (``setsid``). A run that is timed out or canceled ends its whole tree, those
    escapees included: the leader's descendants are listed (``psutil``, by parent pid) before
    each signal, so a child that called ``setsid`` is found through its parent. Only a
    descendant whose parent chain was already broken (its parent exited first) and that left
    the group can escape a timeout: that is a deliberate daemon.

    A ``ProcessRun`` runs once.
    """

    def __init__(
        self,
        argv_or_command: str | Sequence[str],
        *,
        shell: bool = True,
        timeout: float | None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_output: OutputCallback | None = None,
        on_started: StartedCallback | None = None,
        kill_grace: float = DEFAULT_KILL_GRACE,
        output_cap: int = DEFAULT_CAP,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        run_as: Identity | None = None,
        env_passthrough: Sequence[str] = (),
    ) -> None:
        self._argv = _build_argv(argv_or_command, shell=shell)
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise InvalidInput(f"timeout must be a positive number of seconds, got {timeout}")
        if not (kill_grace >= 0 and math.isfinite(kill_grace)):
            raise InvalidInput(f"kill_grace must be zero or more seconds, got {kill_grace}")
        if chunk_size <= 0:
            raise InvalidInput(f"chunk_size must be a positive number of bytes, got {chunk_size}")
        self._timeout = timeout
        if run_as is not None:
            self._argv = run_as.argv_for(self._argv)
        self._env = child_environment(
            env, passthrough=env_passthrough, identity_env=run_as.env() if run_as else None
        )
        self._cwd = cwd
        self._on_output = on_output
        self._on_started = on_started
        self._kill_grace = kill_grace
        self._chunk_size = chunk_size
        self._capture = OutputCapture(output_cap)

        self._pid: int | None = None
        # Descendants found outside the leader's process group, kept for the final SIGKILL.
        self._escapees: dict[int, psutil.Process] = {}
        self._ran = False
        self._cancel_requested = False
        self._cancel_event = asyncio.Event()
        self._bytes_read = 0
        self._callbacks_in_flight = 0
        self._callback_failures = 0

    @property
    def pid(self) -> int | None:
        """The leader's pid (also its process group id) once started."""
        return self._pid

    def cancel(self) -> None:
        """Ask the run to stop: the group gets SIGTERM, then SIGKILL after ``kill_grace``.

        Idempotent and harmless at any time. Before ``run()`` it makes ``run()`` return
        ``CANCELED`` without starting anything; after the process ended on its own it has
        no effect. Call it from the event loop's thread.
        """
        self._cancel_requested = True
        self._cancel_event.set()

    async def run(self) -> ProcessResult:
        """Execute the command and return once it and its whole process group are gone.

        Never raises for the command's own failures (including not being able to start);
        only cancellation of the awaiting task propagates, after the group was killed.
        """
        if self._ran:
            raise RuntimeError("a ProcessRun can only be run once")
        self._ran = True
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        if self._cancel_requested:
            return self._result(Outcome.CANCELED, None, "canceled", started_at, t0)

        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            # Our own pipes rather than asyncio's: the leader's exit must not wait for a
            # pipe a background child still holds, and we must be able to close them.
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:
            os.close(out_r)
            os.close(err_r)
            return self._result(Outcome.FAILED, None, f"could not start: {exc}", started_at, t0)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)

        self._pid = proc.pid
        loop = asyncio.get_running_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        pipes = [os.fdopen(out_r, "rb", buffering=0), os.fdopen(err_r, "rb", buffering=0)]
        transports: list[asyncio.BaseTransport] = []
        pumps: list[asyncio.Task[None]] = []
        leader_exit = asyncio.ensure_future(proc.wait())
        try:
            readers: list[tuple[Stream, asyncio.StreamReader]] = []
            streams: tuple[Stream, Stream] = ("stdout", "stderr")
            for stream, pipe in zip(streams, pipes, strict=True):
                reader, transport = await _open_reader(pipe)
                transports.append(transport)
                readers.append((stream, reader))
            if self._on_started is not None:
                try:
                    await self._on_started(proc.pid)
                except Exception:
                    logger.exception("on_started callback failed for pid %s", proc.pid)
            # Started after on_started so that listeners hear "started" before any output.
            pumps = [asyncio.create_task(self._pump(s, r)) for s, r in readers]

            stopped_by = await self._wait_for_leader(leader_exit, deadline)
            if stopped_by is None:
                await asyncio.wait(pumps, timeout=_DRAIN_GRACE)
            self._signal_group(signal.SIGKILL)
            await self._drain(pumps)
        except asyncio.CancelledError:
            # The awaiting task is going away and cannot wait out a grace period: kill now.
            self._signal_tree(signal.SIGKILL)
            with contextlib.suppress(asyncio.CancelledError):  # a second cancel cuts it short
                await asyncio.wait({leader_exit}, timeout=_REAP_ON_CANCEL)
            self._signal_tree(signal.SIGKILL)
            raise
        finally:
            for task in (*pumps, leader_exit):
                task.cancel()
            for transport in transports:
                transport.close()
            for pipe in pipes[len(transports) :]:
                pipe.close()
            if self._callback_failures > 1:
                logger.warning(
                    "on_output callback failed %d times for pid %s",
                    self._callback_failures,
                    proc.pid,
                )

        if stopped_by is Outcome.TIMED_OUT:
            return self._result(
                stopped_by, None, f"timed out after {self._timeout:g}s", started_at, t0
            )
        if stopped_by is Outcome.CANCELED:
            return self._result(stopped_by, None, "canceled", started_at, t0)
        code = leader_exit.result()
        if code == 0:
            return self._result(Outcome.SUCCEEDED, code, None, started_at, t0)
        return self._result(Outcome.FAILED, code, _describe_exit(code), started_at, t0)

    async def _wait_for_leader(
        self, leader_exit: asyncio.Future[int], deadline: float | None
    ) -> Outcome | None:
        """Wait for the leader to exit; None if it did so on its own, else why we stopped it."""
        canceled: asyncio.Future[Any] = asyncio.ensure_future(self._cancel_event.wait())
        try:
            timeout = None
            if deadline is not None:
                timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(
                {leader_exit, canceled}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            canceled.cancel()
        if leader_exit.done():
            return None
        reason = Outcome.CANCELED if self._cancel_requested else Outcome.TIMED_OUT
        logger.info("stopping pid %s: %s", self._pid, reason)
        self._signal_tree(signal.SIGTERM)
        await asyncio.wait({leader_exit}, timeout=self._kill_grace)
        if not leader_exit.done():
            self._signal_tree(signal.SIGKILL)
            await leader_exit
        # Escapees that outlived the leader's grace go now; the group goes after the drain.
        self._signal_tree(signal.SIGKILL)
        return reason

    async def _pump(self, stream: Stream, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                chunk = await reader.read(self._chunk_size)
            except OSError:
                logger.exception("reading %s of pid %s failed", stream, self._pid)
                return
            if not chunk:
                return
            self._bytes_read += len(chunk)
            self._capture.feed(stream, chunk)
            if self._on_output is None:
                continue
            # Awaited inline, so a slow callback holds back later chunks of this stream
            # instead of reordering them, and back-pressure reaches the child via the pipe.
            self._callbacks_in_flight += 1
            try:
                await self._on_output(stream, chunk)
            except Exception:
                self._callback_failures += 1
                if self._callback_failures == 1:
                    logger.exception("on_output callback failed for pid %s", self._pid)
            finally:
                self._callbacks_in_flight -= 1

    async def _drain(self, pumps: list[asyncio.Task[None]]) -> None:
        """Read what is left in the pipes; give up on pipes held by processes outside the group."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + _ORPHAN_PIPE_LIMIT
        last_progress = loop.time()
        seen = self._bytes_read
        pending = {p for p in pumps if not p.done()}
        while pending:
            _, pending = await asyncio.wait(pending, timeout=_DRAIN_POLL)
            now = loop.time()
            if self._bytes_read != seen or self._callbacks_in_flight:
                seen = self._bytes_read
                last_progress = now
            if pending and (now - last_progress >= _ORPHAN_PIPE_IDLE or now >= give_up_at):
                logger.warning(
                    "pid %s: output pipe still held open by a process outside its group; "
                    "not waiting for it",
                    self._pid,
                )
                return

    def _signal_tree(self, sig: signal.Signals) -> None:
        """Signal the process group and every descendant that left it (see the class doc)."""
        self._find_escapees()
        self._signal_group(sig)
        for process in list(self._escapees.values()):
            try:
                # psutil checks the pid still names the process it listed (no recycled pid).
                process.send_signal(sig)
            except psutil.Error:
                del self._escapees[process.pid]

    def _find_escapees(self) -> None:
        if self._pid is None:
            return
        # The leader's descendants, and those of escapees already known (the leader may be
        # gone, or the escapee's own children may have left its group too).
        roots = [self._pid, *self._escapees]
        for root in roots:
            try:
                descendants = psutil.Process(root).children(recursive=True)
            except psutil.Error:
                continue
            for process in descendants:
                if process.pid in self._escapees:
                    continue
                try:
                    if os.getpgid(process.pid) != self._pid:
                        self._escapees[process.pid] = process
                except OSError:
                    pass  # already gone

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._pid is None:
            return
        try:
            os.killpg(self._pid, sig)
        except ProcessLookupError:
            pass  # the whole group is already gone
        except PermissionError:
            # Some systems refuse to signal a group made only of zombies.
            logger.debug("could not send %s to process group %s", sig.name, self._pid)

    def _result(
        self,
        outcome: Outcome,
        exit_code: int | None,
        error: str | None,
        started_at: datetime,
        t0: float,
    ) -> ProcessResult:
        elapsed = time.monotonic() - t0
        return ProcessResult(
            outcome=outcome,
            exit_code=exit_code,
            stdout=self._capture.text("stdout"),
            stderr=self._capture.text("stderr"),
            truncated=self._capture.truncated,
            error=error,
            started_at=started_at,
            # Derived from the monotonic clock so that duration_ms and the timestamps agree
            # even if the wall clock jumps during the run.
            finished_at=started_at + timedelta(seconds=elapsed),
            duration_ms=round(elapsed * 1000),
            pid=self._pid,
        )


async def run_command(
    command: str,
    *,
    # The child's time limit, enforced with signals; not a limit on awaiting this coroutine.
    timeout: float | None = None,  # noqa: ASYNC109
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    on_output: OutputCallback | None = None,
    on_started: StartedCallback | None = None,
    kill_grace: float = DEFAULT_KILL_GRACE,
    output_cap: int = DEFAULT_CAP,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ProcessResult:
    """Run a shell command line to completion; see :class:`ProcessRun`."""
    return await ProcessRun(
        command,
        shell=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        on_output=on_output,
        on_started=on_started,
        kill_grace=kill_grace,
        output_cap=output_cap,
        chunk_size=chunk_size,
    ).run()


def _build_argv(argv_or_command: str | Sequence[str], *, shell: bool) -> list[str]:
    if shell:
        if not isinstance(argv_or_command, str):
            raise InvalidInput("shell=True takes a command string, not an argv list")
        return [SHELL, "-c", argv_or_command]
    if isinstance(argv_or_command, str):
        # Splitting a string here would be a second, subtly different shell.
        raise InvalidInput("shell=False takes an argv list, not a command string")
    argv = list(argv_or_command)
    if not argv:
        raise InvalidInput("argv must name a program")
    return argv


async def _open_reader(
    pipe: IO[bytes],
) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """Wrap a pipe in a StreamReader; from here on closing the transport closes the pipe."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe
    )
    return reader, transport


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}"
