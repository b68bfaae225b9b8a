"""Process helpers for the fault tests: a control plane and agents as real processes on
loopback (tests/e2e/fleet.py), agents optionally reaching it through a TCP proxy
(tests/faults/proxy.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from tests.e2e.fleet import Fleet, wait_for
from tests.faults.proxy import TcpProxy, running_proxy

TERMINAL_RUNS = frozenset({"succeeded", "failed", "timed_out", "canceled", "undeliverable", "lost"})


class FaultFleet(Fleet):
    """A fleet with the fault tests' views of runs, spools and logs."""

    def work_dir(self, name: str) -> Path:
        return self.root / "work" / name

    def run_log(self, run_id: str) -> bytes:
        """The archived output of a run, as the API serves it."""
        with self.client() as client:
            response = client.get(f"/api/v1/runs/{run_id}/log")
        assert response.status_code == 200, response.text
        return response.content

    def all_runs(self, task_id: str) -> list[dict[str, Any]]:
        """Every run of a task, retried attempts included."""
        with self.client() as client:
            response = client.get(f"/api/v1/tasks/{task_id}/runs?output=true")
        assert response.status_code == 200, response.text
        return list(response.json()["items"])

    def events(self, task_id: str) -> list[tuple[str, dict[str, Any]]]:
        """A finished task's events (kind, data) from its SSE stream, which ends after the
        task's terminal event."""
        found: list[tuple[str, dict[str, Any]]] = []
        kind = ""
        with (
            self.client() as client,
            client.stream("GET", f"/api/v1/tasks/{task_id}/events", timeout=20.0) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    found.append((kind, json.loads(line.partition(":")[2])))
        return found

    def results_stored(self, task_id: str, run_id: str) -> int:
        """How many times a run of a finished task changed to a terminal status."""
        return sum(
            1
            for kind, data in self.events(task_id)
            if kind == "run" and data.get("run_id") == run_id and data["status"] in TERMINAL_RUNS
        )

    def spool_record(self, name: str, run_id: str) -> dict[str, Any] | None:
        """Agent ``name``'s spool record of a run not yet acknowledged, if any."""
        path = self.root / "agents" / name / "runs" / f"{run_id}.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def spool_done(self, name: str, run_id: str) -> dict[str, Any] | None:
        """Agent ``name``'s done marker of a run (acknowledged or abandoned), if any."""
        path = self.root / "agents" / name / "done" / f"{run_id}.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.client() as client:
            response = client.post("/api/v1/tasks", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def agent_log(self, name: str) -> str:
        path = self.root / f"agent-{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""


@contextlib.contextmanager
def fault_fleet(root: Path, server_env: dict[str, str] | None = None) -> Iterator[FaultFleet]:
    fleet = FaultFleet(root, server_env=dict(server_env or {}))
    try:
        fleet.start_server()
        yield fleet
    finally:
        for name in list(fleet.agents):
            end_process(fleet.agents.pop(name))
        fleet.stop()


@contextlib.contextmanager
def agent_behind_proxy(fleet: Fleet, name: str, *groups: str) -> Iterator[TcpProxy]:
    """Agent ``name`` online, dialing the control plane through a proxy the test can cut."""
    with running_proxy("127.0.0.1", fleet.grpc_port) as proxy:
        fleet.start_agent(name, *groups, server=proxy.address)
        fleet.wait_online(name, timeout=60)
        yield proxy


def end_process(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM (after SIGCONT: a stopped process cannot act on it), then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=grace)


def wait_run_status(
    fleet: Fleet, task_id: str, host: str, statuses: set[str], timeout: float = 30.0
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        run = fleet.runs(task_id).get(host)
        return run if run is not None and run["status"] in statuses else None

    return wait_for(reached, timeout, f"run of {host} in {sorted(statuses)}")


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def rss_and_fds(pid: int) -> tuple[int, int]:
    """Resident memory (bytes) and open file descriptors of a process."""
    process = psutil.Process(pid)
    return process.memory_info().rss, process.num_fds()


def sleep_until(deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
