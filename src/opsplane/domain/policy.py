"""How a task's runs are paced and repeated: priority, retries, rate control, canary rollout,
delivery deadline and task deadline (DESIGN §2). Parsed and validated without I/O; the engine's
scheduler applies it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from opsplane.domain.errors import InvalidInput
from opsplane.domain.states import RunStatus

MAX_PRIORITY = 1000
MAX_ATTEMPTS = 20
MAX_BACKOFF_SECONDS = 3600.0
MAX_WAIT_SECONDS = 7 * 24 * 3600
RETRYABLE = frozenset(
    {RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.UNDELIVERABLE, RunStatus.LOST}
)
# What max_errors counts: runs that reached their host and went wrong. An undeliverable run never
# reached it, and a canceled one was stopped on purpose.
ERROR_STATUSES = frozenset({RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.LOST})


@dataclass(frozen=True)
class Limit:
    """A count of hosts, absolute (``10``) or relative to the task's targets (``"25%"``)."""

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, value: object, what: str) -> Limit:
        if isinstance(value, bool):
            raise InvalidInput(f'{what} must be a number of hosts or a percentage like "25%"')
        if isinstance(value, int):
            if value < 1:
                raise InvalidInput(f"{what} must be at least 1, got {value}")
            return cls(count=value)
        if isinstance(value, str):
            text = value.strip()
            try:
                if text.endswith("%"):
                    percent = float(text[:-1])
                    if not 0 < percent <= 100:
                        raise InvalidInput(f"{what} must be a percentage in (0, 100], got {text}")
                    return cls(percent=percent)
                return cls.parse(int(text), what)
            except ValueError:
                pass
        raise InvalidInput(f'{what} must be a number of hosts or a percentage like "25%"')

    def of(self, total: int) -> int:
        """The limit for a task of ``total`` hosts: at least 1."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return max(1, math.ceil(total * self.percent / 100))

    def to_json(self) -> int | str:
        if self.count is not None:
            return self.count
        return f"{self.percent:g}%"


@dataclass(frozen=True)
class Retries:
    max_attempts: int = 1
    backoff_seconds: float = 0.0
    on: frozenset[RunStatus] = RETRYABLE

    @classmethod
    def parse(cls, value: object) -> Retries:
        if not isinstance(value, dict):
            raise InvalidInput("retries must be an object: {max_attempts, backoff_seconds, on}")
        unknown = set(value) - {"max_attempts", "backoff_seconds", "on"}
        if unknown:
            raise InvalidInput(f"retries has unknown fields: {', '.join(sorted(unknown))}")
        attempts = value.get("max_attempts", 1)
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise InvalidInput("retries.max_attempts must be an integer")
        if not 1 <= attempts <= MAX_ATTEMPTS:
            raise InvalidInput(f"retries.max_attempts must be 1..{MAX_ATTEMPTS}, got {attempts}")
        backoff = value.get("backoff_seconds", 0)
        if isinstance(backoff, bool) or not isinstance(backoff, int | float):
            raise InvalidInput("retries.backoff_seconds must be a number")
        if not 0 <= backoff <= MAX_BACKOFF_SECONDS:
            raise InvalidInput(f"retries.backoff_seconds must be 0..{MAX_BACKOFF_SECONDS:g}")
        on_value = value.get("on", sorted(RETRYABLE))
        if not isinstance(on_value, list) or not on_value:
            raise InvalidInput("retries.on must be a non-empty list of statuses")
        on: set[RunStatus] = set()
        for item in on_value:
            if item not in {s.value for s in RETRYABLE}:
                allowed = ", ".join(sorted(RETRYABLE))
                raise InvalidInput(f"retries.on: {item!r} is not one of {allowed}")
            on.add(RunStatus(item))
        return cls(attempts, float(backoff), frozenset(on))

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (2, 3, …): the backoff doubles each time."""
        return min(MAX_BACKOFF_SECONDS, self.backoff_seconds * 2.0 ** max(0, attempt - 2))

    def to_json(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "backoff_seconds": self.backoff_seconds,
            "on": sorted(self.on),
        }


