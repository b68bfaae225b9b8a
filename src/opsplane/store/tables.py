"""SQLAlchemy tables. Schema changes go through Alembic migrations in ``migrations/``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from opsplane.domain.clock import utcnow as utcnow  # re-exported: the rows default to it

# Named constraints keep Alembic migrations identical on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


_MYSQL = ("mysql", "mariadb")
# Every table on MySQL/MariaDB: InnoDB (row locks, foreign keys), utf8mb4 whatever the server's
# default (anything else loses emoji in output), and DYNAMIC rows, whose 3072-byte index keys
# fit a utf8mb4 VARCHAR(255) with room to spare. The migration adds a binary, NO PAD collation
# chosen per server (their names differ), so keys compare as on SQLite and PostgreSQL:
# ``Web-1`` is not ``web-1`` and ``key `` is not ``key``.
MYSQL_TABLE = {
    f"{dialect}_{option}": value
    for dialect in _MYSQL  # a mariadb:// URL reads only mariadb_ options
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("row_format", "DYNAMIC"))
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes, to the microsecond, on every backend.

    PostgreSQL stores ``timestamp with time zone``. SQLite and MySQL have no zone, so they store
    naive UTC; MySQL's DATETIME also drops the fraction unless told otherwise (fsp=6), which would
    break durations and the order of rows created within one second. Reads always return aware
    UTC, and a naive value is refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in _MYSQL:
            return mysql.DATETIME(fsp=6)
        return DateTime(timezone=dialect.name == "postgresql")

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def without_nul(value: Any) -> Any:
    """``value`` with U+0000 replaced by U+FFFD in every string, also inside lists and dicts.

    PostgreSQL refuses NUL in text, and output decoded from a host may hold one. Every backend
    gets the same replacement so that they agree; the log archive keeps the raw bytes.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {without_nul(key): without_nul(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(item) for item in value]
    return value


class CleanText(TypeDecorator[str]):
    """Unbounded text without NUL (see ``without_nul``). MEDIUMTEXT on MySQL, whose TEXT stops at
    64 KiB: less than one run's kept output (2 x 64 KiB plus a marker), or a long script."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return mysql.MEDIUMTEXT() if dialect.name in _MYSQL else Text()

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else without_nul(value)


class CleanString(TypeDecorator[str]):
    """A VARCHAR of free text (a task's name) without NUL (see ``without_nul``)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else without_nul(value)


class CleanJSON(TypeDecorator[Any]):
    """JSON without NUL in its strings (see ``without_nul``): PostgreSQL stores ``\\u0000`` in
    ``json``, but its operators then fail on the value (``->``, ``->>``) and ``jsonb`` refuses
    it outright, so data kept for SQL queries must not hold one."""

    impl = JSON
    cache_ok = True
    # As JSON does: Python None is stored as JSON null rather than left out of the INSERT.
    should_evaluate_none = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return without_nul(value)


# Autoincrement event ids must be 64-bit on servers but SQLite only autoincrements INTEGER.
EventId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: CleanJSON, list[str]: CleanJSON}


class HostRow(Base):
    __tablename__ = "hosts"
    # The monitor finds the hosts that crossed a silence limit by status and last_seen_at; the
    # host list pages one status by name.
    __table_args__ = (
        Index("ix_hosts_status_last_seen_at", "status", "last_seen_at"),
        Index("ix_hosts_status_name", "status", "name"),
        # The instances holding streams, and a dead one's hosts (docs/instances.md).
        Index("ix_hosts_instance", "instance"),
        MYSQL_TABLE,
    )

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    link: Mapped[str] = mapped_column(String(16), default="grpc")
    groups: Mapped[list[str]] = mapped_column(default=list)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="unknown", index=True)
    last_seen_at: Mapped[datetime | None]
    connected_at: Mapped[datetime | None]
    cpu_usage: Mapped[float | None] = mapped_column(Double)
    memory_usage: Mapped[float | None] = mapped_column(Double)
    load: Mapped[float | None] = mapped_column(Double)
    disk_usage: Mapped[float | None] = mapped_column(Double)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    os: Mapped[str | None] = mapped_column(String(255))
    public_key: Mapped[str | None] = mapped_column(String(255))
    # Agentless hosts (link "ssh"): address, port, user, key_file, bastions (a ProxyJump-style
    # chain). Never a secret: passwords live only in memory for the request that brought them.
    ssh: Mapped[dict[str, Any] | None] = mapped_column(CleanJSON, nullable=True)
    # An SSH target that a seed-000 request brought (group "adhoc"), not an inventory host:
    # `all`, groups and labels never select it, only its name does; `opsplane hosts` hides it
    # unless asked. An operator's registration of the same name clears it.
    adhoc: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The control-plane instance holding the host's gRPC stream (engine/leases.py
    # instance_name): commands for the host are routed to it (docs/instances.md). None while
    # no stream is held, and for hosts any instance reaches (RabbitMQ, SSH, local).
    instance: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskRow(Base):
    __tablename__ = "tasks"
    # The task list pages one status newest first.
    __table_args__ = (
        Index("ix_tasks_status_created_at", "status", "created_at", "id"),
        MYSQL_TABLE,
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(CleanString(255), index=True)
    description: Mapped[str] = mapped_column(CleanText, default="")
    kind: Mapped[str] = mapped_column(String(16), default="command")
    command: Mapped[str] = mapped_column(CleanText)
    # How to execute, beyond the command text: argv without a shell, environment, working
    # directory, or an in-process handler (catalog scripts). None for plain shell commands.
    spec: Mapped[dict[str, Any] | None] = mapped_column(CleanJSON, nullable=True)
    targets: Mapped[dict[str, Any]] = mapped_column()
    timeout: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(255), default="anonymous")
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Pacing (domain.policy): higher priority goes first when capacity is short.
    priority: Mapped[int] = mapped_column(Integer, default=0, index=True)
    policy: Mapped[dict[str, Any] | None] = mapped_column(CleanJSON, nullable=True)
    # Set when the task starts, from the policy's deadline and delivery_deadline.
    deadline_at: Mapped[datetime | None]
    deliver_by: Mapped[datetime | None]
    # Why the engine stopped the task early: deadline, max_errors or canary; None otherwise.
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    rerun_of: Mapped[str | None] = mapped_column(String(36), index=True)
    # The account runs execute as on each host (seed 002's ``user``); None: the agent's own.
    run_as: Mapped[str | None] = mapped_column(String(32))
    # Launched from a template (issue 20): its name and the version that ran.
    template: Mapped[str | None] = mapped_column(String(128), index=True)
    template_version: Mapped[int | None] = mapped_column(Integer)


