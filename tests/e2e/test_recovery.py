"""Recovery (issue 7): the control plane killed with SIGKILL and restarted on the same data
directory and ports leaves nothing running or pending forever. Runs still executing on agents
are reconciled when the agents report (they spool results while the server is down), runs on
agents that never come back become ``lost`` after the grace period, and a task created but not
started stays startable.

Agents reconnect with exponential backoff and full jitter (0.5 s doubling to 30 s), so after an
outage an agent may take many seconds to come back: the grace periods and the waits below leave
room for that, or the tests would depend on the dice.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import Fleet, running_fleet, wait_for

AGENTS: dict[str, tuple[str, ...]] = {"rec-1": ("rec",), "rec-2": ("rec",), "rec-3": ("rec",)}
# Longer than an agent's reconnect delay after an outage of a few seconds can be (at most 30 s):
# the returning agent, not the timer, must decide how its run ends.
PATIENT = {"OPSPLANE_LOST_GRACE": "120"}
# Long enough for the surviving agents of a short outage to be back (their reconnect delay is
# then drawn from at most a few seconds), short enough that the test does not wait long for the
# dead agent's run to be given up.
SHORT_GRACE = 20
# Shorter than the outage of the last test.
GRACE = 5
# Reconnecting agents plus a grace period: bounded, with room for a loaded machine.
RECOVERY_TIMEOUT = 60.0


def fleet_of(root: Path, server_env: dict[str, str] | None = None) -> Iterator[Fleet]:
    with running_fleet(root, AGENTS, server_env=server_env) as fleet:
        yield fleet


@pytest.fixture
def patient_fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_of(tmp_path, PATIENT)


@pytest.fixture
def short_grace_fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_of(tmp_path, {"OPSPLANE_LOST_GRACE": str(SHORT_GRACE)})


@pytest.fixture
def default_fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_of(tmp_path)


@pytest.fixture
def grace_fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_of(tmp_path, {"OPSPLANE_LOST_GRACE": str(GRACE)})


def kill_server(fleet: Fleet) -> None:
    """kill -9: no shutdown code of the control plane runs."""
    assert fleet.server is not None
    fleet.server.send_signal(signal.SIGKILL)
    assert fleet.server.wait(timeout=20) == -signal.SIGKILL


def marker_file(fleet: Fleet, host: str, marker: str) -> Path:
    # Each agent runs commands in its own working directory, on this same machine.
    return fleet.root / "work" / host / f"executions-{marker}"


def executions(fleet: Fleet, host: str, marker: str) -> list[str]:
    path = marker_file(fleet, host, marker)
    return path.read_text().splitlines() if path.exists() else []


def counted_command(marker: str, seconds: float = 2) -> str:
    """A command that records each execution in a file of the host's working directory."""
    return f"sleep {seconds}; echo done-{marker} >> executions-{marker}; echo ok"


def wait_all_running(fleet: Fleet, task_id: str, hosts: list[str]) -> None:
    def running() -> bool:
        runs = fleet.runs(task_id)
        return all(runs.get(h, {}).get("status") == "running" for h in hosts)

    wait_for(running, 15, f"runs of {task_id} running on {hosts}")


def test_runs_executing_through_a_server_kill_are_reconciled_after_restart(
    patient_fleet: Fleet,
) -> None:
    fleet = patient_fleet
    hosts = sorted(AGENTS)
    marker = uuid.uuid4().hex[:12]
    task = fleet.create_task(counted_command(marker), groups=["rec"])
    wait_all_running(fleet, task["id"], hosts)

    kill_server(fleet)
    # The commands end while nobody listens: every agent spools its result.
    wait_for(
        lambda: all(executions(fleet, h, marker) for h in hosts),
        15,
        "the commands to finish while the server is down",
    )
    fleet.start_server()

    done = fleet.wait_task_done(task["id"], timeout=RECOVERY_TIMEOUT)
    runs = fleet.runs(task["id"])
    assert done["status"] == "succeeded", (runs, fleet.server_log())
    assert {h: (r["status"], r["exit_code"], r["stdout"]) for h, r in runs.items()} == {
        h: ("succeeded", 0, "ok\n") for h in hosts
    }
    time.sleep(1.5)  # nothing is sent again after the task ended
    for host in hosts:
        assert executions(fleet, host, marker) == [f"done-{marker}"], host


