"""Request and response models of the REST API. Never ORM rows: ``from_row`` converts."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from opsplane.domain.errors import InvalidInput
from opsplane.domain.paging import PageOf
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.records import HostRecord, RunRecord
from opsplane.domain.tasks import check_run_as, is_env_name, params_env

T = TypeVar("T")
# Far beyond any real page, and small enough that the row offset fits a 64-bit integer (a
# larger page reached the database as an out-of-range offset: a 500).
MAX_PAGE = 1_000_000_000
PageNumber = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Cursor = Annotated[
    str | None,
    Query(
        max_length=2048,
        description="the next_cursor of the previous page: the rows after it (keyset "
        "pagination: no duplicates or gaps while rows are added); not with page",
    ),
]


# Request bounds (docs/operations.md, "Request limits"): far above real use, low enough that
# one request cannot keep the event loop busy for long. A larger fleet is aimed at by group,
# label or all=true, not by listing ten thousand names.
MAX_HOSTS = 10_000
MAX_GROUPS = 1_000
MAX_LABELS = 100
MAX_ENV = 1_000
# Linux refuses an environment string longer than 128 KiB (MAX_ARG_STRLEN) at exec.
MAX_ENV_VALUE = 128 * 1024
Name = Annotated[str, StringConstraints(max_length=255)]
LabelMap = Annotated[dict[Name, Name], Field(max_length=MAX_LABELS)]
EnvMap = Annotated[
    dict[Name, Annotated[str, StringConstraints(max_length=MAX_ENV_VALUE)]],
    Field(max_length=MAX_ENV),
]
# Seed 001's parameters: an object, or (its Go model's string) a string holding one.
ParamMap = Annotated[dict[Name, Any], Field(max_length=MAX_ENV)]


class TargetsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hosts: list[Name] = Field(default_factory=list, max_length=MAX_HOSTS, description="host names")
    groups: list[Name] = Field(
        default_factory=list, max_length=MAX_GROUPS, description="group names"
    )
    all: bool = Field(default=False, description="every known host")
    labels: LabelMap = Field(
        default_factory=dict, description="hosts carrying every one of these key=value labels"
    )


class UploadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    local_path: str = Field(min_length=1, max_length=4096, description="on the control plane")
    remote_path: str = Field(min_length=1, max_length=4096)
    owner: str | None = Field(
        default=None,
        max_length=64,
        description="user name or numeric uid every written file gets; default: the writer's",
    )
    group: str | None = Field(
        default=None,
        max_length=64,
        description="group name or numeric gid every written file gets; default: the writer's",
    )


class RetriesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(default=1, description="attempts in all, the first included")
    backoff_seconds: float = Field(default=0, description="wait before attempt 2; doubles")
    on: list[Literal["failed", "timed_out", "undeliverable", "lost"]] | None = Field(
        default=None, description="statuses that get another attempt; default: all four"
    )


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    canary: int = Field(description="hosts that run first")
    then: int | str | None = Field(
        default=None, description='then at most this many at a time: a number or "50%"'
    )


class RerunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    only: Literal["failed", "undeliverable", "timed_out", "unsuccessful", "all"] = Field(
        default="failed",
        description="the hosts whose latest run ended so (failed takes lost runs too; "
        "unsuccessful: every host that did not succeed)",
    )


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["command", "upload"] = "command"
    command: str = Field(
        default="", max_length=1_000_000, description="shell command text (kind command)"
    )
    upload: UploadIn | None = Field(default=None, description="what to copy (kind upload)")
    targets: TargetsIn
    timeout: int | None = Field(default=None, description="seconds per run; default from settings")
    name: str = Field(default="", max_length=255)
    description: str = Field(default="", max_length=10_000)
    start: bool = Field(default=True, description="false: create now, POST .../start later")
    env: EnvMap = Field(default_factory=dict, description="environment variables for the command")
    secret_env: EnvMap = Field(
        default_factory=dict,
        description="environment variables whose values are secret: encrypted at rest, "
        "never returned by the API, only names in the audit trail",
    )
    priority: int = Field(
        default=0, description="higher goes first when capacity is short (-1000..1000)"
    )
    retries: RetriesIn | None = Field(default=None, description="repeat runs that ended badly")
    max_concurrency: int | str | None = Field(
        default=None, description='hosts running at once: a number or a percentage ("25%")'
    )
    max_errors: int | str | None = Field(
        default=None,
        description="errors (failed, timed_out, lost) that stop the waiting runs: number or %",
    )
    rollout: RolloutIn | None = Field(
        default=None, description="canary: N hosts first, the rest only if they all succeed"
    )
    delivery_deadline: int = Field(
        default=0, description="seconds a run waits (delayed) for its offline host; 0: none"
    )
    deadline: int | None = Field(
        default=None, description="seconds the whole task may take from its start"
    )
    parameters: ParamMap | Annotated[str, StringConstraints(max_length=MAX_ENV_VALUE)] = Field(
        default_factory=dict,
        description="named values (seed 001) reaching the command as environment variables "
        "PARAM_<NAME> (upper-cased) and PARAMS_JSON, never spliced into its text; a JSON "
        "object, or a string holding one",
    )

    run_as: str | None = Field(
        default=None,
        max_length=64,
        description="the account the command runs as on each host (seed 002's user); "
        "null: the agent's own. Agents decide whether they may (docs/agent-policy.md); "
        "SSH hosts are refused",
    )

    @field_validator("run_as")
    @classmethod
    def _run_as(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_run_as(value)
        except InvalidInput as e:
            raise ValueError(str(e)) from e

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, Any] | str) -> dict[str, Any]:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError as e:
                raise ValueError(
                    "parameters must be a JSON object (or a string holding one)"
                ) from e
            if not isinstance(value, dict):
                raise ValueError("parameters must be a JSON object (or a string holding one)")
        try:
            params_env(value)
        except InvalidInput as e:
            raise ValueError(str(e)) from e
        return value

    @field_validator("env", "secret_env")
    @classmethod
    def _environment(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not is_env_name(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if "\x00" in text:
                raise ValueError(f"the value of {name} contains a NUL byte")
        return value

    def environment(self) -> tuple[dict[str, str], dict[str, str]]:
        """(plain, secret) environment, ``parameters`` included in the plain one; a name set
        twice is refused."""
        assert isinstance(self.parameters, dict)  # the validator decoded a string
        params = params_env(self.parameters) if self.parameters else {}
        both = set(self.env) & set(self.secret_env)
        if both:
            raise InvalidInput(f"env and secret_env both set {', '.join(sorted(both))}")
        twice = set(params) & (set(self.env) | set(self.secret_env))
        if twice:
            raise InvalidInput(
                f"parameters and env (or secret_env) both set {', '.join(sorted(twice))}"
            )
        return {**self.env, **params}, self.secret_env

    def policy(self) -> TaskPolicy | None:
        """The task's pacing, or None when the body asks for none of it."""
        fields = self.model_dump(
            include={
                "priority",
                "retries",
                "max_concurrency",
                "max_errors",
                "rollout",
                "delivery_deadline",
                "deadline",
            },
            exclude_defaults=True,
        )
        if not fields:
            return None
        return TaskPolicy.parse(**fields)