class RunRow(Base):
    __tablename__ = "runs"
    # Pages: a task's runs by host and attempt, a host's runs newest first.
    __table_args__ = (
        Index("ix_runs_host_status", "host", "status"),
        Index("ix_runs_task_id_host_attempt", "task_id", "host", "attempt"),
        Index("ix_runs_host_id", "host", "id"),
        MYSQL_TABLE,
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    host: Mapped[str] = mapped_column(String(255))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), index=True)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    stdout: Mapped[str] = mapped_column(CleanText, default="")
    stderr: Mapped[str] = mapped_column(CleanText, default="")
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(CleanText)
    dispatched_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    log_path: Mapped[str | None] = mapped_column(String(1024))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A retried run is superseded by its next attempt; a task counts only the latest attempts.
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    # A retry waits for its backoff: not dispatched before this instant.
    not_before: Mapped[datetime | None]
    # Canary rollout: wave 0 runs first; wave 1 only once every wave-0 run succeeded.
    wave: Mapped[int] = mapped_column(Integer, default=0)
    # The ``seq`` of the last output chunk placed in the archive (0: none, or an agent that
    # does not number its chunks): a chunk re-sent after a reconnect is recognised by it.
    output_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # Created for a host's result that no run was planned for: a group or broadcast message
    # reached a host the control plane did not count in (docs/amqp.md).
    unplanned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class TaskEventRow(Base):
    """What the SSE stream of a task replays: run state changes, output chunks, task changes."""

    __tablename__ = "task_events"
    # The event retention walks old events by created_at.
    __table_args__ = (Index("ix_task_events_created_at", "created_at"), MYSQL_TABLE)

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(36), index=True)
    run_id: Mapped[str | None] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class HeartbeatRow(Base):
    """Heartbeat history, bounded by the monitor's retention."""

    __tablename__ = "heartbeats"
    __table_args__ = (Index("ix_heartbeats_host_at", "host", "at"), MYSQL_TABLE)

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(String(255))
    at: Mapped[datetime] = mapped_column()
    cpu_usage: Mapped[float | None] = mapped_column(Double)
    memory_usage: Mapped[float | None] = mapped_column(Double)
    load: Mapped[float | None] = mapped_column(Double)
    disk_usage: Mapped[float | None] = mapped_column(Double)


