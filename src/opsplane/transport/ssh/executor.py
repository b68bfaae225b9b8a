"""Running commands and uploading files on SSH targets (DESIGN §3.4, seed 000).

``SshExecutor`` is the engine-independent core: it knows targets, not runs. Everything a
host does wrong ends in its own result (``SshResult``, ``UploadResult``) with a clear
``error``; nothing one host does fails another. The link (``link.py``) turns results into
run reports.

A timeout or a cancel sends SIGTERM to the remote command's process group, SIGKILL after
``kill_grace``, and only then closes the channel (``sessions.py`` says why). A command that
leaves the group on purpose (``setsid``) is out of reach, as with the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from opsplane.execution import DEFAULT_CAP, Outcome, OutputCallback, OutputCapture
from opsplane.transport.ssh.connections import (
    ConnectionPool,
    Lease,
    SshConnectError,
    error_reason,
)
from opsplane.transport.ssh.endpoints import HostKeyPolicy, SshTarget
from opsplane.transport.ssh.sessions import (
    CANCEL,
    CLOSED,
    GIVE_UP,
    SHUTDOWN,
    TIMEOUT,
    Item,
    RunSession,
    exited,
    kill_now,
    remote_command,
    send_signal,
    start_command,
    wait_closed,
)
from opsplane.transport.ssh.uploads import (
    FileCallback,
    UploadResult,
    plan_upload,
    resolve_ownership,
    transfer,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

StartedCallback = Callable[[datetime], Awaitable[None]]

# After SIGKILL, how long the server gets to report the command gone before we stop waiting
# and drop the connection, which is then presumed dead.
_CONFIRM_KILL = 5.0
# How long a cancelled caller waits for the server to confirm the KILL it sent.
_CONFIRM_CANCEL = 2.0
# Opening a session: the first try, and retries on a dead pooled connection or a refusal.
_OPEN_ATTEMPTS = 3


@dataclass(frozen=True)
class SshResult:
    """How a command ended on one target.

    ``exit_code`` is the remote exit status, ``-N`` when a signal ``N`` we did not send
    killed it, and ``None`` when we stopped it (timed out, canceled) or it never started.
    ``started_at`` is when the server accepted the command (``None``: never started, e.g.
    the connect failed); ``duration_ms`` counts from then.
    """

    status: Outcome
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    error: str | None
    started_at: datetime | None
    finished_at: datetime
    duration_ms: int | None


async def _start_sftp(conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient:
    return await conn.start_sftp_client()


class SshExecutor:
    """Runs commands and uploads on SSH targets, through their bastions.

    At most ``max_parallel`` runs and uploads proceed at once (connecting included); the
    others wait their turn. Connections are shared and reused (``connections.py``); a
    connection idle for ``idle_timeout`` seconds is closed. ``close()`` closes them all.
    ``connect_timeout`` bounds each hop's TCP connect, key exchange and login;
    ``keepalive_interval``/``keepalive_count_max`` detect a dead bastion or target while a
    command runs.

    Host keys are checked on every hop by ``policy``.
    """

    def __init__(
        self,
        policy: HostKeyPolicy,
        *,
        max_parallel: int = 50,
        connect_timeout: float = 10.0,
        keepalive_interval: float = 15.0,
        keepalive_count_max: int = 3,
        idle_timeout: float = 60.0,
        max_sessions_per_connection: int = 8,
        kill_grace: float = 2.0,
        output_cap: int = DEFAULT_CAP,
        upload_concurrency: int = 8,
    ) -> None:
        if max_parallel < 1 or max_sessions_per_connection < 1 or upload_concurrency < 1:
            raise ValueError("parallelism limits must be at least 1")
        self.policy = policy
        self.max_parallel = max_parallel
        self._slots = asyncio.Semaphore(max_parallel)
        self._kill_grace = kill_grace
        self._output_cap = output_cap
        self._upload_concurrency = upload_concurrency
        # The commands running now, so that close() can kill them.
        self._active: dict[asyncssh.SSHClientChannel[bytes], RunSession] = {}
        self._pool = ConnectionPool(
            policy,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
            keepalive_count_max=keepalive_count_max,
            idle_timeout=idle_timeout,
            max_sessions=max_sessions_per_connection,
        )

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    async def close(self, grace: float = 5.0) -> None:
        """Kill the commands still running (they end ``canceled``), close every connection.

        Waits at most about ``grace`` seconds. Closing a connection alone would leave its
        commands running on the targets.
        """
        for session in self._active.values():
            session.queue.put_nowait(SHUTDOWN)
        channels = list(self._active)
        if channels:
            await wait_closed(channels, min(grace, _CONFIRM_KILL))
        await self._pool.close(grace)

    # -- commands ------------------------------------------------------------------------

    async def run(
        self,
        target: SshTarget,
        command: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the remote command's, not ours
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_output: OutputCallback | None = None,
        on_started: StartedCallback | None = None,
        cancel: asyncio.Event | None = None,
        start_by: float | None = None,
    ) -> SshResult:
        """Run ``command`` on ``target`` and return how it ended; never raises for the host.

        ``start_by`` (a ``time.time()``): a run that got its slot later never starts and ends
        ``undeliverable`` — whoever gave the deadline may already have declared it so.

        Output reaches ``on_output(stream, chunk)`` as it arrives; ``on_started(at)`` is
        awaited once the server accepted the command. ``timeout`` (seconds, None = none)
        counts from then; connecting is bounded by ``connect_timeout`` per hop. Setting
        ``cancel`` stops the run at any point (the remote command is killed) and the result
        is ``canceled``. Cancelling the calling task kills the remote command too, and
        re-raises.
        """
        capture = OutputCapture(self._output_cap)
        try:
            line = remote_command(command, env, cwd)
        except ValueError as e:
            return _finished(Outcome.FAILED, None, capture, str(e), None)
        if cancel is not None and cancel.is_set():
            return _finished(Outcome.CANCELED, None, capture, "canceled", None)
        async with self._slots:
            if start_by is not None and time.time() > start_by:
                error = "not started: its start deadline passed while it waited for a slot"
                return _finished(Outcome.UNDELIVERABLE, None, capture, error, None)
            try:
                lease, (chan, session) = await self._open(target, cancel, start_command(line))
            except _Canceled:
                return _finished(Outcome.CANCELED, None, capture, "canceled", None)
            except (SshConnectError, _OpenFailed) as e:
                return _finished(Outcome.FAILED, None, capture, str(e), None)
            try:
                return await self._drive(
                    chan, session, lease, capture, timeout, on_output, on_started, cancel
                )
            finally:
                lease.release()

    async def _open(
        self,
        target: SshTarget,
        cancel: asyncio.Event | None,
        opener: Callable[[asyncssh.SSHClientConnection], Awaitable[_T]],
    ) -> tuple[Lease, _T]:
        """A lease on a connection to ``target`` and what ``opener`` opened on it.

        Raises ``SshConnectError`` (a hop failed), ``_OpenFailed`` (the session did not
        start) or ``_Canceled``. Tries again when a pooled connection turns out dead or the
        server refuses one more session on it (its ``MaxSessions``).
        """
        for attempt in range(_OPEN_ATTEMPTS):
            lease = await _until_canceled(self._pool.session(target.chain), cancel)
            try:
                return lease, await opener(lease.conn)
            except (asyncssh.Error, OSError) as e:
                alive = isinstance(e, asyncssh.ChannelOpenError) and not lease.conn.is_closed()
                if alive:
                    lease.refused()
                else:
                    lease.discard()
                if attempt + 1 < _OPEN_ATTEMPTS and (alive or lease.reused):
                    log.info("ssh: new session on %s after: %s", target, error_reason(e))
                    continue
                raise _OpenFailed(
                    f"could not start a session on {target}: {error_reason(e)}"
                ) from e
            except BaseException:
                lease.release()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _drive(
        self,
        chan: asyncssh.SSHClientChannel[bytes],
        session: RunSession,
        lease: Lease,
        capture: OutputCapture,
        limit: float | None,
        on_output: OutputCallback | None,
        on_started: StartedCallback | None,
        cancel: asyncio.Event | None,
    ) -> SshResult:
        loop = asyncio.get_running_loop()
        started_at = datetime.now(UTC)
        began = time.monotonic()
        # No EOF on stdin: the command reads /dev/null, and the channel's stdin stays open
        # until the channel closes, which is what the remote guard watches (remote_command).
        timers: list[asyncio.TimerHandle] = []
        watcher: asyncio.Task[None] | None = None
        stopped_by: Outcome | None = None
        gave_up = shutdown = False
        self._active[chan] = session
        try:
            if on_started is not None:
                await _safely(on_started(started_at), "on_started")
            if limit is not None:
                timers.append(loop.call_later(limit, session.queue.put_nowait, TIMEOUT))
            if cancel is not None:
                watcher = asyncio.create_task(_signal_on(cancel, session.queue))
            while True:
                item = await session.queue.get()
                if isinstance(item, tuple):
                    stream, data = item
                    capture.feed(stream, data)
                    if on_output is not None:
                        await _safely(on_output(stream, data), "on_output")
                    session.consumed(len(data))
                elif item is CLOSED:
                    break
                elif item is GIVE_UP:
                    gave_up = True
                    lease.discard()
                    break
                elif stopped_by is not None or exited(chan):
                    continue  # already stopping, or ended on its own: only the close is due
                elif item is SHUTDOWN:
                    stopped_by, shutdown = Outcome.CANCELED, True
                    kill_now(chan)
                    timers.append(loop.call_later(_CONFIRM_KILL, session.queue.put_nowait, GIVE_UP))
                else:  # TIMEOUT or CANCEL, whichever came first
                    stopped_by = Outcome.TIMED_OUT if item is TIMEOUT else Outcome.CANCELED
                    timers += self._stop_remote(chan, session.queue)
        except asyncio.CancelledError:
            # The caller is going away (the link stops): the command must not outlive it.
            # Waiting for the server to confirm (bounded) makes sure the KILL went out before
            # anyone closes the connection, which would drop what is still unsent.
            kill_now(chan)
            await wait_closed([chan], _CONFIRM_CANCEL)
            raise
        finally:
            self._active.pop(chan, None)
            for timer in timers:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()
        duration_ms = int((time.monotonic() - began) * 1000)
        if stopped_by is Outcome.TIMED_OUT:
            error = f"timed out after {limit:g}s"
        elif shutdown:
            error = "canceled: the SSH executor was closed"
        elif stopped_by is Outcome.CANCELED:
            error = "canceled"
        else:
            error = None
        if gave_up:
            error = f"{error or 'stopped'}; the server did not confirm the command ended"
        if stopped_by is not None:
            return _finished(stopped_by, None, capture, error, started_at, duration_ms)
        exit_signal = chan.get_exit_signal()
        exit_status = chan.get_exit_status()
        if exit_signal is not None:
            name = exit_signal[0]
            number = getattr(signal, f"SIG{name}", None)
            code = -int(number) if number is not None else None
            return _finished(
                Outcome.FAILED, code, capture, f"killed by SIG{name}", started_at, duration_ms
            )
        if exit_status is None or exit_status < 0:
            lease.discard()
            lost = error_reason(session.lost) if session.lost is not None else "no exit status"
            error = f"connection lost before the command finished: {lost}"
            return _finished(Outcome.FAILED, None, capture, error, started_at, duration_ms)
        if exit_status == 0:
            return _finished(Outcome.SUCCEEDED, 0, capture, None, started_at, duration_ms)
        error = f"exit code {exit_status}"
        return _finished(Outcome.FAILED, exit_status, capture, error, started_at, duration_ms)

    def _stop_remote(
        self, chan: asyncssh.SSHClientChannel[bytes], queue: asyncio.Queue[Item]
    ) -> list[asyncio.TimerHandle]:
        """SIGTERM now, SIGKILL after the grace, then close; give up if nothing answers."""
        loop = asyncio.get_running_loop()
        send_signal(chan, "TERM")
        return [
            loop.call_later(self._kill_grace, kill_now, chan),
            loop.call_later(self._kill_grace + _CONFIRM_KILL, queue.put_nowait, GIVE_UP),
        ]

    # -- uploads -------------------------------------------------------------------------

    async def upload(
        self,
        target: SshTarget,
        local_path: str | Path,
        remote_path: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the transfer's, as in run()
        on_started: StartedCallback | None = None,
        on_file: FileCallback | None = None,
        cancel: asyncio.Event | None = None,
        owner: str | None = None,
        group: str | None = None,
    ) -> UploadResult:
        """Copy a file or a directory tree to ``remote_path`` on ``target`` over SFTP.

        A directory's contents land in ``remote_path`` (created with its parents, like
        ``rsync -r local/ remote``), every subdirectory created as needed. A file lands at
        ``remote_path``, or inside it when that is an existing directory or ends with ``/``.
        Permission bits are copied. Each file succeeds or fails on its own (``on_file`` is
        told as it happens); a directory that cannot be created fails the files below it.
        Never raises for the host; ``timeout`` and ``cancel`` as for ``run``. ``owner`` and
        ``group`` (names looked up on the target, or numeric ids) are given to every file.
        """
        local = Path(local_path)
        uploaded: list[str] = []
        failed: list[tuple[str, str]] = []
        began = 0.0  # monotonic time of started_at

        def result(status: Outcome, error: str | None, started_at: datetime | None) -> UploadResult:
            duration = int((time.monotonic() - began) * 1000) if started_at is not None else None
            return UploadResult(
                status, uploaded, failed, error, started_at, datetime.now(UTC), duration
            )

        try:
            plan = await asyncio.to_thread(plan_upload, local)
        except OSError as e:
            return result(Outcome.FAILED, f"cannot read {local}: {e.strerror or e}", None)
        if cancel is not None and cancel.is_set():
            return result(Outcome.CANCELED, "canceled", None)
        async with self._slots:
            try:
                lease, sftp = await self._open(target, cancel, _start_sftp)
            except _Canceled:
                return result(Outcome.CANCELED, "canceled", None)
            except (SshConnectError, _OpenFailed) as e:
                return result(Outcome.FAILED, str(e), None)
            try:
                started_at, began = datetime.now(UTC), time.monotonic()
                if on_started is not None:
                    await _safely(on_started(started_at), "on_started")

                async def report(path: str, error: str | None) -> None:
                    if error is None:
                        uploaded.append(path)
                    else:
                        failed.append((path, error))
                    if on_file is not None:
                        await _safely(on_file(path, error), "on_file")

                ownership = None
                if owner or group:
                    try:
                        ownership = await resolve_ownership(lease.conn, owner, group)
                    except ValueError as e:
                        for path in plan.remote_files(remote_path):
                            await report(path, str(e))
                        return result(Outcome.FAILED, str(e), started_at)
                copying = asyncio.create_task(
                    transfer(
                        sftp,
                        plan,
                        remote_path,
                        report,
                        concurrency=self._upload_concurrency,
                        ownership=ownership,
                    )
                )
                stopped_by = await _wait_task(copying, timeout, cancel)
                if stopped_by is not None:
                    why = "canceled"
                    if stopped_by is Outcome.TIMED_OUT:
                        why = f"timed out after {timeout:g}s"
                    done = set(uploaded) | {path for path, _ in failed}
                    failed.extend(
                        (path, why) for path in plan.remote_files(remote_path) if path not in done
                    )
                    return result(stopped_by, why, started_at)
                try:
                    error = copying.result()
                except Exception as e:
                    # Not one file's problem: the connection or the SFTP session broke.
                    lease.discard()
                    error = f"upload to {target.endpoint} broke off: {error_reason(_first(e))}"
                status = Outcome.FAILED if failed or error else Outcome.SUCCEEDED
                return result(status, error, started_at)
            finally:
                sftp.exit()
                lease.release()


# -- helpers ---------------------------------------------------------------------------


def _first(e: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from a TaskGroup."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


class _Canceled(Exception):
    """The run's cancel event was set while waiting for something."""


