from __future__ import annotations

import itertools

import pytest

from opsplane.domain.errors import InvalidTransition
from opsplane.domain.states import (
    TERMINAL_RUN_STATUSES,
    RunStatus,
    TaskStatus,
    move_run,
    move_task,
    task_outcome,
)

R = RunStatus
LEGAL_RUN_MOVES = {
    (R.PENDING, R.DISPATCHED), (R.PENDING, R.DELAYED), (R.PENDING, R.UNDELIVERABLE),
    (R.PENDING, R.CANCELED), (R.DELAYED, R.DISPATCHED), (R.DELAYED, R.UNDELIVERABLE),
    (R.DELAYED, R.CANCELED), (R.DISPATCHED, R.RUNNING), (R.DISPATCHED, R.UNDELIVERABLE),
    (R.DISPATCHED, R.CANCELED), (R.DISPATCHED, R.LOST), (R.DISPATCHED, R.SUCCEEDED),
    (R.DISPATCHED, R.FAILED), (R.DISPATCHED, R.TIMED_OUT), (R.RUNNING, R.SUCCEEDED),
    (R.RUNNING, R.FAILED), (R.RUNNING, R.TIMED_OUT), (R.RUNNING, R.CANCELED), (R.RUNNING, R.LOST),
}  # fmt: skip
T = TaskStatus
LEGAL_TASK_MOVES = {
    (T.PENDING, T.RUNNING), (T.PENDING, T.CANCELED), (T.RUNNING, T.SUCCEEDED),
    (T.RUNNING, T.FAILED), (T.RUNNING, T.CANCELED), (T.RUNNING, T.TIMED_OUT),
}  # fmt: skip


@pytest.mark.parametrize(("current", "new"), sorted(LEGAL_RUN_MOVES))
def test_every_legal_run_move_is_allowed(current: RunStatus, new: RunStatus) -> None:
    assert move_run(current, new) is new


@pytest.mark.parametrize(
    ("current", "new"),
    [pair for pair in itertools.product(RunStatus, RunStatus) if pair not in LEGAL_RUN_MOVES],
)
def test_every_other_run_move_is_rejected(current: RunStatus, new: RunStatus) -> None:
    with pytest.raises(InvalidTransition):
        move_run(current, new)


@pytest.mark.parametrize(("current", "new"), sorted(LEGAL_TASK_MOVES))
def test_every_legal_task_move_is_allowed(current: TaskStatus, new: TaskStatus) -> None:
    assert move_task(current, new) is new


@pytest.mark.parametrize(
    ("current", "new"),
    [pair for pair in itertools.product(TaskStatus, TaskStatus) if pair not in LEGAL_TASK_MOVES],
)
def test_every_other_task_move_is_rejected(current: TaskStatus, new: TaskStatus) -> None:
    with pytest.raises(InvalidTransition):
        move_task(current, new)


def test_terminal_runs_never_move_again() -> None:
    for status, new in itertools.product(TERMINAL_RUN_STATUSES, RunStatus):
        with pytest.raises(InvalidTransition):
            move_run(status, new)


def test_task_succeeds_only_when_every_run_succeeded() -> None:
    assert task_outcome({"succeeded": 3}, cancel_requested=False) is T.SUCCEEDED
    assert task_outcome({"succeeded": 2, "failed": 1}, cancel_requested=False) is T.FAILED
    assert task_outcome({"succeeded": 2, "undeliverable": 1}, cancel_requested=False) is T.FAILED
    assert task_outcome({"succeeded": 2, "lost": 1}, cancel_requested=False) is T.FAILED


def test_task_has_no_outcome_while_a_run_is_unfinished() -> None:
    assert task_outcome({"succeeded": 2, "running": 1}, cancel_requested=False) is None
    assert task_outcome({"pending": 1}, cancel_requested=True) is None


def test_a_requested_cancel_makes_an_unsuccessful_task_canceled() -> None:
    assert task_outcome({"succeeded": 1, "canceled": 2}, cancel_requested=True) is T.CANCELED
    assert task_outcome({"succeeded": 3}, cancel_requested=True) is T.SUCCEEDED
