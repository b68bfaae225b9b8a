"""SSH connections, opened once and shared: bastion chains, reuse, idle close, clear errors.

A connection is keyed by the whole chain that leads to it (``(edge, inner, target)``): the
same server reached another way is another connection. Every hop is reached through the
previous hop's connection with a ``direct-tcpip`` channel, so a bastion connection is opened
once, however many targets sit behind it, and concurrent runs wait for the same connect
instead of racing to open their own. A failed connect is reported to everyone who waited for
it and is not cached: the next run tries again.

A target connection carries at most ``max_sessions`` concurrent sessions (OpenSSH's
``MaxSessions`` defaults to 10); past that another connection to the same target is opened.
Forwarded channels through a bastion are not sessions and are not limited.

Connections nobody uses are closed after ``idle_timeout``; a bastion counts as used while a
connection through it is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import asyncssh

from opsplane.domain.errors import TransportError
from opsplane.transport.ssh.endpoints import HostKeyPolicy, SshEndpoint
from opsplane.transport.ssh.hostkeys import KnownHosts, VerifyingClient

log = logging.getLogger(__name__)

Chain = tuple[SshEndpoint, ...]


class ConnectFailure(StrEnum):
    """Why a hop could not be reached; stable names for callers that branch on them."""

    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    AUTH = "auth"
    HOST_KEY = "host_key"
    PROTOCOL = "protocol"
    CREDENTIALS = "credentials"  # a key file that cannot be read or decrypted
    CLOSED = "closed"  # the executor is shutting down


class SshConnectError(TransportError):
    """A hop of a chain could not be reached. The message names the hop and says why."""

    def __init__(self, message: str, *, kind: ConnectFailure, endpoint: SshEndpoint, hop: int):
        super().__init__(message)
        self.kind = kind
        self.endpoint = endpoint
        # 0-based position in the chain: bastions first, the target last.
        self.hop = hop


@dataclass(frozen=True)
class _HopFailure:
    hop: int
    endpoint: SshEndpoint
    kind: ConnectFailure
    reason: str


class _HopError(Exception):
    """A connect of one chain prefix failed; shared by everyone who waited for it."""

    def __init__(self, failure: _HopFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def _closed_failure(key: Chain) -> _HopFailure:
    return _HopFailure(len(key) - 1, key[-1], ConnectFailure.CLOSED, "the SSH executor is closed")


def _connect_error(failure: _HopFailure, chain: Chain) -> SshConnectError:
    # The hop's position is the same in every chain sharing the prefix; only the wording
    # (which bastion of how many, or the target) depends on the chain of this caller.
    bastions = len(chain) - 1
    if failure.kind is ConnectFailure.CLOSED:
        message = failure.reason
    elif failure.hop < bastions:
        message = (
            f"bastion {failure.hop + 1} of {bastions} ({failure.endpoint}) failed: {failure.reason}"
        )
    else:
        via = f" via {','.join(str(b) for b in chain[:-1])}" if bastions else ""
        message = f"target {failure.endpoint}{via} failed: {failure.reason}"
    return SshConnectError(message, kind=failure.kind, endpoint=failure.endpoint, hop=failure.hop)


@dataclass(eq=False)
class _Connection:
    key: Chain
    conn: asyncssh.SSHClientConnection
    parent: _Connection | None
    last_used: float
    sessions: int = 0  # sessions (commands, SFTP) open on it now
    children: int = 0  # connections tunnelled through it now
    # Sessions it may carry at once: the pool's limit, lowered when the server refuses one.
    capacity: int = 1
    forgotten: bool = False

    @property
    def usable(self) -> bool:
        return not self.forgotten and not self.conn.is_closed()


class Lease:
    """One session's hold on a connection; ``release()`` it (or ``discard()`` it if broken)."""

    def __init__(self, pool: ConnectionPool, entry: _Connection, *, reused: bool) -> None:
        self._pool = pool
        self._entry = entry
        self.reused = reused
        self._released = False

    @property
    def conn(self) -> asyncssh.SSHClientConnection:
        return self._entry.conn

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release_session(self._entry)

    def discard(self) -> None:
        """The connection is broken: nobody gets it again, and it is closed."""
        self._pool._forget(self._entry, close=True)
        self.release()

    def refused(self) -> None:
        """The server refused one more session on this live connection (its MaxSessions).

        The connection then carries no more than the others open on it now, and so do new
        connections to the same server, so that the next session goes to another connection.
        This lease is given back.
        """
        self._pool._learn_limit(self._entry, max(1, self._entry.sessions - 1))
        self.release()


