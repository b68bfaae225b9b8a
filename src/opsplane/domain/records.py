"""What the services hand out: read-only copies of hosts, tasks, runs, heartbeats, users,
tokens, audit records and agents. The API builds its answers from these, never from the
store's rows.

They are copies, not the rows: the engine and the security service copy what they read
(store/records.py ``record_of``) before it leaves them, so that no caller outside them can
lazy-load, flush or otherwise reach the ORM (tests/unit/test_import_layers keeps ``api`` from
importing ``store``). Frozen and slotted: read-only, and about the size of a tuple. The
services' own work keeps the rows; only what crosses to the API, the CLI and the links is
copied, a page (at most a few hundred rows) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class HostRecord:
    """A host as the engine keeps it."""

    name: str
    link: str
    groups: list[str]
    labels: dict[str, Any]
    status: str
    last_seen_at: datetime | None
    connected_at: datetime | None
    cpu_usage: float | None
    memory_usage: float | None
    load: float | None
    disk_usage: float | None
    agent_version: str | None
    os: str | None
    public_key: str | None
    ssh: dict[str, Any] | None
    adhoc: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task: what was asked, its state and its counts."""

    id: str
    name: str
    description: str
    kind: str
    command: str
    spec: dict[str, Any] | None
    targets: dict[str, Any]
    timeout: int
    status: str
    cancel_requested: bool
    counts: dict[str, Any]
    total: int
    created_by: str
    idempotency_key: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    priority: int
    policy: dict[str, Any] | None
    deadline_at: datetime | None
    deliver_by: datetime | None
    stop_reason: str | None
    rerun_of: str | None
    run_as: str | None
    template: str | None
    template_version: int | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One host's attempt at a task."""

    id: str
    task_id: str
    host: str
    attempt: int
    status: str
    exit_code: int | None
    # None when read without its output (paged lists read it only on request).
    stdout: str | None
    stderr: str | None
    truncated: bool
    error: str | None
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    log_path: str | None
    updated_at: datetime
    superseded: bool
    not_before: datetime | None
    wave: int
    output_seq: int
    unplanned: bool


@dataclass(frozen=True, slots=True)
class HeartbeatRecord:
    """One kept heartbeat of a host (downsampled history)."""

    at: datetime
    cpu_usage: float | None
    memory_usage: float | None
    load: float | None
    disk_usage: float | None


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user of the API and the page."""

    id: str
    name: str
    has_password: bool
    role: str
    groups: list[str] | None
    disabled: bool
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """An API token (its hash never leaves the security service)."""

    id: str
    name: str
    user_id: str | None
    role: str
    groups: list[str] | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record of the audit chain."""

    id: int
    at: datetime
    actor: str
    role: str
    source_ip: str | None
    action: str
    target: str | None
    targets: dict[str, Any] | None
    outcome: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An enrolled agent and its key."""

    name: str
    public_key: str
    groups: list[str]
    token_id: str
    enrolled_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None
