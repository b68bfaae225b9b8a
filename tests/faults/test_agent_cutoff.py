"""Issue 13, fault scenario 4: an agent cut off without a FIN — its process stopped with
SIGSTOP, or its connection black-holed by a TCP proxy that stops forwarding but closes
nothing — goes offline within three heartbeat intervals; its run becomes ``lost`` (never
``succeeded``) after the grace period and is retried; when the agent comes back (SIGCONT, or
the proxy forwards again) its late result and output for the lost attempt change nothing:
the lost run stays lost and its log keeps only what came before it was given up
(docs/reliability.md), while the retry runs and decides the task.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import wait_for
from tests.faults.agents import FaultFleet, agent_behind_proxy, fault_fleet

HEARTBEAT = 1.0  # tests/e2e/fleet.py child_env: OPSPLANE_HEARTBEAT_INTERVAL
GRACE = 3.0
MISSED = 3  # offline_after_missed, the default
# The monitor looks every quarter interval; the API poll and a loaded machine add a little.
SLACK = 2.0


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FaultFleet]:
    env = {"OPSPLANE_LOST_GRACE": str(GRACE), "OPSPLANE_OFFLINE_AFTER_MISSED": str(MISSED)}
    with fault_fleet(tmp_path, env) as the_fleet:
        yield the_fleet


def _attempts(fleet: FaultFleet, task_id: str) -> dict[int, dict[str, Any]]:
    return {run["attempt"]: run for run in fleet.all_runs(task_id)}


@pytest.mark.parametrize("cut", ["sigstop", "black-hole proxy"])
def test_an_agent_cut_off_without_a_fin_is_offline_its_run_lost_and_a_late_result_ignored(
    fleet: FaultFleet, cut: str
) -> None:
    name = "cut-" + ("stop" if cut == "sigstop" else "proxy")
    with agent_behind_proxy(fleet, name) as proxy:
        process = fleet.agents[name]
        marker = uuid.uuid4().hex[:8]
        task = fleet.create(
            {
                "command": f"echo early-{marker}; sleep 2; echo late-{marker}",
                "targets": {"hosts": [name]},
                # The retry waits for the host to be back, then runs there.
                "retries": {"max_attempts": 2, "on": ["lost"]},
                "delivery_deadline": 120,
            }
        )
        wait_for(
            lambda: _attempts(fleet, task["id"]).get(1, {}).get("status") == "running",
            20,
            "attempt 1 running",
        )
        first = _attempts(fleet, task["id"])[1]
        wait_for(lambda: fleet.run_log(first["id"]), 10, "the early output")
        cut_at = time.monotonic()
        if cut == "sigstop":
            os.kill(process.pid, signal.SIGSTOP)
        else:
            proxy.pause()
        wait_for(lambda: fleet.host_status(name) == "offline", 20, f"{name} offline")
        offline_after = time.monotonic() - cut_at
        wait_for(lambda: _attempts(fleet, task["id"])[1]["status"] == "lost", 20, "attempt 1 lost")
        lost_after = time.monotonic() - cut_at
        wait_for(lambda: 2 in _attempts(fleet, task["id"]), 20, "the retry")
        time.sleep(2.5)  # attempt 1's command ends meanwhile; its agent cannot tell anyone yet
        back_at = time.monotonic()
        if cut == "sigstop":
            os.kill(process.pid, signal.SIGCONT)
        else:
            proxy.resume()
        done = fleet.wait_task_done(task["id"], timeout=60)
        recovered = time.monotonic() - back_at
        runs = _attempts(fleet, task["id"])
        print(f"\n{cut}: offline after {offline_after:.1f}s, lost after {lost_after:.1f}s, "
              f"task done {recovered:.1f}s after the agent came back")  # fmt: skip
        assert offline_after <= MISSED * HEARTBEAT + SLACK
        assert (runs[1]["status"], runs[2]["status"], done["status"]) == (
            "lost",
            "succeeded",
            "succeeded",
        ), runs
        # The late result of attempt 1 was delivered (its agent got an ack and forgot it)...
        wait_for(lambda: fleet.spool_done(name, runs[1]["id"]), 20, "attempt 1 acknowledged")
        # ...and changed nothing: never succeeded, and its log ends where it was given up.
        statuses = [
            data["status"]
            for kind, data in fleet.events(task["id"])
            if kind == "run" and data["run_id"] == runs[1]["id"]
        ]
        assert "succeeded" not in statuses and statuses[-1] == "lost", statuses
        assert fleet.runs(task["id"])[name]["id"] == runs[2]["id"]
        assert fleet.run_log(runs[1]["id"]) == f"early-{marker}\n".encode()
        assert fleet.run_log(runs[2]["id"]) == f"early-{marker}\nlate-{marker}\n".encode()
