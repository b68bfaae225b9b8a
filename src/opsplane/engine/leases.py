"""This instance's leases on singleton duties (DESIGN §7, docs/instances.md).

Several control-plane instances may share one database; a duty that must run once across all
of them claims its lease: database retention before each of its passes (``Lease``), the
monitor's run checks, the scheduler's deadlines and alert delivery through :class:`Duties`,
which also renews the instance's own liveness lease (``instance:<name>``). The holder renews
a lease; when it dies, another instance takes over once the lease's time has passed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta

from opsplane.engine.background import Supervised
from opsplane.engine.changes import Changes
from opsplane.store.leases import (
    claim_lease,
    current_holders,
    drop_expired_lease,
    expired_leases,
    release_lease,
    release_streams_of,
    stream_holders,
)

log = logging.getLogger(__name__)


def instance_name() -> str:
    """A name for this engine as a lease holder, unique even for two engines in one process
    (a restarted instance is a new holder: it takes its duties back once their leases expire)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Lease:
    """The lease of one duty, claimed and renewed by one instance."""

    def __init__(
        self,
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        name: str,
        *,
        holder: str,
        ttl: float,
    ) -> None:
        self.name = name
        self.holder = holder
        self._write = write
        self._ttl = timedelta(seconds=ttl)
        self.held = False

    async def claim(self) -> bool:
        """Whether this instance holds the lease now (taken, renewed, or refused)."""
        async with self._write() as changes:
            held = await claim_lease(changes.session, self.name, self.holder, self._ttl)
        if held != self.held:
            log.info("%s %s the %s lease", self.holder, "took" if held else "lost", self.name)
        self.held = held
        return held

    async def release(self) -> None:
        """Give the lease up (a clean stop), so that another instance need not wait for it."""
        if not self.held:
            return
        async with self._write() as changes:
            await release_lease(changes.session, self.name, self.holder)
        self.held = False


#: The leases of the singleton duties :class:`Duties` holds: ``monitor`` (the monitor's run
#: checks, the scheduler's deadlines, the takeover of dead instances) and ``alerts``.
DUTIES = ("monitor", "alerts")
INSTANCE_PREFIX = "instance:"


class Duties:
    """This instance's liveness lease and its claims on the singleton duties.

    Every ``ttl / 3`` seconds one write transaction renews ``instance:<holder>`` and claims
    (or renews) each duty's lease. The holder of ``monitor`` also takes over the instances
    that died: those named by a host row whose liveness lease has expired (and, with ``alive``,
    whose RabbitMQ queue is gone too: an instance that only failed to renew, its database cut
    for a while, keeps its streams). Their hosts go offline, held by none; the monitor ends
    their in-flight runs ``lost`` after ``lost_grace``, as for any host that went away.

    ``holds(duty)`` is False once the last renewal is older than ``ttl`` minus a renewal
    period, so an instance that cannot reach the database stops a duty before another may
    take it over."""

    def __init__(
        self,
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        *,
        holder: str,
        ttl: float,
        duties: Iterable[str] = DUTIES,
        alive: Callable[[set[str]], Awaitable[set[str]]] | None = None,
        on_takeover: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.holder = holder
        self._write = write
        self._ttl = ttl
        self._period = ttl / 3
        self._duties = tuple(duties)
        self._alive = alive
        self._on_takeover = on_takeover
        self._held: dict[str, float] = {}  # duty -> monotonic time of its last renewal
        #: Passes of each duty this instance ran while holding its lease (the duties count).
        self.passes: Counter[str] = Counter()
        #: Instances this one took over (their hosts released), oldest first.
        self.taken_over: list[str] = []
        self.loop = Supervised("leases", self._loop)

    def holds(self, duty: str) -> bool:
        """Whether this instance holds ``duty``'s lease now, with time to spare."""
        renewed = self._held.get(duty)
        return renewed is not None and time.monotonic() - renewed < self._ttl - self._period

    def ran(self, duty: str) -> bool:
        """``holds(duty)``, counting a pass of it when it does: call once per pass."""
        if self.holds(duty):
            self.passes[duty] += 1
            return True
        return False

    async def start(self) -> None:
        """Claim the liveness lease (and the duties free now) before serving anything, so that
        no other instance takes this one's streams for a dead one's; then renew them."""
        await self.claim_once()
        self.loop.start()

    async def stop(self) -> None:
        """Give every lease up: another instance takes the duties at its next renewal."""
        await self.loop.stop()
        self._held.clear()
        try:
            async with self._write() as changes:
                for name in (*self._duties, INSTANCE_PREFIX + self.holder):
                    await release_lease(changes.session, name, self.holder)
        except Exception as e:
            log.warning("could not release the leases of %s: %s", self.holder, e)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            try:
                await self.claim_once()
            except Exception as e:
                # Typically the database is unreachable: holds() turns False before any lease
                # of ours can expire, so the duties stop here before another instance starts.
                log.warning("renewing the leases failed; retrying in %.1fs: %r", self._period, e)

    async def claim_once(self) -> None:
        """Renew the liveness lease, claim the duties; as the monitor, take over dead
        instances."""
        ttl = timedelta(seconds=self._ttl)
        began = time.monotonic()
        async with self._write() as changes:
            session = changes.session
            held = {
                name: await claim_lease(session, name, self.holder, ttl)
                for name in (INSTANCE_PREFIX + self.holder, *self._duties)
            }
        for name in self._duties:
            if held[name] != (name in self._held):
                log.info("%s %s the %s lease", self.holder, "took" if held[name] else "lost", name)
            if held[name]:
                self._held[name] = began
            else:
                self._held.pop(name, None)
        if self.holds("monitor"):
            await self._take_over_dead()

    async def _take_over_dead(self) -> None:
        async with self._write() as changes:
            session = changes.session
            live = {
                name.removeprefix(INSTANCE_PREFIX)
                for name in await current_holders(session, INSTANCE_PREFIX)
            }
            expired = {
                name.removeprefix(INSTANCE_PREFIX)
                for name in await expired_leases(session, INSTANCE_PREFIX)
            }
            # An instance with no lease at all held streams before leases existed, or wrote
            # its hosts and died before its first renewal: dead as well once its queue is.
            dead = (await stream_holders(session) | expired) - live - {self.holder}
        if not dead:
            return
        if self._alive is not None:
            dead -= await self._alive(dead)
        released: list[str] = []
        for instance in sorted(dead):
            async with self._write() as changes:
                names = await release_streams_of(changes.session, instance)
                for name in names:
                    changes.host_changed(name)
                await drop_expired_lease(changes.session, INSTANCE_PREFIX + instance)
            self.taken_over.append(instance)
            released += names
            log.warning(
                "instance %s is gone (its lease expired): %d of its hosts are offline until "
                "they reconnect",
                instance,
                len(names),
            )
        if released and self._on_takeover is not None:
            self._on_takeover(released)
