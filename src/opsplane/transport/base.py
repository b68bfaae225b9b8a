"""The Link interface: how a run reaches a host (DESIGN §1). One contract, one module per link.

A link never touches the store: it reports what hosts say through ``LinkEvents`` (implemented
by the engine) and delivers what the engine asks it to send.
"""

from __future__ import annotations

import abc
import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from opsplane.domain.errors import InvalidInput

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
    # The account the command runs as (seed 002's ``user``); empty: the agent's own account.
    user: str = ""
    # Who asked for it (the API caller), for the host's logs; never an account to run as.
    submitted_by: str = ""
    deliver_by: float | None = None
    # Set for script tasks: run this argv without a shell, or this in-process handler.
    argv: tuple[str, ...] | None = None
    handler: str | None = None
    args: tuple[str, ...] = ()
    cwd: str | None = None
    # Set for upload tasks: copy this local file or directory (recursively) to remote_path.
    upload: UploadSpec | None = None
    # The runs this one was dispatched with, on a link that ``signs_batches``.
    batch: CommandBatch | None = field(default=None, compare=False, repr=False)


@dataclass(eq=False)
class CommandBatch:
    """Runs of one task dispatched together to one link whose envelopes are equal but for
    ``run_id``: the link may sign their content once and bind each host to its run through
    the signed run map (docs/security.md, "One signature per batch")."""

    # host → run id, in dispatch order.
    run_ids: dict[str, str] = field(default_factory=dict)
    # What a link made of the batch at its first send (its signed form), by link name: made
    # once, reused for every other host of the batch.
    sealed: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadSpec:
    local_path: str
    remote_path: str
    # Owner and group (names or numeric ids) of every file written; None: the writer's.
    owner: str | None = None
    group: str | None = None


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
    # Whether the agent said its groups and labels: a heartbeat in seed 002's shape says
    # nothing of them, and then the inventory's stay (an operator gave them).
    reports_groups: bool = True
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

# The statuses a host may end a run with. "undeliverable": the agent received the command after
# its delivery deadline and never ran it.
FINAL_STATUSES = frozenset({"succeeded", "failed", "timed_out", "canceled", "undeliverable"})
STREAMS = frozenset({"stdout", "stderr"})
_INT32 = 2**31
_INT64 = 2**63
# Run and task ids are UUIDs; anything much longer is not an id of ours.
_MAX_ID = 64


def timestamp(seconds: float) -> datetime | None:
    """Seconds since the epoch as an aware datetime; None for 0 or less (not given).
    InvalidInput for what is no time at all (NaN, infinite, past year 9999)."""
    if not math.isfinite(seconds):
        raise InvalidInput(f"not a time: {seconds!r}")
    if seconds <= 0:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError) as e:
        raise InvalidInput(f"not a time: {seconds!r}") from e


_Report = TypeVar("_Report", bound=HostReport)


def check_report(report: _Report) -> _Report:
    """``report`` when the engine can take it, else InvalidInput saying why: every link checks
    what a host sent before it goes to ingest (a wrong status, type or missing field is the
    sender's problem, refused and counted at the edge, never an error in ingest)."""
    if not isinstance(report.hostname, str) or not report.hostname:
        raise InvalidInput("a report needs its host's name")
    if isinstance(report, HeartbeatReport):
        _check_time(report.at, "at")
        for name in ("cpu_usage", "memory_usage", "load", "disk_usage"):
            value = getattr(report, name)
            if value is not None and not _is_finite_number(value):
                raise InvalidInput(f"{name} must be a finite number")
        return report
    if not isinstance(report, RunStarted | RunOutput | RunFinished):
        raise InvalidInput(f"unknown report {type(report).__name__}")
    _check_id(report.run_id, "run_id")
    _check_id(report.task_id, "task_id")
    if not report.run_id and not report.task_id:
        raise InvalidInput("a run report needs run_id or task_id")
    _check_int(report.attempt, "attempt", 1, _INT32)
    if isinstance(report, RunStarted):
        _check_time(report.started_at, "started_at")
    elif isinstance(report, RunOutput):
        if report.stream not in STREAMS:
            raise InvalidInput(f"unknown output stream {report.stream!r}")
        _check_int(report.seq, "seq", 0, _INT64)
        if not isinstance(report.data, bytes):
            raise InvalidInput("output data must be bytes")
    else:
        if report.status not in FINAL_STATUSES:
            raise InvalidInput(f"unknown result status {report.status!r}")
        _check_int(report.exit_code, "exit_code", -_INT32, _INT32)
        _check_int(report.duration_ms, "duration_ms", 0, _INT64)
        for name in ("stdout", "stderr", "error"):
            value = getattr(report, name)
            if value is not None and not isinstance(value, str):
                raise InvalidInput(f"{name} must be text")
        if not isinstance(report.truncated, bool):
            raise InvalidInput("truncated must be true or false")
        if report.started_at is not None:
            _check_time(report.started_at, "started_at")
        _check_time(report.finished_at, "finished_at")
    return report


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_id(value: object, name: str) -> None:
    if value is None:
        return
    if not isinstance(value, str) or len(value) > _MAX_ID:
        raise InvalidInput(f"{name} must be an id of at most {_MAX_ID} characters")