class ConnectionPool:
    """Opens, shares, reuses and closes the connections of one executor."""

    def __init__(
        self,
        policy: HostKeyPolicy,
        *,
        connect_timeout: float,
        keepalive_interval: float,
        keepalive_count_max: int,
        idle_timeout: float,
        max_sessions: int,
    ) -> None:
        self._known_hosts = KnownHosts(policy)
        self._connect_timeout = connect_timeout
        self._keepalive_interval = keepalive_interval
        self._keepalive_count_max = keepalive_count_max
        self._idle_timeout = idle_timeout
        self._max_sessions = max_sessions
        self._open: dict[Chain, list[_Connection]] = {}
        self._connecting: dict[Chain, asyncio.Task[_Connection]] = {}
        self._keypairs: dict[tuple[str | None, str | None, str | None], list[asyncssh.SSHKeyPair]]
        self._keypairs = {}
        # Sessions per connection a server accepted at most (learned from refusals).
        self._limits: dict[Chain, int] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        # For tests and the bench: how many SSH connections (any hop) this pool opened.
        self.opened = 0

    # -- acquiring -----------------------------------------------------------------------

    async def session(self, chain: Chain) -> Lease:
        """A connection to ``chain[-1]`` with room for one more session, opened if needed.

        Raises ``SshConnectError`` naming the hop that failed.
        """
        try:
            entry, reused = await self._acquire(chain, session=True)
        except _HopError as e:
            raise _connect_error(e.failure, chain) from None
        return Lease(self, entry, reused=reused)

    async def _acquire(self, key: Chain, *, session: bool) -> tuple[_Connection, bool]:
        if self._reaper is None and not self._closed:
            self._reaper = asyncio.create_task(self._reap(), name="ssh-idle-reaper")
        while True:
            if self._closed:
                raise _HopError(_closed_failure(key))
            entry = self._pick(key, session=session)
            if entry is not None:
                self._use(entry, session=session)
                return entry, True
            task = self._connecting.get(key)
            if task is None:
                task = asyncio.create_task(self._connect(key), name=f"ssh-connect-{key[-1]}")
                self._connecting[key] = task
                task.add_done_callback(functools.partial(self._connect_done, key))
            # Shielded: a caller that gives up (cancel, timeout) must not abort a connect
            # that other runs wait for; a finished connect just idles in the pool.
            try:
                fresh = await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and (current is None or not current.cancelling()):
                    # close() stopped the connect, not our caller: a failure, not a cancel.
                    raise _HopError(_closed_failure(key)) from None
                raise
            if fresh.usable and (not session or fresh.sessions < fresh.capacity):
                self._use(fresh, session=session)
                return fresh, False
            # Others took its sessions first: look again, and open another if need be.

    def _connect_done(self, key: Chain, task: asyncio.Task[_Connection]) -> None:
        if self._connecting.get(key) is task:
            del self._connecting[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter gave up

    def _pick(self, key: Chain, *, session: bool) -> _Connection | None:
        entries = self._open.get(key)
        if not entries:
            return None
        best: _Connection | None = None
        for entry in list(entries):
            if not entry.usable:
                self._forget(entry, close=False)
                continue
            if session and entry.sessions >= entry.capacity:
                continue
            # The least loaded one spreads sessions over the connections there are.
            if best is None or entry.sessions < best.sessions:
                best = entry
        return best

    def _use(self, entry: _Connection, *, session: bool) -> None:
        if session:
            entry.sessions += 1
        else:
            entry.children += 1
        entry.last_used = time.monotonic()

    def _release_session(self, entry: _Connection) -> None:
        entry.sessions -= 1
        entry.last_used = time.monotonic()

    def _learn_limit(self, entry: _Connection, limit: int) -> None:
        limit = min(limit, self._limits.get(entry.key, limit))
        self._limits[entry.key] = limit
        for other in self._open.get(entry.key, []):
            other.capacity = min(other.capacity, limit)
        log.info("ssh: %s accepts only %d sessions per connection", entry.key[-1], limit)

    def _forget(self, entry: _Connection, *, close: bool) -> None:
        """Take ``entry`` out of the pool (once); its bastion loses a user."""
        if not entry.forgotten:
            entry.forgotten = True
            entries = self._open.get(entry.key, [])
            if entry in entries:
                entries.remove(entry)
            if not entries:
                self._open.pop(entry.key, None)
            if entry.parent is not None:
                entry.parent.children -= 1
                entry.parent.last_used = time.monotonic()
        if close:
            entry.conn.close()

    # -- connecting ----------------------------------------------------------------------

    async def _connect(self, key: Chain) -> _Connection:
        parent: _Connection | None = None
        if len(key) > 1:
            parent, _ = await self._acquire(key[:-1], session=False)
        try:
            conn = await self._open_connection(key, parent)
        except BaseException:
            if parent is not None:
                parent.children -= 1
                parent.last_used = time.monotonic()
            raise
        if self._closed:
            conn.close()
            raise _HopError(_closed_failure(key))
        capacity = self._limits.get(key, self._max_sessions)
        entry = _Connection(key, conn, parent, last_used=time.monotonic(), capacity=capacity)
        self._open.setdefault(key, []).append(entry)
        self.opened += 1
        return entry

    async def _open_connection(
        self, key: Chain, parent: _Connection | None
    ) -> asyncssh.SSHClientConnection:
        endpoint = key[-1]
        hop = len(key) - 1
        client = VerifyingClient(self._known_hosts, endpoint)
        options: dict[str, object] = {
            "username": endpoint.username,
            "known_hosts": self._known_hosts.current(),
            "client_factory": lambda: client,
            # Settings come from opsplane's configuration and the request, not from the
            # service account's ~/.ssh/config, which would make behaviour depend on the box.
            "config": None,
            "gss_auth": False,
            "gss_kex": False,
            "connect_timeout": self._connect_timeout,
            "keepalive_interval": self._keepalive_interval,
            "keepalive_count_max": self._keepalive_count_max,
        }
        keypairs = await self._keypairs_for(endpoint, hop)
        if keypairs is not None:
            # Exactly the configured key: an agent offering others first could exhaust the
            # server's MaxAuthTries before the right one.
            options["client_keys"] = keypairs
            options["agent_path"] = None
        elif endpoint.password is not None:
            options["client_keys"] = None  # password only; no agent, no default keys
        if endpoint.password is not None:
            options["password"] = endpoint.password
        if parent is not None:
            options["tunnel"] = parent.conn
        try:
            return await asyncssh.connect(endpoint.host, endpoint.port, **options)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failure = self._describe(e, client, endpoint, hop, tunnelled=parent is not None)
            log.info("ssh connect to %s failed: %s", endpoint, failure.reason)
            raise _HopError(failure) from e

    async def _keypairs_for(
        self, endpoint: SshEndpoint, hop: int
    ) -> list[asyncssh.SSHKeyPair] | None:
        if endpoint.key_file is None and endpoint.private_key is None:
            return None
        cache_key = (endpoint.key_file, endpoint.private_key, endpoint.passphrase)
        cached = self._keypairs.get(cache_key)
        if cached is not None:
            return cached
        key_file, private_key, passphrase = cache_key
        try:
            # Decrypting a key (bcrypt KDF) takes a noticeable time: off the event loop,
            # once per key. A key file's "-cert.pub" certificate is picked up as ssh does.
            if key_file is not None:
                loaded = await asyncio.to_thread(_load_key_file, key_file, passphrase)
            else:
                assert private_key is not None
                key = await asyncio.to_thread(asyncssh.import_private_key, private_key, passphrase)
                loaded = await asyncio.to_thread(asyncssh.load_keypairs, [key])
        except (OSError, asyncssh.KeyImportError, ValueError) as e:
            where = f"key file {key_file}" if key_file is not None else "the inline private key"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise _HopError(
                _HopFailure(
                    hop, endpoint, ConnectFailure.CREDENTIALS, f"cannot use {where}: {reason}"
                )
            ) from None
        keypairs = list(loaded)
        self._keypairs[cache_key] = keypairs
        return keypairs

    def _describe(
        self,
        e: Exception,
        client: VerifyingClient,
        endpoint: SshEndpoint,
        hop: int,
        *,
        tunnelled: bool,
    ) -> _HopFailure:
        kind: ConnectFailure
        if isinstance(e, asyncssh.HostKeyNotVerifiable):
            kind = ConnectFailure.HOST_KEY
            reason = client.problem or f"host key verification failed: {e.reason}"
        elif isinstance(e, asyncssh.PermissionDenied):
            kind = ConnectFailure.AUTH
            reason = (
                f"authentication failed for user {endpoint.username} "
                f"(offered: {endpoint.auth_methods})"
            )
        elif isinstance(e, asyncssh.ChannelOpenError):
            # The previous hop accepted us but could not reach this one.
            kind = ConnectFailure.UNREACHABLE
            if "refused" in e.reason.lower():
                kind = ConnectFailure.REFUSED
            reason = f"the bastion could not connect to {endpoint.address}: {e.reason}"
        elif isinstance(e, ConnectionRefusedError):
            kind, reason = ConnectFailure.REFUSED, f"connection to {endpoint.address} refused"
        elif isinstance(e, TimeoutError):
            kind = ConnectFailure.TIMEOUT
            reason = f"no SSH session with {endpoint.address} within {self._connect_timeout:g}s"
        elif isinstance(e, socket.gaierror):
            kind = ConnectFailure.UNREACHABLE
            reason = f"cannot resolve {endpoint.host}: {e.strerror}"
        elif isinstance(e, OSError):
            kind = ConnectFailure.UNREACHABLE
            reason = f"cannot connect to {endpoint.address}: {e.strerror or e}"
        elif isinstance(e, asyncssh.KeyExchangeFailed):
            # Also what a known_hosts entry of another key type than the server's looks
            # like: asyncssh then offers only the listed type.
            kind, reason = ConnectFailure.PROTOCOL, f"key exchange failed: {e.reason}"
        elif isinstance(e, asyncssh.DisconnectError):
            kind, reason = ConnectFailure.PROTOCOL, f"disconnected: {e.reason}"
        else:
            kind, reason = ConnectFailure.PROTOCOL, f"{type(e).__name__}: {e}"
        if tunnelled and kind is ConnectFailure.TIMEOUT:
            reason += " (through the bastion)"
        return _HopFailure(hop, endpoint, kind, reason)

    # -- closing -------------------------------------------------------------------------

    async def _reap(self) -> None:
        interval = max(0.05, min(self._idle_timeout / 2, 5.0))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            # Deepest first: a target closed now frees its bastion for a later round.
            for key in sorted(self._open, key=len, reverse=True):
                for entry in list(self._open.get(key, [])):
                    if not entry.usable:
                        self._forget(entry, close=False)
                    elif (
                        entry.sessions == 0
                        and entry.children == 0
                        and now - entry.last_used >= self._idle_timeout
                    ):
                        log.debug("closing idle ssh connection to %s", entry.key[-1])
                        self._forget(entry, close=True)

    def connections(self) -> int:
        """How many connections (all hops) are open in the pool now."""
        return sum(1 for entries in self._open.values() for e in entries if e.usable)

    async def close(self, grace: float = 5.0) -> None:
        """Close every connection, targets before their bastions; waits at most ``grace``."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for connecting in list(self._connecting.values()):
            connecting.cancel()
        entries = sorted(
            (e for es in self._open.values() for e in es), key=lambda e: len(e.key), reverse=True
        )
        for entry in entries:
            self._forget(entry, close=True)
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(e.conn.wait_closed()) for e in entries
        ]
        waits += self._connecting.values()
        if self._reaper is not None:
            waits.append(self._reaper)
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            for future in pending:
                future.cancel()
            # Collect the outcomes so that nothing is reported as never retrieved.
            for future in waits:
                if future.done() and not future.cancelled():
                    with contextlib.suppress(Exception):
                        future.result()


def _load_key_file(key_file: str, passphrase: str | None) -> Sequence[asyncssh.SSHKeyPair]:
    return asyncssh.load_keypairs([str(Path(key_file).expanduser())], passphrase)


def error_reason(e: BaseException) -> str:
    """The human part of an asyncssh or OS error, for messages."""
    if isinstance(e, asyncssh.SFTPError | asyncssh.DisconnectError | asyncssh.ChannelOpenError):
        return e.reason
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
