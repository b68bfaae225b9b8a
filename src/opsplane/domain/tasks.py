"""What an operator asks for when creating a task, validated without I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from opsplane.domain.errors import InvalidInput
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.targeting import Targets

MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A task's run_as: a POSIX portable user name (letters, digits, ``.``, ``_``, ``-``), not
# starting with a digit, ``.`` or ``-`` (uids and option-like names are out), at most 32
# characters (Linux's limit). Nothing in it is special to a shell or to sudo.
_RUN_AS = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
# Named parameters (seed 003's params, seed 001's parameters) reach the command as variables.
MAX_PARAMS = 256
# PARAMS_JSON is one environment string: Linux refuses one over 128 KiB (MAX_ARG_STRLEN).
MAX_PARAMS_BYTES = 128 * 1024
PARAM_PREFIX = "PARAM_"
PARAMS_JSON = "PARAMS_JSON"


def is_env_name(name: str) -> bool:
    """Whether ``name`` can be an environment variable's name: letters, digits and ``_``, not
    starting with a digit. Names reach shells (``export NAME=…`` over SSH), so nothing else."""
    return _ENV_NAME.fullmatch(name) is not None


def check_run_as(user: str) -> str:
    """``user`` if it can be a task's ``run_as``, else InvalidInput saying what is allowed."""
    if _RUN_AS.fullmatch(user) is None:
        raise InvalidInput(
            f"run_as {user[:40]!r} is not a user name: 1 to 32 letters, digits, '.', '_' "
            "or '-', starting with a letter or '_'"
        )
    return user


# An upload's owner or group: a name as for run_as, or a numeric id (what chown accepts).
_NUMERIC_ID = re.compile(r"[0-9]{1,10}")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown(2)


def check_owner(value: str, what: str) -> str:
    """``value`` if it can be an upload's owner or group (``what`` names which), else
    InvalidInput saying what is allowed."""
    if _NUMERIC_ID.fullmatch(value) is not None:
        if int(value) > MAX_ID:
            raise InvalidInput(f"{what} {value} is not a valid numeric id (at most {MAX_ID})")
        return value
    if _RUN_AS.fullmatch(value) is None:
        raise InvalidInput(
            f"{what} {value[:40]!r} is neither a numeric id nor a name: 1 to 32 letters, "
            "digits, '.', '_' or '-', starting with a letter or '_'"
        )
    return value


def params_env(params: Mapping[str, object]) -> dict[str, str]:
    """The environment a script gets for ``params``: ``PARAM_<NAME>`` per param (name upper-
    cased), and all of them as one JSON object in ``PARAMS_JSON``. Strings are passed as
    they are; numbers, booleans, lists and objects as JSON; null as the empty string. Nothing
    is ever interpreted by a shell."""
    if len(params) > MAX_PARAMS:
        raise InvalidInput(f"at most {MAX_PARAMS} params")
    env: dict[str, str] = {}
    for name, value in params.items():
        if not is_env_name(name):
            raise InvalidInput(
                f"param name {name!r} must be letters, digits and _, not starting with a digit"
            )
        key = PARAM_PREFIX + name.upper()
        if key in env:
            raise InvalidInput(f"two params become the same variable {key}: names ignore case")
        if isinstance(value, str):
            text = value
        elif value is None:
            text = ""
        else:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if "\x00" in text:
            raise InvalidInput(f"param {name!r} must not contain NUL")
        env[key] = text
    env[PARAMS_JSON] = json.dumps(params, ensure_ascii=False, separators=(",", ":"))
    if sum(len(k) + len(v) for k, v in env.items()) > MAX_PARAMS_BYTES:
        raise InvalidInput(f"params take more than {MAX_PARAMS_BYTES} bytes")
    return env