class _OpenFailed(Exception):
    """Connected, but the server did not start the session (command or SFTP)."""


async def _until_canceled(awaitable: Awaitable[Lease], cancel: asyncio.Event | None) -> Lease:
    """Await ``awaitable`` unless ``cancel`` is set first (then raise ``_Canceled``)."""
    if cancel is None:
        return await awaitable
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if not cancel.is_set():
        return work.result()  # raises the connect error, if any
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
    elif not work.cancelled() and work.exception() is None:
        work.result().release()  # connected in the same instant as the cancel
    raise _Canceled


async def _wait_task(
    task: asyncio.Task[str | None], limit: float | None, cancel: asyncio.Event | None
) -> Outcome | None:
    """Wait for ``task``; stop it and say why if ``limit`` passes or ``cancel`` is set."""
    waits: set[asyncio.Future[Any]] = {task}
    if cancel is not None:
        waits.add(asyncio.ensure_future(cancel.wait()))
    try:
        await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        for waiter in waits - {task}:
            waiter.cancel()
    if task.done():
        return None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Outcome.CANCELED if cancel is not None and cancel.is_set() else Outcome.TIMED_OUT


async def _signal_on(cancel: asyncio.Event, queue: asyncio.Queue[Item]) -> None:
    await cancel.wait()
    queue.put_nowait(CANCEL)


async def _safely(awaitable: Awaitable[None], what: str) -> None:
    """Await a caller's callback; its failure is logged, never the run's failure."""
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("ssh: %s callback failed", what)


def _finished(
    status: Outcome,
    exit_code: int | None,
    capture: OutputCapture,
    error: str | None,
    started_at: datetime | None,
    duration_ms: int | None = None,
) -> SshResult:
    return SshResult(
        status=status,
        exit_code=exit_code,
        stdout=capture.text("stdout"),
        stderr=capture.text("stderr"),
        truncated=capture.truncated,
        error=error,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        duration_ms=duration_ms,
    )
