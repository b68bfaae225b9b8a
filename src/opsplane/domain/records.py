"""What the services hand out: read-only views of hosts, tasks, runs, users, tokens, audit
records and agents. The API builds its answers from these, never from the store's rows.

They are Protocols rather than copies: the engine's and the security service's methods return
the store's rows, which satisfy them structurally, so that no service copies every row it reads
and no caller outside the engine and security can reach the ORM (tests/unit/test_import_layers
keeps ``api`` from importing ``store``). Read-only by construction: every member is a property.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol


class HostRecord(Protocol):
    """A host as the engine keeps it."""

    @property
    def name(self) -> str: ...

    @property
    def link(self) -> str: ...

    @property
    def groups(self) -> list[str]: ...

    @property
    def labels(self) -> dict[str, Any]: ...

    @property
    def status(self) -> str: ...

    @property
    def last_seen_at(self) -> datetime | None: ...

    @property
    def connected_at(self) -> datetime | None: ...

    @property
    def cpu_usage(self) -> float | None: ...

    @property
    def memory_usage(self) -> float | None: ...

    @property
    def load(self) -> float | None: ...

    @property
    def disk_usage(self) -> float | None: ...

    @property
    def agent_version(self) -> str | None: ...

    @property
    def os(self) -> str | None: ...

    @property
    def public_key(self) -> str | None: ...

    @property
    def ssh(self) -> dict[str, Any] | None: ...

    @property
    def adhoc(self) -> bool: ...

    @property
    def created_at(self) -> datetime: ...


class TaskRecord(Protocol):
    """A task: what was asked, its state and its counts."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def command(self) -> str: ...

    @property
    def spec(self) -> dict[str, Any] | None: ...

    @property
    def targets(self) -> dict[str, Any]: ...

    @property
    def timeout(self) -> int: ...

    @property
    def status(self) -> str: ...

    @property
    def cancel_requested(self) -> bool: ...

    @property
    def counts(self) -> dict[str, Any]: ...

    @property
    def total(self) -> int: ...

    @property
    def created_by(self) -> str: ...

    @property
    def idempotency_key(self) -> str | None: ...

    @property
    def created_at(self) -> datetime: ...

    @property
    def started_at(self) -> datetime | None: ...

    @property
    def finished_at(self) -> datetime | None: ...

    @property
    def priority(self) -> int: ...

    @property
    def policy(self) -> dict[str, Any] | None: ...

    @property
    def deadline_at(self) -> datetime | None: ...

    @property
    def deliver_by(self) -> datetime | None: ...

    @property
    def stop_reason(self) -> str | None: ...

    @property
    def rerun_of(self) -> str | None: ...

    @property
    def run_as(self) -> str | None: ...

    @property
    def template(self) -> str | None: ...

    @property
    def template_version(self) -> int | None: ...


class RunRecord(Protocol):
    """One host's attempt at a task."""

    @property
    def id(self) -> str: ...

    @property
    def task_id(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    @property
    def status(self) -> str: ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def stdout(self) -> str: ...

    @property
    def stderr(self) -> str: ...

    @property
    def truncated(self) -> bool: ...

    @property
    def error(self) -> str | None: ...

    @property
    def dispatched_at(self) -> datetime | None: ...

    @property
    def started_at(self) -> datetime | None: ...

    @property
    def finished_at(self) -> datetime | None: ...

    @property
    def duration_ms(self) -> int | None: ...

    @property
    def log_path(self) -> str | None: ...

    @property
    def updated_at(self) -> datetime: ...

    @property
    def superseded(self) -> bool: ...

    @property
    def not_before(self) -> datetime | None: ...

    @property
    def wave(self) -> int: ...

    @property
    def output_seq(self) -> int: ...

    @property
    def unplanned(self) -> bool: ...


class UserRecord(Protocol):
    """A user of the API and the page."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def password_hash(self) -> str | None: ...

    @property
    def role(self) -> str: ...

    @property
    def groups(self) -> list[str] | None: ...

    @property
    def disabled(self) -> bool: ...

    @property
    def created_at(self) -> datetime: ...

    @property
    def updated_at(self) -> datetime: ...

    @property
    def last_login_at(self) -> datetime | None: ...


class TokenRecord(Protocol):
    """An API token (its hash never leaves the security service)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def user_id(self) -> str | None: ...

    @property
    def role(self) -> str: ...

    @property
    def groups(self) -> list[str] | None: ...

    @property
    def created_by(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...

    @property
    def expires_at(self) -> datetime | None: ...

    @property
    def revoked_at(self) -> datetime | None: ...

    @property
    def last_used_at(self) -> datetime | None: ...


class AuditRecord(Protocol):
    """One record of the audit chain."""

    @property
    def id(self) -> int: ...

    @property
    def at(self) -> datetime: ...

    @property
    def actor(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def source_ip(self) -> str | None: ...

    @property
    def action(self) -> str: ...

    @property
    def target(self) -> str | None: ...

    @property
    def targets(self) -> dict[str, Any] | None: ...

    @property
    def outcome(self) -> str: ...

    @property
    def detail(self) -> dict[str, Any]: ...

    @property
    def prev_hash(self) -> str: ...

    @property
    def hash(self) -> str: ...


class AgentRecord(Protocol):
    """An enrolled agent and its key."""

    @property
    def name(self) -> str: ...

    @property
    def public_key(self) -> str: ...

    @property
    def groups(self) -> list[str]: ...

    @property
    def token_id(self) -> str: ...

    @property
    def enrolled_at(self) -> datetime: ...

    @property
    def revoked_at(self) -> datetime | None: ...

    @property
    def revoked_by(self) -> str | None: ...
