"""Task and run state machines (DESIGN §2): every transition goes through this module."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from opsplane.domain.errors import InvalidTransition


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"


class RunStatus(StrEnum):
    PENDING = "pending"
    DELAYED = "delayed"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    UNDELIVERABLE = "undeliverable"
    LOST = "lost"


_TASK_MOVES: Mapping[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELED}),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.TIMED_OUT}
    ),
}

_R = RunStatus
_RUN_MOVES: Mapping[RunStatus, frozenset[RunStatus]] = {
    _R.PENDING: frozenset({_R.DISPATCHED, _R.DELAYED, _R.UNDELIVERABLE, _R.CANCELED}),
    _R.DELAYED: frozenset({_R.DISPATCHED, _R.UNDELIVERABLE, _R.CANCELED}),
    _R.DISPATCHED: frozenset(
        {
            _R.RUNNING,
            _R.UNDELIVERABLE,
            _R.CANCELED,
            _R.LOST,
            # An agent may report the end of a short command before its "started" is applied:
            # both travel the same stream, but a result is enough evidence that it ran.
            _R.SUCCEEDED,
            _R.FAILED,
            _R.TIMED_OUT,
        }
    ),
    _R.RUNNING: frozenset({_R.SUCCEEDED, _R.FAILED, _R.TIMED_OUT, _R.CANCELED, _R.LOST}),
}

TERMINAL_RUN_STATUSES: frozenset[RunStatus] = frozenset(
    {_R.SUCCEEDED, _R.FAILED, _R.TIMED_OUT, _R.CANCELED, _R.UNDELIVERABLE, _R.LOST}
)
TERMINAL_TASK_STATUSES: frozenset[TaskStatus] = frozenset(
    {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.TIMED_OUT}
)
# Runs the control plane has handed to a host and not yet heard the end of.
IN_FLIGHT_RUN_STATUSES: frozenset[RunStatus] = frozenset({_R.DISPATCHED, _R.RUNNING})


def can_move_run(current: RunStatus, new: RunStatus) -> bool:
    return new in _RUN_MOVES.get(current, frozenset())


def move_run(current: RunStatus | str, new: RunStatus | str) -> RunStatus:
    """The new run status, or InvalidTransition when the state machine forbids the move."""
    cur, nxt = RunStatus(current), RunStatus(new)
    if not can_move_run(cur, nxt):
        raise InvalidTransition("run", cur, nxt)
    return nxt


def can_move_task(current: TaskStatus, new: TaskStatus) -> bool:
    return new in _TASK_MOVES.get(current, frozenset())


def move_task(current: TaskStatus | str, new: TaskStatus | str) -> TaskStatus:
    """The new task status, or InvalidTransition when the state machine forbids the move."""
    cur, nxt = TaskStatus(current), TaskStatus(new)
    if not can_move_task(cur, nxt):
        raise InvalidTransition("task", cur, nxt)
    return nxt


def task_outcome(
    run_counts: Mapping[RunStatus, int] | Mapping[str, int],
    *,
    cancel_requested: bool,
    deadline_passed: bool = False,
) -> TaskStatus | None:
    """The terminal status a task reaches from the count of its runs in each status (latest
    attempts only), or None while any run is unfinished.

    A task succeeds when every run succeeded; a cancel the operator asked for wins over
    failures that the cancel itself caused, and the task deadline over what it cut short;
    anything else is a failure.
    """
    counts = {RunStatus(status): n for status, n in run_counts.items() if n}
    if any(status not in TERMINAL_RUN_STATUSES for status in counts):
        return None
    if set(counts) <= {_R.SUCCEEDED}:
        return TaskStatus.SUCCEEDED
    if cancel_requested:
        return TaskStatus.CANCELED
    if deadline_passed:
        return TaskStatus.TIMED_OUT
    return TaskStatus.FAILED