# Security (issue 9): users, API tokens, web sessions and the hash-chained audit trail.
# Secrets are never stored: passwords as argon2id hashes, tokens and session ids as SHA-256.


class UserRow(Base):
    __tablename__ = "users"
    __table_args__ = MYSQL_TABLE

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # None: the user has no password and cannot log in to the web page (tokens only).
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    # Operators: the groups they may run on; None: every group (and always None for others).
    groups: Mapped[list[str] | None] = mapped_column(CleanJSON, nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None]

    @property
    def has_password(self) -> bool:
        return self.password_hash is not None


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"
    __table_args__ = MYSQL_TABLE

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(CleanString(255))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The user the token acts for; None for the bootstrap token. A token never has more role or
    # groups than its owner has now.
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    groups: Mapped[list[str] | None] = mapped_column(CleanJSON, nullable=True)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class SessionRow(Base):
    """A web login: the cookie holds a random secret, the row its SHA-256 (``id``)."""

    __tablename__ = "sessions"
    __table_args__ = MYSQL_TABLE

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_hash: Mapped[str] = mapped_column(String(64))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class AuditRow(Base):
    """Append-only: nothing in opsplane updates or deletes a row. Ids are assigned by the
    chain (consecutive from 1), not by the database; see ``opsplane.security.audit``."""

    __tablename__ = "audit_log"
    __table_args__ = MYSQL_TABLE

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(CleanString(255), index=True)
    role: Mapped[str] = mapped_column(String(16))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(CleanString(255))
    targets: Mapped[dict[str, Any] | None] = mapped_column(CleanJSON, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]] = mapped_column()
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainRow(Base):
    """The chain head: one row (id 1) with the last record's id and hash. Appending locks it,
    so instances sharing a database append one at a time; verifying compares against it, so a
    record deleted from the end is noticed."""

    __tablename__ = "audit_chain"
    __table_args__ = MYSQL_TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_id: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))


# Agent enrollment (issue 9): one-time tokens, and the agents enrolled with them.


class EnrollmentTokenRow(Base):
    """A one-time enrollment token: only its SHA-256 is kept; ``used_at`` spends it."""

    __tablename__ = "enrollment_tokens"
    __table_args__ = MYSQL_TABLE

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The groups an agent enrolled with this token may be in (and no others).
    groups: Mapped[list[str]] = mapped_column()
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    used_by: Mapped[str | None] = mapped_column(String(255))
    # The one host name an agent enrolled with this token may take; None: any free name.
    name: Mapped[str | None] = mapped_column(String(255))


class AgentRow(Base):
    """An enrolled agent: its Ed25519 public key and the groups its token allowed."""

    __tablename__ = "agents"
    __table_args__ = MYSQL_TABLE

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(255))
    groups: Mapped[list[str]] = mapped_column()
    token_id: Mapped[str] = mapped_column(String(36))
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(String(255))


