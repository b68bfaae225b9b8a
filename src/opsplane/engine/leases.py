"""This instance's leases on singleton duties (DESIGN §7, docs/instances.md).

Several control-plane instances may share one database; a duty that must run once across all
of them (database retention today) claims its lease before each pass. The holder renews it at
every pass; when the holder dies, another instance takes over once ``ttl`` has passed.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta

from opsplane.engine.changes import Changes
from opsplane.store.leases import claim_lease, release_lease

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