class HostCreate(BaseModel):
    """An agentless host reached over SSH (``link: ssh``, the default), or the inventory
    entry of a RabbitMQ agent's host (``link: amqp``: its groups and labels, for agents whose
    heartbeat names none, such as seed 002's). Keys by path (or ssh-agent); no passwords
    here: a registered host must survive a restart, and secrets are never stored."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    link: Literal["ssh", "amqp"] = "ssh"
    ssh: str | None = Field(
        default=None, min_length=1, max_length=512, description="[user@]address[:port]"
    )
    key_file: str | None = Field(default=None, max_length=4096)
    bastion: str = Field(default="", max_length=2048, description="ops@edge:22[,ops@inner]")
    bastion_key_file: str | None = Field(default=None, max_length=4096)
    groups: list[Name] = Field(default_factory=list, max_length=MAX_GROUPS)
    labels: LabelMap = Field(default_factory=dict)


class Counts(BaseModel):
    total: int
    pending: int
    delayed: int
    dispatched: int
    running: int
    succeeded: int
    failed: int
    timed_out: int
    canceled: int
    undeliverable: int
    lost: int


class Progress(BaseModel):
    finished: int
    total: int
    percent: float


class TaskOut(BaseModel):
    id: str
    name: str
    description: str
    kind: str
    command: str
    targets: dict[str, Any]
    timeout: int
    status: str
    created_by: str
    priority: int
    policy: dict[str, Any] | None
    deadline_at: datetime | None
    stop_reason: str | None
    rerun_of: str | None
    run_as: str | None = None
    template: dict[str, Any] | None = Field(
        default=None, description="the template (name, version) this task was launched from"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    counts: Counts
    progress: Progress
    # Seed 001's names (docs/compat.md): the same task, as its clients read it.
    task_id: str
    total_hosts: int
    completed_hosts: int
    failed_hosts: int
    updated_at: datetime | None


class RunOut(BaseModel):
    id: str
    task_id: str
    host: str
    attempt: int
    status: str
    exit_code: int | None
    stdout: str | None = Field(description="null unless the output was asked for")
    stderr: str | None = Field(description="null unless the output was asked for")
    truncated: bool
    error: str | None
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    log_path: str | None
    superseded: bool
    # Created for a result nobody planned (a group or broadcast reached an extra host).
    unplanned: bool = False

    @classmethod
    def from_row(cls, row: RunRecord, *, output: bool = True) -> RunOut:
        """``output`` false: the row was read without its output (it is not touched)."""
        return cls(
            id=row.id,
            task_id=row.task_id,
            host=row.host,
            attempt=row.attempt,
            status=row.status,
            exit_code=row.exit_code,
            stdout=row.stdout if output else None,
            stderr=row.stderr if output else None,
            truncated=row.truncated,
            error=row.error,
            dispatched_at=row.dispatched_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            duration_ms=row.duration_ms,
            log_path=row.log_path,
            superseded=bool(row.superseded),
            unplanned=bool(row.unplanned),
        )


class HostOut(BaseModel):
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
    ssh: dict[str, Any] | None = None
    # An SSH target a seed-000 request brought: selected by its name only.
    adhoc: bool = False

    @classmethod
    def from_row(cls, row: HostRecord) -> HostOut:
        return cls(
            name=row.name,
            link=row.link,
            groups=list(row.groups or []),
            labels=dict(row.labels or {}),
            status=row.status,
            last_seen_at=row.last_seen_at,
            connected_at=row.connected_at,
            cpu_usage=row.cpu_usage,
            memory_usage=row.memory_usage,
            load=row.load,
            disk_usage=row.disk_usage,
            agent_version=row.agent_version,
            os=row.os,
            ssh=row.ssh,
            adhoc=bool(row.adhoc),
        )


class HeartbeatOut(BaseModel):
    at: datetime
    cpu_usage: float | None
    memory_usage: float | None
    load: float | None
    disk_usage: float | None


class HostRunOut(RunOut):
    """A run with what its task ran, for a host's history."""

    task_name: str
    task_kind: str
    command: str


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    page: int
    size: int
    next_cursor: str | None = Field(
        default=None, description="pass as cursor for the next page; null after the last"
    )

    @classmethod
    def of(cls, found: PageOf[Any], items: list[T], *, page: int, size: int) -> Page[T]:
        return cls(
            items=items, total=found.total, page=page, size=size, next_cursor=found.next_cursor
        )


class RunsPage(Page[RunOut]):
    summary: dict[str, int] = Field(
        description="the task's runs by status (every attempt), whatever the page and filter"
    )


class Items(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        default=None, description="pass as cursor for the next page; null after the last"
    )


class Health(BaseModel):
    status: str