def test_run_of_an_agent_killed_with_the_server_is_lost_and_the_others_succeed(
    short_grace_fleet: Fleet,
) -> None:
    fleet = short_grace_fleet
    hosts = sorted(AGENTS)
    victim, survivors = hosts[0], hosts[1:]
    marker = uuid.uuid4().hex[:12]
    task = fleet.create_task(counted_command(marker), groups=["rec"])
    wait_all_running(fleet, task["id"], hosts)

    kill_server(fleet)
    fleet.stop_agent(victim, signal.SIGKILL)
    fleet.start_server()

    # The victim never returns: its run is given up once the grace period has passed.
    done = fleet.wait_task_done(task["id"], timeout=SHORT_GRACE + RECOVERY_TIMEOUT)
    runs = fleet.runs(task["id"])
    assert done["status"] == "failed", (runs, fleet.server_log())
    assert runs[victim]["status"] == "lost", runs[victim]
    assert "unreachable" in (runs[victim]["error"] or "")
    assert {h: (runs[h]["status"], runs[h]["stdout"]) for h in survivors} == {
        h: ("succeeded", "ok\n") for h in survivors
    }, fleet.server_log()
    for host in survivors:
        assert executions(fleet, host, marker) == [f"done-{marker}"], host
    assert fleet.host_status(victim) == "offline"


def test_task_created_without_start_is_startable_after_a_server_kill(
    default_fleet: Fleet,
) -> None:
    fleet = default_fleet
    hosts = sorted(AGENTS)
    marker = uuid.uuid4().hex[:12]
    body = {"command": counted_command(marker, 0.2), "targets": {"groups": ["rec"]}, "start": False}
    with fleet.client() as client:
        response = client.post("/api/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    task_id = response.json()["id"]
    assert response.json()["status"] == "pending"

    kill_server(fleet)
    fleet.start_server()
    fleet.wait_online(*hosts, timeout=RECOVERY_TIMEOUT)

    # Still pending: recovery dispatches the runs of running tasks only.
    assert fleet.task(task_id)["status"] == "pending"
    assert {r["status"] for r in fleet.runs(task_id).values()} == {"pending"}
    assert not any(executions(fleet, h, marker) for h in hosts)

    with fleet.client() as client:
        response = client.post(f"/api/v1/tasks/{task_id}/start")
    assert response.status_code == 200, response.text
    done = fleet.wait_task_done(task_id, timeout=30)
    runs = fleet.runs(task_id)
    assert done["status"] == "succeeded", (runs, fleet.server_log())
    assert {h: (r["status"], r["stdout"]) for h, r in runs.items()} == {
        h: ("succeeded", "ok\n") for h in hosts
    }
    for host in hosts:
        assert executions(fleet, host, marker) == [f"done-{marker}"], host


def test_an_outage_longer_than_the_grace_period_does_not_lose_runs_at_restart(
    grace_fleet: Fleet,
) -> None:
    """The grace period is the agents' time to come back to a control plane that is up: a
    server that was down for longer than it must not give up their runs the moment it starts.
    A returning agent's spooled result then decides how its run ended."""
    fleet = grace_fleet
    hosts = sorted(AGENTS)
    marker = uuid.uuid4().hex[:12]
    task = fleet.create_task(counted_command(marker, 1), groups=["rec"])
    wait_all_running(fleet, task["id"], hosts)

    kill_server(fleet)
    killed = time.monotonic()
    wait_for(
        lambda: all(executions(fleet, h, marker) for h in hosts),
        15,
        "the commands to finish while the server is down",
    )
    time.sleep(max(0.0, killed + GRACE + 1 - time.monotonic()))
    restarted = time.monotonic()
    fleet.start_server()

    # Until the grace period has passed since the restart, no run may be lost; and a run whose
    # agent came back within it is reconciled from the agent's result.
    back: set[str] = set()
    while time.monotonic() < restarted + GRACE - 1:
        runs = fleet.runs(task["id"])
        lost = {h: r["error"] for h, r in runs.items() if r["status"] == "lost"}
        assert not lost, (lost, fleet.server_log())
        back |= {h for h in hosts if fleet.host_status(h) == "online"}
        time.sleep(0.2)

    done = fleet.wait_task_done(task["id"], timeout=RECOVERY_TIMEOUT)
    runs = fleet.runs(task["id"])
    for host in back:
        assert (runs[host]["status"], runs[host]["stdout"]) == ("succeeded", "ok\n"), runs[host]
    if back == set(hosts):
        assert done["status"] == "succeeded", runs
    for host in hosts:
        assert executions(fleet, host, marker) == [f"done-{marker}"], host
