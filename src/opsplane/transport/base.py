"""The Link interface: how a run reaches a host (DESIGN §1). One contract, one module per link.

A link never touches the store: it reports what hosts say through ``LinkEvents`` (implemented
by the engine) and delivers what the engine asks it to send.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal, Protocol

Stream = Literal["stdout", "stderr"]

# The link of the control plane's own host, which runs catalog scripts (transport/local.py).
LOCAL_LINK = "local"


@dataclass(frozen=True)
class CommandEnvelope:
    """A run as sent to a host."""

    task_id: str
    run_id: str
    attempt: int
    command: str
    timeout: int
    env: Mapping[str, str] = field(default_factory=dict)
    user: str = ""
    deliver_by: float | None = None
    # Set for script tasks: run this argv without a shell, or this in-process handler.
    argv: tuple[str, ...] | None = None
    handler: str | None = None
    args: tuple[str, ...] = ()
    cwd: str | None = None


@dataclass(frozen=True)
class AgentHello:
    """What an agent says of itself when it connects."""

    hostname: str
    link: str
    version: str = ""
    groups: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    os: str = ""
    running_run_ids: frozenset[str] = frozenset()
    finished_run_ids: frozenset[str] = frozenset()
    public_key: str = ""


@dataclass(frozen=True)
class HeartbeatReport:
    hostname: str
    at: datetime
    cpu_usage: float | None = None
    memory_usage: float | None = None
    load: float | None = None
    disk_usage: float | None = None


@dataclass(frozen=True)
class RunStarted:
    hostname: str
    run_id: str
    started_at: datetime


@dataclass(frozen=True)
class RunOutput:
    hostname: str
    run_id: str
    stream: Stream
    seq: int
    data: bytes


@dataclass(frozen=True)
class RunFinished:
    hostname: str
    run_id: str
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    error: str | None
    started_at: datetime | None
    finished_at: datetime
    duration_ms: int | None


HostReport = HeartbeatReport | RunStarted | RunOutput | RunFinished


class LinkEvents(Protocol):
    """What a link tells the engine. Implemented by ``opsplane.engine``."""

    async def host_connected(self, hello: AgentHello) -> None:
        """A host (re)connected; returns once the engine has reconciled its runs."""

    async def host_disconnected(self, hostname: str, link: str) -> None:
        """The host's connection on ``link`` ended."""

    async def report(self, report: HostReport) -> asyncio.Future[None]:
        """Queue a report; the future completes once its effect is durable."""
        ...


class Link(abc.ABC):
    """A way to reach hosts. Long-lived: ``start`` then ``stop``."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def start(self, events: LinkEvents) -> None:
        """Begin accepting hosts and reporting to ``events``."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop accepting, close connections within a bounded time."""

    @abc.abstractmethod
    def is_connected(self, hostname: str) -> bool:
        """Whether a command sent now can reach ``hostname``."""

    @abc.abstractmethod
    async def send_command(self, hostname: str, command: CommandEnvelope) -> None:
        """Deliver a run; raises ``NotConnected`` or ``ConnectionLost``."""

    @abc.abstractmethod
    async def send_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        """Ask the host to stop a run; raises ``NotConnected`` or ``ConnectionLost``."""
