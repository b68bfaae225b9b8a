"""The SSH work-queue contract: what ``SshLink`` asks of the queue that hands runs to
``opsplane worker`` processes. ``worker.WorkQueue`` implements it over RabbitMQ; the link knows
only this, so that link.py and worker.py do not import each other (worker.py builds on the
link, never the other way)."""

from __future__ import annotations

from typing import Protocol

from opsplane.transport.base import CommandEnvelope
from opsplane.transport.ssh.endpoints import SshTarget


class WorkPublisher(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish_work(
        self, hostname: str, target: SshTarget, command: CommandEnvelope
    ) -> None:
        """Queue one run for a worker; raises NotConnected or ConnectionLost if it cannot."""

    async def publish_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        """Tell every worker to kill the run if it holds it."""
