"""Request and response models of job templates and schedules (docs/templates.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from opsplane.api.schemas import MAX_ENV, Name, RetriesIn, RolloutIn, TargetsIn
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.targeting import Targets, normalize_names
from opsplane.domain.templates import MAX_PARAMETERS, ParamSpec, TemplateSpec

_POLICY_FIELDS = {
    "priority",
    "retries",
    "max_concurrency",
    "max_errors",
    "rollout",
    "delivery_deadline",
    "deadline",
}


class ParamIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=128, description="reaches the command as PARAM_<NAME>")
    type: Literal["string", "int", "choice", "secret"] = "string"
    default: str | int | None = None
    choices: list[Name] | None = Field(default=None, max_length=256)
    required: bool = False
    description: str = Field(default="", max_length=1000)


class TemplateIn(BaseModel):
    """A template's definition: POST creates version 1, PUT the next version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=128, description="required on POST")
    description: str = Field(default="", max_length=10_000)
    kind: Literal["command", "script"] = Field(
        default="command",
        description="command: shell text on the targets; script: a seed-003 script_path, run "
        "as argv on the control plane (upload is not a template kind yet)",
    )
    command: str = Field(
        min_length=1,
        max_length=1_000_000,
        description="shell command text (kind script: the script_path); parameters arrive as "
        '"$PARAM_<NAME>", never spliced in',
    )
    parameters: list[ParamIn] = Field(default_factory=list, max_length=MAX_PARAMETERS)
    targets: TargetsIn = Field(
        default_factory=TargetsIn, description="default targets; a launch may override them"
    )
    timeout: int | None = Field(default=None, description="seconds per run")
    priority: int = 0
    retries: RetriesIn | None = None
    max_concurrency: int | str | None = None
    max_errors: int | str | None = None
    rollout: RolloutIn | None = None
    delivery_deadline: int = 0
    deadline: int | None = None
    notify: list[Literal["failure", "success", "change"]] = Field(
        default_factory=list,
        description="alert webhooks on a launch's failure, success, or change of outcome",
    )

    def spec(self, name: str | None = None) -> TemplateSpec:
        fields = self.model_dump(include=_POLICY_FIELDS, exclude_defaults=True)
        return TemplateSpec(
            name=name or self.name,
            description=self.description,
            kind=self.kind,
            command=self.command,
            parameters=tuple(
                ParamSpec.parse(p.model_dump(exclude_none=True)) for p in self.parameters
            ),
            targets=targets_of(self.targets),
            timeout=self.timeout,
            policy=TaskPolicy.parse(**fields) if fields else None,
            notify=tuple(dict.fromkeys(self.notify)),
        )


def targets_of(body: TargetsIn) -> Targets:
    return Targets(
        hosts=normalize_names(body.hosts, "host"),
        groups=normalize_names(body.groups, "group"),
        all=body.all,
        labels=dict(body.labels),
    )


class TemplateOut(BaseModel):
    name: str
    description: str
    kind: str
    command: str
    parameters: list[dict[str, Any]]
    targets: dict[str, Any]
    timeout: int | None
    policy: dict[str, Any] | None
    notify: list[str]
    version: int
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime


class LaunchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: dict[Name, Any] = Field(default_factory=dict, max_length=MAX_ENV)
    targets: TargetsIn | None = Field(default=None, description="instead of the template's")


class GrantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template: str = Field(max_length=128)
    groups: list[Name] = Field(min_length=1, max_length=1000)


class GrantOut(BaseModel):
    user: str
    template: str
    groups: list[str]


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template: str = Field(max_length=128)
    params: dict[Name, Any] = Field(default_factory=dict, max_length=MAX_ENV)
    targets: TargetsIn | None = Field(default=None, description="instead of the template's")
    cron: str | None = Field(
        default=None, max_length=255, description='5 fields: "*/5 * * * *"; or interval_seconds'
    )
    timezone: str = Field(default="UTC", max_length=64, description="IANA name for cron")
    interval_seconds: int | None = Field(default=None, description="every N seconds; or cron")
    misfire: Literal["skip", "run_once"] = Field(
        default="skip", description="a due time passed while down: skip it, or run once late"
    )
    misfire_window: int = Field(
        default=3600, description="run_once: how late (seconds) a due time may still run"
    )
    overlap: Literal["skip", "queue"] = Field(
        default="skip",
        description="the previous launch still running: skip this one, or run it after",
    )
    paused: bool = False


class SchedulePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paused: bool | None = None
    params: dict[Name, Any] | None = Field(default=None, max_length=MAX_ENV)
    cron: str | None = Field(default=None, max_length=255)
    timezone: str | None = Field(default=None, max_length=64)
    interval_seconds: int | None = None
    misfire: Literal["skip", "run_once"] | None = None
    misfire_window: int | None = None
    overlap: Literal["skip", "queue"] | None = None


class ScheduleOut(BaseModel):
    id: str
    template: str
    params: dict[str, Any]
    secret_params: list[str]
    targets: dict[str, Any] | None
    cron: str | None
    timezone: str
    interval_seconds: int | None
    misfire: str
    misfire_window: int
    overlap: str
    paused: bool
    next_fire_times: list[datetime]
    last_task_id: str | None
    created_by: str
    created_at: datetime


class FireOut(BaseModel):
    due_at: datetime
    at: datetime
    outcome: str = Field(description="launched, skipped (overlap), missed (misfire) or error")
    task_id: str | None
    task_status: str | None
    detail: str | None