@dataclass(frozen=True)
class Rollout:
    """Run ``canary`` hosts first; only if they all succeed, the rest with at most ``then``
    at a time (all at once when ``then`` is None)."""

    canary: int
    then: Limit | None = None

    @classmethod
    def parse(cls, value: object) -> Rollout:
        if not isinstance(value, dict):
            raise InvalidInput('rollout must be an object: {canary: N, then: M or "50%"}')
        unknown = set(value) - {"canary", "then"}
        if unknown:
            raise InvalidInput(f"rollout has unknown fields: {', '.join(sorted(unknown))}")
        canary = value.get("canary")
        if isinstance(canary, bool) or not isinstance(canary, int) or canary < 1:
            raise InvalidInput("rollout.canary must be an integer of at least 1")
        then = value.get("then")
        return cls(canary, Limit.parse(then, "rollout.then") if then is not None else None)

    def to_json(self) -> dict[str, Any]:
        return {"canary": self.canary, "then": self.then.to_json() if self.then else None}


@dataclass(frozen=True)
class TaskPolicy:
    priority: int = 0
    retries: Retries | None = None
    max_concurrency: Limit | None = None
    max_errors: Limit | None = None
    rollout: Rollout | None = None
    # Seconds a run may wait for its offline host (held as ``delayed``); 0: undeliverable at once.
    delivery_deadline: int = 0
    # Seconds the whole task may take from its start; None: no task deadline.
    deadline: int | None = None

    @classmethod
    def parse(
        cls,
        *,
        priority: object = 0,
        retries: object = None,
        max_concurrency: object = None,
        max_errors: object = None,
        rollout: object = None,
        delivery_deadline: object = 0,
        deadline: object = None,
    ) -> TaskPolicy:
        """A policy from an API body's fields, or InvalidInput naming the bad one."""
        return cls(
            priority=_bounded_int(priority, "priority", -MAX_PRIORITY, MAX_PRIORITY),
            retries=Retries.parse(retries) if retries is not None else None,
            max_concurrency=Limit.parse(max_concurrency, "max_concurrency")
            if max_concurrency is not None
            else None,
            max_errors=Limit.parse(max_errors, "max_errors") if max_errors is not None else None,
            rollout=Rollout.parse(rollout) if rollout is not None else None,
            delivery_deadline=_bounded_int(
                delivery_deadline or 0, "delivery_deadline", 0, MAX_WAIT_SECONDS
            ),
            deadline=_bounded_int(deadline, "deadline", 1, MAX_WAIT_SECONDS)
            if deadline is not None
            else None,
        )

    @property
    def paced(self) -> bool:
        """Whether the task holds back runs of its own (the scheduler must pace it)."""
        return self.max_concurrency is not None or self.rollout is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "priority": self.priority,
            "retries": self.retries.to_json() if self.retries else None,
            "max_concurrency": self.max_concurrency.to_json() if self.max_concurrency else None,
            "max_errors": self.max_errors.to_json() if self.max_errors else None,
            "rollout": self.rollout.to_json() if self.rollout else None,
            "delivery_deadline": self.delivery_deadline,
            "deadline": self.deadline,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TaskPolicy:
        """The policy stored with a task (written by ``to_json``, so already valid)."""
        if not data:
            return cls()
        return cls.parse(
            priority=data.get("priority", 0),
            retries=data.get("retries"),
            max_concurrency=data.get("max_concurrency"),
            max_errors=data.get("max_errors"),
            rollout=data.get("rollout"),
            delivery_deadline=data.get("delivery_deadline", 0),
            deadline=data.get("deadline"),
        )


def _bounded_int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer")
    if not low <= value <= high:
        raise InvalidInput(f"{what} must be {low}..{high}, got {value}")
    return value
