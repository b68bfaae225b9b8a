"""A command's SSH session: the command line, its output queue, and how it is stopped.

Output is queued as it arrives, in arrival order across both streams, for one consumer (the
executor) that wakes for output and for the few reasons to stop waiting (``Wake``). Reading
pauses while too much output waits, so that a slow consumer slows the remote command through
SSH flow control instead of filling memory.

Stopping: OpenSSH (7.9+) delivers a ``signal`` channel request with ``killpg`` on the
session's process group, and a command run without a terminal stays in that group together
with everything it starts in the background. Closing the channel alone would leave
``sleep 1000`` running on the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import asyncssh

from opsplane.domain.tasks import is_env_name
from opsplane.execution import Stream

# Reading pauses while this much output waits for the consumer, and resumes below the other.
_PAUSE_ABOVE = 1024 * 1024
_RESUME_BELOW = 256 * 1024


class Wake:
    """Why the consumer of a session was woken without output."""

    def __init__(self, name: str) -> None:
        self.name = name


CLOSED: Final = Wake("closed")
TIMEOUT: Final = Wake("timeout")
CANCEL: Final = Wake("cancel")
GIVE_UP: Final = Wake("give up")
SHUTDOWN: Final = Wake("shutdown")

Item = tuple[Stream, bytes] | Wake


class RunSession(asyncssh.SSHClientSession[bytes]):
    """Queues a command's output as it arrives, in arrival order across both streams."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.buffered = 0
        self.paused = False
        self.lost: Exception | None = None
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        stream: Stream = "stderr" if datatype == asyncssh.EXTENDED_DATA_STDERR else "stdout"
        self.queue.put_nowait((stream, data))
        self.buffered += len(data)
        if self.buffered > _PAUSE_ABOVE and not self.paused and self._chan is not None:
            self.paused = True
            self._chan.pause_reading()

    def consumed(self, size: int) -> None:
        self.buffered -= size
        if self.paused and self.buffered < _RESUME_BELOW and self._chan is not None:
            self.paused = False
            self._chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc
        self.queue.put_nowait(CLOSED)


def start_command(
    line: str,
) -> Callable[
    [asyncssh.SSHClientConnection],
    Awaitable[tuple[asyncssh.SSHClientChannel[bytes], RunSession]],
]:
    """An opener that executes ``line`` in a new session of a connection.

    Nothing from the client's own environment is forwarded (``env``/``send_env`` off):
    what the command sees is the target's login environment plus what ``line`` exports.
    """

    async def start(
        conn: asyncssh.SSHClientConnection,
    ) -> tuple[asyncssh.SSHClientChannel[bytes], RunSession]:
        session = RunSession()
        chan, _ = await conn.create_session(
            lambda: session, line, encoding=None, env=None, send_env=None
        )
        return chan, session

    return start


# The first lines of every remote command: a guard that kills the command's process group
# (``kill -9 0``) once the channel's stdin reaches end of file. The client never sends EOF, so
# that happens when the channel closes or the connection drops: a control plane that died (even
# by ``kill -9``) does not leave its commands running on the targets, which sshd would do for a
# command without a terminal. The guard is started by a subshell that exits at once, so it is
# no job of the command's shell (a ``wait`` there does not wait for it); it keeps only the
# channel's stdin, so it holds no output open. The command itself reads /dev/null, as before.
_GUARD = (
    "exec 3<&0 0</dev/null\n"
    "( { while read -r _; do :; done; kill -9 0; } <&3 >/dev/null 2>&1 & )\n"
    "exec 3<&-"
)


def remote_command(
    command: str, env: Mapping[str, str] | None = None, cwd: str | None = None
) -> str:
    """The command line sent to the server: the guard (see ``_GUARD``), then ``env``
    exported and ``cwd`` entered, then the command.

    Environment goes in the command line rather than in SSH ``env`` requests, which sshd
    silently drops unless ``AcceptEnv`` lists them. Needs a POSIX login shell (sh, bash,
    dash, zsh, ksh) on the target, which sshd runs the command with. The channel's stdin must
    stay open while the command runs (the guard ends the command at its end of file).
    """
    lines = [_GUARD]
    for name, value in (env or {}).items():
        if not is_env_name(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    if cwd:
        lines.append(f"cd {shlex.quote(cwd)} || exit 1")
    return "\n".join([*lines, command])


def exited(chan: asyncssh.SSHClientChannel[bytes]) -> bool:
    """Whether the server already reported how the command ended (only the close is due)."""
    return chan.get_exit_status() is not None or chan.get_exit_signal() is not None


def send_signal(chan: asyncssh.SSHClientChannel[bytes], name: str) -> None:
    # Fails only when the channel is already closing, which is what we want anyway.
    with contextlib.suppress(Exception):
        chan.send_signal(name)


def kill_now(chan: asyncssh.SSHClientChannel[bytes]) -> None:
    """SIGKILL the remote process group, then close the channel (in this order: the server
    handles channel requests in order, so the kill is done before the close is confirmed)."""
    send_signal(chan, "KILL")
    chan.close()


async def wait_closed(channels: list[asyncssh.SSHClientChannel[bytes]], bound: float) -> None:
    """Wait at most ``bound`` seconds for the channels to close; never raises for them."""
    waits = [asyncio.ensure_future(chan.wait_closed()) for chan in channels]
    try:
        await asyncio.wait(waits, timeout=bound)
    finally:
        for waiter in waits:
            waiter.cancel()
