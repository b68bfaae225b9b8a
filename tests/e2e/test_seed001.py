"""Seed 001 with a real control plane and a real gRPC agent (issue 16 item 9): parameters reach
the command as environment variables, and a run whose agent never reports is ended by the
control plane's own timeout clock, with a cancel sent to the agent."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.fleet import Fleet, running_fleet, wait_for

AGENT = "s1-1"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server_env = {
        "OPSPLANE_TIMEOUT_GRACE": "1",
        # A stopped agent must not be dropped as silent or have its runs lost first: the
        # timeout clock is what this test watches.
        "OPSPLANE_OFFLINE_AFTER_MISSED": "60",
        "OPSPLANE_LOST_GRACE": "60",
    }
    with running_fleet(tmp_path_factory.mktemp("seed001"), {AGENT: ("s1",)}, server_env) as f:
        yield f


def _create(fleet: Fleet, body: dict[str, Any]) -> dict[str, Any]:
    with fleet.client() as client:
        answer = client.post("/api/v1/tasks", json=body)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def test_parameters_reach_a_real_agents_command(fleet: Fleet) -> None:
    task = _create(
        fleet,
        {
            "name": "seed001-params",
            "command": 'echo "x=$PARAM_X"; echo "$PARAMS_JSON"',
            "targets": {"hosts": [AGENT]},
            "timeout": 30,
            "parameters": {"x": "$(touch /tmp/never) `id`", "n": 2},
        },
    )
    done = fleet.wait_task_done(task["id"])
    assert done["status"] == "succeeded"
    assert (done["completed_hosts"], done["failed_hosts"], done["total_hosts"]) == (1, 0, 1)
    run = fleet.runs(task["id"])[AGENT]
    assert run["stdout"] == 'x=$(touch /tmp/never) `id`\n{"x":"$(touch /tmp/never) `id`","n":2}\n'
    with fleet.client() as client:
        bad = client.post(
            "/api/v1/tasks",
            json={"command": "true", "targets": {"hosts": [AGENT]}, "parameters": {"a-b": "1"}},
        )
    assert bad.status_code == 422 and "a-b" in bad.text


def test_a_run_whose_agent_never_reports_ends_timed_out_and_is_canceled(fleet: Fleet) -> None:
    task = _create(
        fleet,
        {"command": "sleep 60", "targets": {"hosts": [AGENT]}, "timeout": 3},
    )
    wait_for(lambda: fleet.runs(task["id"])[AGENT]["status"] == "running", 15, "the run to start")
    agent = fleet.agents[AGENT]
    # Frozen: the agent can neither kill the command at its timeout nor report.
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        # 3 s timeout + 1 s grace after the start; bounded generously for a loaded machine.
        run = wait_for(
            lambda: (r := fleet.runs(task["id"])[AGENT])["status"] != "running" and r,
            20,
            "the control plane to end the run",
        )
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    assert run["status"] == "timed_out", run
    assert "3s + 1s after the command started" in run["error"]
    done = fleet.wait_task_done(task["id"])
    assert done["status"] == "failed" and done["failed_hosts"] == 1
    # The cancel reached the agent once it ran again (the agent may have ended the run on its
    # own timeout first and then ignored the cancel); its late result changes nothing.
    log = fleet.root / f"agent-{AGENT}.log"
    received = (f"cancelling run {run['id']}", f"cancel for run {run['id']}")
    wait_for(
        lambda: any(line in log.read_text() for line in received),
        15,
        "the agent to receive the cancel",
    )
    assert fleet.runs(task["id"])[AGENT]["status"] == "timed_out"
