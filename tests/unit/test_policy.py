"""Task policy parsing: every bad field is refused with a message naming it; environment
variable names, one rule for every place that takes them."""

from __future__ import annotations

import pytest

from opsplane.domain.errors import InvalidInput
from opsplane.domain.policy import Limit, Retries, TaskPolicy
from opsplane.domain.states import RunStatus, TaskStatus, task_outcome
from opsplane.domain.tasks import is_env_name
from opsplane.transport.ssh.sessions import remote_command


def test_limits_are_numbers_or_percentages_of_the_targets() -> None:
    assert Limit.parse(3, "x").of(100) == 3
    assert Limit.parse("3", "x").of(100) == 3
    assert Limit.parse("25%", "x").of(10) == 3  # rounded up
    assert Limit.parse("1%", "x").of(10) == 1  # never 0
    assert Limit.parse("50%", "x").to_json() == "50%"


@pytest.mark.parametrize("value", [0, -1, "0%", "101%", "abc", True, 1.5, None, "%"])
def test_bad_limits_are_refused(value: object) -> None:
    with pytest.raises(InvalidInput, match="max_errors"):
        Limit.parse(value, "max_errors")


def test_retry_backoff_doubles_from_the_second_attempt() -> None:
    retries = Retries.parse({"max_attempts": 4, "backoff_seconds": 2})
    assert [retries.delay_before(n) for n in (2, 3, 4)] == [2.0, 4.0, 8.0]
    assert retries.on == {RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.UNDELIVERABLE,
                          RunStatus.LOST}  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"retries": {"max_attempts": 0}}, "max_attempts"),
        ({"retries": {"max_attempts": 2, "on": ["succeeded"]}}, "retries.on"),
        ({"retries": {"tries": 2}}, "unknown fields: tries"),
        ({"retries": {"backoff_seconds": -1}}, "backoff_seconds"),
        ({"rollout": {"canary": 0}}, "rollout.canary"),
        ({"rollout": {"canary": 1, "then": "0%"}}, "rollout.then"),
        ({"priority": 5000}, "priority"),
        ({"deadline": 0}, "deadline"),
        ({"delivery_deadline": -5}, "delivery_deadline"),
    ],
)
def test_bad_policies_say_what_is_wrong(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        TaskPolicy.parse(**fields)  # type: ignore[arg-type]


def test_a_policy_survives_its_stored_form() -> None:
    policy = TaskPolicy.parse(
        priority=3,
        retries={"max_attempts": 2, "on": ["lost"]},
        max_concurrency="10%",
        max_errors=2,
        rollout={"canary": 2, "then": "50%"},
        delivery_deadline=60,
        deadline=600,
    )
    assert TaskPolicy.from_json(policy.to_json()) == policy
    assert policy.paced and not TaskPolicy().paced


def test_a_task_past_its_deadline_ends_timed_out_unless_the_operator_canceled_it() -> None:
    counts = {"succeeded": 1, "timed_out": 1, "canceled": 1}
    assert task_outcome(counts, cancel_requested=False, deadline_passed=True) == (
        TaskStatus.TIMED_OUT
    )
    assert task_outcome(counts, cancel_requested=True, deadline_passed=True) == TaskStatus.CANCELED
    assert task_outcome(counts, cancel_requested=False) == TaskStatus.FAILED


@pytest.mark.parametrize("name", ["PATH", "_x", "DB_HOST2"])
def test_environment_names_that_are_names(name: str) -> None:
    assert is_env_name(name)


@pytest.mark.parametrize("name", ["", "2X", "A-B", "A B", "A\n", "A=1", "Ä"])
def test_anything_else_is_not_an_environment_name_anywhere(name: str) -> None:
    assert not is_env_name(name)
    # The SSH link exports names into a shell: a name with a newline would start a command.
    with pytest.raises(ValueError, match="invalid environment variable name"):
        remote_command("true", env={name: "x"})
