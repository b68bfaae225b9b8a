"""An in-memory link: a real, supported ``Link`` for engine tests and simulations (like
dramatiq's ``StubBroker``). Never a stand-in for gRPC in integration tests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from opsplane.domain.errors import NotConnected
from opsplane.transport.base import AgentHello, CommandEnvelope, Link, LinkEvents


@dataclass
class MemoryHost:
    """What the link delivered to one simulated host."""

    commands: list[CommandEnvelope] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)


class MemoryLink(Link):
    name: ClassVar[str] = "grpc"

    def __init__(self) -> None:
        self.events: LinkEvents | None = None
        self.hosts: dict[str, MemoryHost] = {}
        self._connected: set[str] = set()

    async def start(self, events: LinkEvents) -> None:
        self.events = events

    async def stop(self) -> None:
        self._connected.clear()

    def is_connected(self, hostname: str) -> bool:
        return hostname in self._connected

    async def send_command(self, hostname: str, command: CommandEnvelope) -> None:
        self._require(hostname).commands.append(command)

    async def send_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        self._require(hostname).cancels.append(run_id)

    def _require(self, hostname: str) -> MemoryHost:
        if hostname not in self._connected:
            raise NotConnected(f"{hostname} is not connected")
        return self.hosts[hostname]

    async def connect(
        self,
        hostname: str,
        groups: Iterable[str] = (),
        *,
        running: Iterable[str] = (),
        finished: Iterable[str] = (),
        abandoned: Iterable[str] = (),
    ) -> None:
        """Simulate an agent's hello."""
        assert self.events is not None, "start() the link first"
        hello = AgentHello(
            hostname=hostname,
            link=self.name,
            groups=tuple(groups),
            running_run_ids=frozenset(running),
            finished_run_ids=frozenset(finished),
            abandoned_run_ids=frozenset(abandoned),
        )
        await self.events.host_connected(hello)
        self.hosts.setdefault(hostname, MemoryHost())
        self._connected.add(hostname)

    async def disconnect(self, hostname: str) -> None:
        assert self.events is not None
        self._connected.discard(hostname)
        await self.events.host_disconnected(hostname, self.name)
