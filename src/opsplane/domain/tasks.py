"""What an operator asks for when creating a task, validated without I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from opsplane.domain.errors import InvalidInput
from opsplane.domain.targeting import Targets

MAX_TIMEOUT_SECONDS = 7 * 24 * 3600


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
    env: dict[str, str] = field(default_factory=dict)

    def validated(self, default_timeout: int) -> TaskRequest:
        """A copy with defaults filled in, or InvalidInput saying what is wrong."""
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
            raise InvalidInput("targets select nothing: give hosts, groups, or all=true")
        name = self.name.strip() or _default_name(self.command)
        return TaskRequest(
            command=self.command,
            targets=self.targets,
            timeout=timeout,
            name=name,
            description=self.description,
            start=self.start,
            created_by=self.created_by,
            idempotency_key=self.idempotency_key,
            env=self.env,
        )


def _default_name(command: str) -> str:
    first_line = command.strip().splitlines()[0]
    return first_line if len(first_line) <= 80 else first_line[:77] + "..."