@dataclass(frozen=True)
class ExecSpec:
    """How a run executes when it is more than a shell command line: an argv run without a
    shell, or an in-process handler with arguments. Environment and working directory apply
    to both."""

    argv: tuple[str, ...] | None = None
    handler: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # Environment values marked secret, encrypted (security/secrets.py): name -> ciphertext.
    secret_env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    # Upload tasks: copy this file or directory of the control plane to remote_path.
    local_path: str | None = None
    remote_path: str | None = None
    # Upload tasks: the owner and group every written file gets (names or numeric ids);
    # None: the account that writes it (the agent's, or the SSH login's).
    owner: str | None = None
    group: str | None = None
    # The caller's own record of the request, kept with the task and never sent to a host
    # (the seed-003 façade keeps its script_path, params, priority and retry here).
    meta: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        extra: dict[str, object] = {"meta": dict(self.meta)} if self.meta else {}
        if self.secret_env:
            extra["secret_env"] = dict(self.secret_env)
        return {
            **extra,
            "local_path": self.local_path,
            "remote_path": self.remote_path,
            **({"owner": self.owner} if self.owner else {}),
            **({"group": self.group} if self.group else {}),
            "argv": list(self.argv) if self.argv is not None else None,
            "handler": self.handler,
            "args": list(self.args),
            "env": dict(self.env),
            "cwd": self.cwd,
        }

    @classmethod
    def from_json(cls, data: dict[str, object] | None) -> ExecSpec:
        if not data:
            return cls()
        argv = data.get("argv")
        args = data.get("args") or []
        env = data.get("env") or {}
        secret_env = data.get("secret_env") or {}
        assert isinstance(args, list) and isinstance(env, dict) and isinstance(secret_env, dict)
        return cls(
            argv=tuple(str(a) for a in argv) if isinstance(argv, list) else None,
            handler=str(data["handler"]) if data.get("handler") else None,
            args=tuple(str(a) for a in args),
            env={str(k): str(v) for k, v in env.items()},
            secret_env={str(k): str(v) for k, v in secret_env.items()},
            cwd=str(data["cwd"]) if data.get("cwd") else None,
            local_path=str(data["local_path"]) if data.get("local_path") else None,
            remote_path=str(data["remote_path"]) if data.get("remote_path") else None,
            owner=str(data["owner"]) if data.get("owner") else None,
            group=str(data["group"]) if data.get("group") else None,
            meta=dict(meta) if isinstance(meta := data.get("meta"), dict) else {},
        )


@dataclass(frozen=True)
class TaskRequest:
    command: str
    targets: Targets
    timeout: int | None = None
    name: str = ""
    description: str = ""
    start: bool = True
    created_by: str = "anonymous"
    idempotency_key: str | None = None
    kind: str = "command"
    spec: ExecSpec | None = None
    # The groups the caller may run on (an operator's grant); None: no restriction. A task
    # reaching any host outside them is refused as a whole (domain.access).
    allowed_groups: frozenset[str] | None = None
    # Priority, retries, rate control, rollout and deadlines; None: run everything at once.
    policy: TaskPolicy | None = None
    # The task this one re-runs (POST /tasks/{id}/rerun).
    rerun_of: str | None = None
    # The account the command runs as on each host (seed 002's ``user``); None: the agent's
    # own. Only agents honour it (docs/agent-policy.md): SSH hosts are refused at submit.
    run_as: str | None = None
    # Launched from a template (issue 20): its name and version, kept with the task.
    template: str | None = None
    template_version: int | None = None

    def validated(self, default_timeout: int) -> TaskRequest:
        """A copy with defaults filled in, or InvalidInput saying what is wrong."""
        if self.kind not in ("command", "script", "upload"):
            raise InvalidInput(f"kind must be command, script or upload, got {self.kind!r}")
        if self.kind == "upload" and (
            self.spec is None or not self.spec.local_path or not self.spec.remote_path
        ):
            raise InvalidInput("an upload task needs local_path and remote_path")
        if self.spec is not None and self.spec.owner is not None:
            check_owner(self.spec.owner, "owner")
        if self.spec is not None and self.spec.group is not None:
            check_owner(self.spec.group, "group")
        if self.kind == "script" and (
            self.spec is None or (not self.spec.argv and not self.spec.handler)
        ):
            raise InvalidInput("a script task needs an argv or a handler")
        if not self.command.strip():
            raise InvalidInput("command must not be empty")
        if "\x00" in self.command:
            raise InvalidInput("command must not contain NUL bytes")
        timeout = default_timeout if self.timeout is None else self.timeout
        if timeout <= 0:
            raise InvalidInput(f"timeout must be a positive number of seconds, got {timeout}")
        if timeout > MAX_TIMEOUT_SECONDS:
            raise InvalidInput(f"timeout must be at most {MAX_TIMEOUT_SECONDS} seconds")
        if self.targets.is_empty():
            raise InvalidInput("targets select nothing: give hosts, groups, labels, or all=true")
        name = self.name.strip() or _default_name(self.command)
        if self.run_as is not None:
            check_run_as(self.run_as)
        return TaskRequest(
            command=self.command,
            targets=self.targets,
            timeout=timeout,
            name=name,
            description=self.description,
            start=self.start,
            created_by=self.created_by,
            idempotency_key=self.idempotency_key,
            kind=self.kind,
            spec=self.spec,
            allowed_groups=self.allowed_groups,
            policy=self.policy,
            rerun_of=self.rerun_of,
            run_as=self.run_as,
            template=self.template,
            template_version=self.template_version,
        )


def _default_name(command: str) -> str:
    first_line = command.strip().splitlines()[0]
    return first_line if len(first_line) <= 80 else first_line[:77] + "..."
