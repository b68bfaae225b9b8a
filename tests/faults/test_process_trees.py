"""Fault scenario 7 (issue 13): a timeout kills the whole tree on a real agent, children that
called ``setsid`` included, and after a hundred runs the agent has no zombie children."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import processes_with
from tests.e2e.fleet import Fleet, running_fleet, wait_for
from tests.integration.sshd import sleep_marker

AGENT = "tree-1"
TIMEOUT = 2
# The agent's kill grace (5 s by default) plus room for a loaded machine.
GRACE = 5.0 + 5.0
RUNS = 100


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path, {AGENT: ("trees",)}) as the_fleet:
        yield the_fleet


def _living(marker: str) -> list[psutil.Process]:
    alive = []
    for process in processes_with(marker):
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _zombie_children(pid: int) -> list[int]:
    zombies = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return zombies


def test_a_timeout_kills_every_descendant_and_runs_leave_no_zombies(fleet: Fleet) -> None:
    in_group, escaped = sleep_marker(), sleep_marker()
    try:
        task = fleet.create_task(
            f"sh -c 'sleep {in_group} & setsid sleep {escaped} & wait'",
            timeout=TIMEOUT,
            hosts=[AGENT],
        )
        wait_for(lambda: _living(escaped) and _living(in_group), 15, "the tree to be running")
        started = time.monotonic()
        done = fleet.wait_task_done(task["id"], timeout=TIMEOUT + GRACE + 15)
        assert fleet.runs(task["id"])[AGENT]["status"] == "timed_out", done
        wait_for(
            lambda: not _living(in_group) and not _living(escaped),
            TIMEOUT + GRACE,
            "every descendant to be gone",
        )
        gone_after = time.monotonic() - started
    finally:
        for process in [*_living(in_group), *_living(escaped)]:
            process.kill()

    # A hundred runs that leave children behind, in and out of their group.
    tag = uuid.uuid4().hex[:8]
    ids = [
        fleet.create_task(
            f"sleep 0.2 & setsid sleep 0.3 & echo {tag}-{i}", timeout=10, hosts=[AGENT]
        )["id"]
        for i in range(RUNS)
    ]
    for task_id in ids:
        fleet.wait_task_done(task_id, timeout=60)
    statuses = {fleet.runs(task_id)[AGENT]["status"] for task_id in ids}
    assert statuses == {"succeeded"}
    agent = fleet.agents[AGENT]
    time.sleep(1)  # the last runs' children finish their sleeps
    assert _zombie_children(agent.pid) == []
    print(
        f"\nprocess trees: every descendant gone {gone_after:.1f}s after the tree started"
        f" (timeout {TIMEOUT}s); zombies 0"
    )
