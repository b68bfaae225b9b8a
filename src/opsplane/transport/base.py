"""The Link interface: how a run reaches a host (DESIGN §1). One contract, one module per link.

A link never touches the store: it reports what hosts say through ``LinkEvents`` (implemented
by the engine) and delivers what the engine asks it to send.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

Stream = Literal["stdout", "stderr"]

# The link of the control plane's own host, which runs catalog scripts (transport/local.py).
LOCAL_LINK = "local"
# Links whose hosts run an agent that registers itself (the others are the inventory's).
AGENT_LINKS = frozenset({"grpc", "amqp"})
# The link of agentless hosts, reached over SSH (transport/ssh).
SSH_LINK = "ssh"


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
    # Set for upload tasks: copy this local file or directory (recursively) to remote_path.
    upload: UploadSpec | None = None


@dataclass(frozen=True)
class UploadSpec:
    local_path: str
    remote_path: str


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
    abandoned_run_ids: frozenset[str] = frozenset()
    public_key: str = ""
    # Whether the lists above are complete, so that runs missing from them can be ended. A
    # registration from a plain heartbeat (seed 002 agents) says nothing about runs.
    reconcile: bool = True
    # Runs dispatched before this instant are reconciled against the lists above; later ones
    # may still be on their way to the agent (a queue is not a stream: no ordering with hello).
    reconcile_before: datetime | None = None


@dataclass(frozen=True)
class HeartbeatReport:
    hostname: str
    at: datetime
    cpu_usage: float | None = None
    memory_usage: float | None = None
    load: float | None = None
    disk_usage: float | None = None


# Reports name their run by ``run_id``; an agent that knows only the seed's fields names it by
# ``task_id`` (and maybe ``attempt``) instead, and the engine finds the host's run of that task.


@dataclass(frozen=True)
class RunStarted:
    hostname: str
    run_id: str | None
    started_at: datetime
    task_id: str | None = None
    attempt: int | None = None


@dataclass(frozen=True)
class RunOutput:
    hostname: str
    run_id: str | None
    stream: Stream
    seq: int
    data: bytes
    task_id: str | None = None
    attempt: int | None = None


@dataclass(frozen=True)
class RunFinished:
    hostname: str
    run_id: str | None
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    error: str | None
    started_at: datetime | None
    finished_at: datetime
    duration_ms: int | None
    task_id: str | None = None
    attempt: int | None = None


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

    def agent_refusal(self, hostname: str, public_key: str, groups: Iterable[str]) -> str | None:
        """Why an agent saying hello is refused (not enrolled when enrollment is required,
        revoked, another key, groups it was not enrolled for), or None. The link has checked
        that the agent holds ``public_key``."""
        ...

    def agent_key(self, hostname: str) -> AgentKey | None:
        """The enrolled key that messages claiming to come from ``hostname`` must be signed
        with, or None for an agent that never enrolled."""
        ...

    def message_refused(self, link: str, reason: str) -> None:
        """Count a message refused for its signature, its age, or its sender."""
        ...


@dataclass(frozen=True)
class AgentKey:
    key: Ed25519PublicKey
    revoked: bool


@dataclass(frozen=True)
class Fanout:
    """One message for many hosts: a group's members (``group``), or every host (None)."""

    group: str | None
    # host name → the run that host is to execute
    run_ids: Mapping[str, str]
    envelope: CommandEnvelope  # run_id unused: each host finds its own in run_ids


class Link(abc.ABC):
    """A way to reach hosts. Long-lived: ``start`` then ``stop``."""

    name: ClassVar[str]
    # Whether ``send_fanout`` publishes a group or broadcast once instead of once per host.
    supports_fanout: ClassVar[bool] = False
    # Whether this link's hosts are online only while they connect and heartbeat. False for
    # hosts reachable by definition: the control plane's own, and agentless inventory hosts.
    liveness_by_heartbeat: ClassVar[bool] = True

    @property
    def executes_here(self) -> bool:
        """Whether this link's runs execute in this process (the control plane's own host,
        SSH without workers). A run handed to such a link may wait there for a free slot, but
        it is never lost in transit: the link reports how it ended while this process lives,
        so the start timeout does not apply to it; and whatever this process was running when
        it died ended with it, so recovery settles such runs at the next start."""
        return False

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

    def update_inventory(self, hostname: str, spec: Mapping[str, Any] | None) -> None:  # noqa: B027
        """How to reach an inventory host (agentless links), or None when it is removed.

        ``spec`` may carry secrets that only live in memory; links whose hosts dial in have no
        inventory and ignore this.
        """

    async def drop(self, hostname: str, reason: str) -> None:  # noqa: B027
        """Close ``hostname``'s live connection, if this link holds one (a revoked agent).
        Links that check every message against the agent's key need do nothing."""

    async def send_fanout(self, fanout: Fanout) -> None:
        """Deliver one message to a group or to all; raises like ``send_command``."""
        raise NotImplementedError(f"the {self.name} link cannot fan out")

    @abc.abstractmethod
    async def send_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        """Ask the host to stop a run; raises ``NotConnected`` or ``ConnectionLost``."""
