"""Job templates: a named, reviewed command with typed parameters, default targets and a
task's policy, launched by name. No I/O.

Parameter values never become part of the command's text: each reaches the command as the
environment variable ``PARAM_<NAME>`` (upper-cased), as seed 003's params do, and a ``secret``
parameter as a secret environment variable (encrypted at rest, never returned, redacted).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opsplane.domain.errors import InvalidInput
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import PARAM_PREFIX, is_env_name, params_env

PARAM_TYPES = ("string", "int", "choice", "secret")
# command: a shell command on the targets; script: a seed-003 script of the control plane's
# script directory, run as argv (no shell) on the control plane's own host.
TEMPLATE_KINDS = ("command", "script")
MAX_PARAMETERS = 64
MAX_CHOICES = 256
MAX_PARAM_VALUE = 64 * 1024
# Template names are URL path segments and CLI arguments: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_INT = re.compile(r"[+-]?[0-9]{1,18}")


def check_template_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"template name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ParamSpec:
    """One typed parameter. ``required``: a launch must give a value (a default makes any
    parameter optional)."""

    name: str
    type: str = "string"
    default: str | int | None = None
    choices: tuple[str, ...] = ()
    required: bool = False
    description: str = ""

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> ParamSpec:
        name = str(data.get("name", ""))
        if not is_env_name(name):
            raise InvalidInput(
                f"parameter name {name!r} must be letters, digits and _, not starting with a digit"
            )
        kind = str(data.get("type", "string"))
        if kind not in PARAM_TYPES:
            raise InvalidInput(
                f"parameter {name}: type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}"
            )
        choices = tuple(str(c) for c in data.get("choices") or ())
        if kind == "choice":
            if not choices:
                raise InvalidInput(f"parameter {name}: a choice needs a non-empty choices list")
            if len(choices) > MAX_CHOICES or len(set(choices)) != len(choices):
                raise InvalidInput(
                    f"parameter {name}: choices must be distinct, at most {MAX_CHOICES}"
                )
        elif choices:
            raise InvalidInput(f"parameter {name}: choices belong to type choice only")
        spec = cls(
            name=name,
            type=kind,
            choices=choices,
            required=bool(data.get("required", False)),
            description=str(data.get("description", ""))[:1000],
        )
        default = data.get("default")
        if default is not None:
            if kind == "secret":
                # A default would be stored in the template's clear text and shown to readers.
                raise InvalidInput(f"parameter {name}: a secret parameter has no default")
            default = spec.coerce(default)
        return cls(**{**spec.__dict__, "default": default})

    def coerce(self, value: object) -> str | int:
        """``value`` as this parameter's type, or InvalidInput naming the parameter."""
        if self.type == "int":
            if isinstance(value, bool):
                raise InvalidInput(f"parameter {self.name} must be an integer, got {value!r}")
            if isinstance(value, int):
                return value
            if isinstance(value, str) and _INT.fullmatch(value.strip()):
                return int(value.strip())
            raise InvalidInput(f"parameter {self.name} must be an integer, got {_show(value)}")
        if not isinstance(value, str):
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)
            else:
                raise InvalidInput(f"parameter {self.name} must be a string, got {_show(value)}")
        if "\x00" in value:
            raise InvalidInput(f"parameter {self.name} must not contain NUL")
        if len(value) > MAX_PARAM_VALUE:
            raise InvalidInput(f"parameter {self.name} is longer than {MAX_PARAM_VALUE} characters")
        if self.type == "choice" and value not in self.choices:
            raise InvalidInput(
                f"parameter {self.name} must be one of {', '.join(self.choices)}, got "
                f"{_show(value)}"
            )
        return value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.default is not None:
            out["default"] = self.default
        if self.choices:
            out["choices"] = list(self.choices)
        if self.required:
            out["required"] = True
        if self.description:
            out["description"] = self.description
        return out


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class TemplateSpec:
    """What one version of a template holds."""

    name: str
    command: str
    targets: Targets
    description: str = ""
    kind: str = "command"
    parameters: tuple[ParamSpec, ...] = ()
    timeout: int | None = None
    policy: TaskPolicy | None = None
    notify: tuple[str, ...] = ()

    def validated(self) -> TemplateSpec:
        check_template_name(self.name)
        if self.kind not in TEMPLATE_KINDS:
            raise InvalidInput(
                f"kind must be one of {', '.join(TEMPLATE_KINDS)}, got {self.kind!r}"
            )
        if not self.command.strip():
            raise InvalidInput("command must not be empty")
        if self.kind == "script" and not self.targets.is_empty():
            raise InvalidInput(
                "a script template runs on the control plane's own host (seed 003): leave "
                "targets out"
            )
        if "\x00" in self.command:
            raise InvalidInput("command must not contain NUL bytes")
        if len(self.parameters) > MAX_PARAMETERS:
            raise InvalidInput(f"at most {MAX_PARAMETERS} parameters")
        seen: set[str] = set()
        for param in self.parameters:
            key = param.name.upper()
            if key in seen:
                raise InvalidInput(
                    f"two parameters become the same variable {PARAM_PREFIX}{key}: names "
                    "ignore case"
                )
            seen.add(key)
        if self.timeout is not None and self.timeout <= 0:
            raise InvalidInput("timeout must be a positive number of seconds")
        for event in self.notify:
            if event not in NOTIFY_EVENTS:
                raise InvalidInput(f"notify must name {', '.join(NOTIFY_EVENTS)}, got {event!r}")
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "command": self.command,
            "parameters": [p.to_json() for p in self.parameters],
            "targets": targets_json(self.targets),
            "timeout": self.timeout,
            "policy": self.policy.to_json() if self.policy else None,
            "notify": list(self.notify),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TemplateSpec:
        return cls(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            kind=str(data.get("kind", "command")),
            command=str(data["command"]),
            parameters=tuple(ParamSpec.parse(p) for p in data.get("parameters") or ()),
            targets=targets_from_json(data.get("targets") or {}),
            timeout=data.get("timeout"),
            policy=TaskPolicy.from_json(data["policy"]) if data.get("policy") else None,
            notify=tuple(data.get("notify") or ()),
        )


