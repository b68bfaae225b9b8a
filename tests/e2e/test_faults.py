"""Agents that die, restart or go away: no lost results, no double execution, no orphans."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import processes_with
from tests.e2e.fleet import Fleet, running_fleet, wait_for


@pytest.fixture
def small_fleet(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path, {"app-1": ("app",), "app-2": ("app",)}) as fleet:
        yield fleet


@pytest.fixture
def patient_fleet(tmp_path: Path) -> Iterator[Fleet]:
    # A long grace period: the restarted agent, not the timer, must be what ends the run, even
    # when a loaded machine takes seconds to start a Python process.
    agents = {"app-1": ("app",), "app-2": ("app",)}
    with running_fleet(tmp_path, agents, server_env={"OPSPLANE_LOST_GRACE": "120"}) as fleet:
        yield fleet


def test_killed_agent_loses_its_run_and_a_restart_never_runs_it_again(small_fleet: Fleet) -> None:
    fleet = small_fleet
    marker = f"1000.{uuid.uuid4().int % 10**6}"
    counter = fleet.root / "work" / "app-1" / "executions"
    task = fleet.create_task(f"echo ran >> executions; sleep {marker}", hosts=["app-1"])
    wait_for(lambda: fleet.runs(task["id"])["app-1"]["status"] == "running", 10, "run started")

    fleet.stop_agent("app-1", signal.SIGKILL)
    fleet.wait_offline("app-1")
    # Past the grace period (3 s in tests) the control plane gives the run up as lost.
    done = fleet.wait_task_done(task["id"], timeout=20)
    run = fleet.runs(task["id"])["app-1"]
    assert (done["status"], run["status"]) == ("failed", "lost")
    assert "unreachable" in run["error"]

    fleet.start_agent("app-1", "app")
    fleet.wait_online("app-1")
    # The restarted agent kills what its predecessor left running and does not run it again.
    wait_for(lambda: not processes_with(f"sleep {marker}"), 10, "the orphan to be killed")
    time.sleep(1.5)
    assert counter.read_text() == "ran\n"
    assert fleet.runs(task["id"])["app-1"]["status"] == "lost"


def test_agent_restarted_before_the_grace_period_reconciles_as_lost(
    patient_fleet: Fleet,
) -> None:
    fleet = patient_fleet
    marker = f"1000.{uuid.uuid4().int % 10**6}"
    task = fleet.create_task(f"sleep {marker}", hosts=["app-2"])
    wait_for(lambda: fleet.runs(task["id"])["app-2"]["status"] == "running", 10, "run started")
    fleet.stop_agent("app-2", signal.SIGKILL)
    fleet.start_agent("app-2", "app")
    # The new agent does not know the run: the control plane learns it at once from the hello.
    done = fleet.wait_task_done(task["id"], timeout=15)
    run = fleet.runs(task["id"])["app-2"]
    assert (done["status"], run["status"]) == ("failed", "lost")
    assert "reconnected without this run" in run["error"]
    wait_for(lambda: not processes_with(f"sleep {marker}"), 10, "the orphan to be killed")


def test_stopped_agent_goes_offline_and_new_runs_for_it_are_undeliverable(
    small_fleet: Fleet,
) -> None:
    fleet = small_fleet
    fleet.stop_agent("app-2")
    fleet.wait_offline("app-2")
    task = fleet.create_task("echo hi", groups=["app"])
    done = fleet.wait_task_done(task["id"])
    runs = fleet.runs(task["id"])
    assert runs["app-1"]["status"] == "succeeded"
    assert runs["app-2"]["status"] == "undeliverable"
    assert "offline" in runs["app-2"]["error"]
    assert done["status"] == "failed"


def test_results_of_runs_that_finish_while_the_server_is_down_arrive_after_it_returns(
    small_fleet: Fleet,
) -> None:
    fleet = small_fleet
    task = fleet.create_task("sleep 2; echo finished", hosts=["app-1"])
    wait_for(lambda: fleet.runs(task["id"])["app-1"]["status"] == "running", 10, "run started")
    assert fleet.server is not None
    fleet.server.send_signal(signal.SIGINT)
    fleet.server.wait(timeout=20)
    time.sleep(3)  # the command ends while nobody listens; the agent spools its result
    fleet.start_server()
    done = fleet.wait_task_done(task["id"], timeout=30)
    run = fleet.runs(task["id"])["app-1"]
    assert (done["status"], run["status"], run["stdout"]) == (
        "succeeded",
        "succeeded",
        "finished\n",
    )