class SshSequenceRow(Base):
    """A seed-000 request with several commands (``engine/sshapi.py``): what the engine needs
    to go on with its remaining commands after a restart. Each command is a task of its own
    with the idempotency key ``<key_base>:<index>``; ``id`` is the first one's id. Passwords
    and private keys given in the request are never stored: ``needs_secrets`` says that the
    remaining commands cannot run once this process is gone."""

    __tablename__ = "ssh_sequences"
    __table_args__ = MYSQL_TABLE

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_base: Mapped[str] = mapped_column(String(255))
    commands: Mapped[list[str]] = mapped_column()
    hosts: Mapped[list[str]] = mapped_column()
    timeout: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(255))
    needs_secrets: Mapped[bool] = mapped_column(Boolean, default=False)
    # Every command has its task (or the rest were given up: ``error`` says why).
    done: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    error: Mapped[str | None] = mapped_column(CleanText)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LeaseRow(Base):
    """A singleton duty's lease (DESIGN §7, docs/instances.md): the instance named ``holder``
    runs the duty ``name`` until ``expires_at``; another takes over once it has passed."""

    __tablename__ = "leases"
    __table_args__ = MYSQL_TABLE

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column()


# Job templates and schedules (issue 20, docs/templates.md).


class TemplateRow(Base):
    """A template's name and its current version; every version is kept (a task records the
    version it ran). Deleting marks the name deleted: its versions stay for the tasks' sake."""

    __tablename__ = "templates"
    __table_args__ = MYSQL_TABLE

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class TemplateVersionRow(Base):
    __tablename__ = "template_versions"
    __table_args__ = MYSQL_TABLE

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # domain.templates.TemplateSpec.to_json()
    definition: Mapped[dict[str, Any]] = mapped_column()
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TemplateGrantRow(Base):
    """A user may launch template ``template`` on hosts of group ``group``, whatever its role
    (a viewer with grants runs those templates and nothing else)."""

    __tablename__ = "template_grants"
    __table_args__ = (
        UniqueConstraint(
            "user_id", "template", "group_name", name="uq_template_grants_user_template"
        ),
        MYSQL_TABLE,
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    template: Mapped[str] = mapped_column(String(128), index=True)
    group_name: Mapped[str] = mapped_column(String(255))
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ScheduleRow(Base):
    """A template launched on a cron expression (in a time zone) or every N seconds."""

    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_paused_next_due", "paused", "next_due"), MYSQL_TABLE)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    template: Mapped[str] = mapped_column(String(128), index=True)
    params: Mapped[dict[str, Any]] = mapped_column()
    # Secret parameter values, sealed (security/secrets.py): name -> ciphertext.
    secret_params: Mapped[dict[str, Any]] = mapped_column()
    targets: Mapped[dict[str, Any] | None] = mapped_column(CleanJSON, nullable=True)
    cron: Mapped[str | None] = mapped_column(String(255))
    timezone: Mapped[str] = mapped_column(String(64))
    interval_seconds: Mapped[int | None] = mapped_column(Integer)
    misfire: Mapped[str] = mapped_column(String(16))
    misfire_window: Mapped[int] = mapped_column(Integer)
    overlap: Mapped[str] = mapped_column(String(16))
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # The earliest due time not yet handled (fired, skipped or missed).
    next_due: Mapped[datetime | None]
    last_task_id: Mapped[str | None] = mapped_column(String(36))
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ScheduleFireRow(Base):
    """What became of one due time of a schedule. Unique per (schedule, due time) and written
    in the transaction that creates the task: two control planes never both fire it."""

    __tablename__ = "schedule_fires"
    __table_args__ = (
        UniqueConstraint("schedule_id", "due_at", name="uq_schedule_fires_schedule_id_due_at"),
        MYSQL_TABLE,
    )

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    schedule_id: Mapped[str] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    due_at: Mapped[datetime] = mapped_column()
    at: Mapped[datetime] = mapped_column(default=utcnow)
    # launched | skipped (overlap) | missed (misfire) | error
    outcome: Mapped[str] = mapped_column(String(16))
    task_id: Mapped[str | None] = mapped_column(String(36))
    detail: Mapped[str | None] = mapped_column(CleanText)