NOTIFY_EVENTS = ("failure", "success", "change")


def targets_json(targets: Targets) -> dict[str, Any]:
    return {
        "hosts": list(targets.hosts),
        "groups": list(targets.groups),
        "labels": dict(targets.labels),
        "all": targets.all,
    }


def targets_from_json(data: Mapping[str, Any]) -> Targets:
    return Targets(
        hosts=tuple(data.get("hosts") or ()),
        groups=tuple(data.get("groups") or ()),
        labels=dict(data.get("labels") or {}),
        all=bool(data.get("all", False)),
    )


@dataclass(frozen=True)
class Launch:
    """A launch's environment: plain ``PARAM_*`` (with ``PARAMS_JSON`` of the plain ones) and
    the secret parameters' ``PARAM_*``, and the plain values as given, for the record."""

    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)
    values: dict[str, str | int] = field(default_factory=dict)


def resolve_params(specs: tuple[ParamSpec, ...], given: Mapping[str, object]) -> Launch:
    """Validate ``given`` against ``specs`` (unknown, missing, mistyped: InvalidInput naming
    the parameter) and build the environment the command gets."""
    known = {p.name: p for p in specs}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InvalidInput(
            f"unknown parameter(s): {', '.join(unknown)}; the template takes "
            f"{', '.join(known) or 'none'}"
        )
    plain: dict[str, str | int] = {}
    secret: dict[str, str] = {}
    for param in specs:
        if param.name in given and given[param.name] is not None:
            value = param.coerce(given[param.name])
        elif param.default is not None:
            value = param.default
        elif param.required or param.type in ("choice", "int"):
            # A choice or an int without a value has no safe empty meaning.
            raise InvalidInput(f"parameter {param.name} is required")
        else:
            value = ""
        if param.type == "secret":
            secret[PARAM_PREFIX + param.name.upper()] = str(value)
        else:
            plain[param.name] = value
    return Launch(env=params_env(plain) if plain else {}, secret_env=secret, values=plain)