def _check_int(value: object, name: str, low: int, high: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise InvalidInput(f"{name} must be a whole number from {low} to {high - 1}")


def _check_time(value: object, name: str) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInput(f"{name} must be a time with a zone")


class LinkEvents(Protocol):
    """What a link tells the engine. Implemented by ``opsplane.engine``."""

    def host_connecting(self, hello: AgentHello) -> asyncio.Future[None]:
        """A host (re)connected: decided at once (raises ``NameTaken`` when the name is
        another link's host), so the link may welcome it without waiting for the database;
        the future completes once its row is written and its runs reconciled."""
        ...

    async def host_connected(self, hello: AgentHello) -> None:
        """``host_connecting``, returning once the engine has reconciled the host's runs."""

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
        """Count a message refused for its signature, its age, its sender, or its content
        (``malformed``: not a message of the protocol, a wrong type, value or missing field;
        ``too_large``; ``unexpected``: a kind of message the control plane does not take)."""
        ...


@dataclass(frozen=True)
class AgentKey:
    key: Ed25519PublicKey
    revoked: bool


@dataclass(frozen=True)
class RoutedMessage:
    """A message for a host whose stream another control-plane instance holds, in the link's
    wire form (a command signed by the instance that sent it), for that instance to write to
    the stream as it is (docs/instances.md)."""

    kind: Literal["command", "cancel"]
    link: str
    host: str
    run_id: str
    data: bytes


@dataclass(frozen=True)
class Fanout:
    """One message for many hosts: a group's members (``group``), or every host (None)."""

    group: str | None
    # host name → the run that host is to execute. The engine's bookkeeping only: the message
    # carries no per-host map, each host derives its run id (domain/ids.py ``run_id_for``).
    run_ids: Mapping[str, str]
    envelope: CommandEnvelope  # run_id unused


class Link(abc.ABC):
    """A way to reach hosts. Long-lived: ``start`` then ``stop``."""

    name: ClassVar[str]
    # Whether ``send_fanout`` publishes a group or broadcast once instead of once per host.
    supports_fanout: ClassVar[bool] = False
    # Whether this link's hosts are online only while they connect and heartbeat. False for
    # hosts reachable by definition: the control plane's own, and agentless inventory hosts.
    liveness_by_heartbeat: ClassVar[bool] = True
    # Whether some of this link's agents never report ``started``: those written from seed
    # 002 alone (their heartbeat has no ``version``). Their runs are not ended by the start
    # timeout, only by their result, their execution timeout plus grace, or their deadline.
    has_silent_starters: ClassVar[bool] = False
    # Whether ``is_connected`` tells of an open stream whose transport checks the peer by
    # itself (gRPC: HTTP/2 keepalive pings), so that the host is alive while it is true,
    # heartbeats or not. False where "connected" is inferred from heartbeats (RabbitMQ).
    liveness_by_stream: ClassVar[bool] = False
    # Whether the engine should hand this link a ``CommandBatch`` with the runs of a task it
    # dispatches together (``CommandEnvelope.batch``), to sign their command once.
    signs_batches: ClassVar[bool] = False

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

    def heard(self, hostname: str) -> bool:
        """Whether this link knows by itself, in memory, that ``hostname`` is alive now: an
        open stream that checks its peer, or (RabbitMQ) a heartbeat received within the silence
        limit. The monitor asks before calling a host silent, so that liveness never waits on
        the database (a slow write, a backlog of run reports)."""
        return self.liveness_by_stream and self.is_connected(hostname)

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

    # Links whose hosts hold a stream to one instance (``liveness_by_stream``): another
    # instance's commands for them are encoded there, routed, and written here.

    def encode_command(self, hostname: str, command: CommandEnvelope) -> bytes:
        """``command`` for ``hostname`` in this link's wire form, signed as ``send_command``
        would send it."""
        raise NotImplementedError(f"the {self.name} link holds no streams")

    def encode_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> bytes:
        raise NotImplementedError(f"the {self.name} link holds no streams")

    async def send_encoded(self, hostname: str, data: bytes) -> None:
        """Write a message ``encode_*`` made (here or on another instance) to ``hostname``'s
        stream; raises like ``send_command``."""
        raise NotImplementedError(f"the {self.name} link holds no streams")

    @abc.abstractmethod
    async def send_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        """Ask the host to stop a run; raises ``NotConnected`` or ``ConnectionLost``."""
