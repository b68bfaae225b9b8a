"""An opsplane control plane and local agents as real processes, for the side-by-side figures.

The server runs ``opsplane server`` on SQLite in the run's directory with free loopback
ports; agents are ``opsplane agent`` processes on the gRPC link, not enrolled (the bench
measures the command path, not enrollment).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.suite.common import HOST, Processes, free_port, project_python, wait_until

TOKEN = "ops_bench-run-bootstrap-admin-token-0123456789"
TERMINAL = frozenset({"succeeded", "failed", "canceled", "timed_out"})


@dataclass
class ControlPlane:
    root: Path
    processes: Processes
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of the server and of every CLI call against it."""
        return {
            **os.environ,
            "OPSPLANE_URL": self.url,
            "OPSPLANE_TOKEN": TOKEN,
            "OPSPLANE_BOOTSTRAP_ADMIN_TOKEN": TOKEN,
            "OPSPLANE_REQUIRE_ENROLLMENT": "false",
            **self.extra_env,
        }

    def start(self) -> None:
        argv = [
            project_python(), "-m", "opsplane", "server",
            "--listen", f"{HOST}:{self.http_port}", "--grpc-listen", f"{HOST}:{self.grpc_port}",
            "--data-dir", str(self.root / "data"),
        ]  # fmt: skip
        self.server = self.processes.spawn(argv, self.root / "server.log", env=self.env)
        with self.client() as client:
            wait_until(
                "control plane /readyz",
                lambda: client.get("/readyz").status_code == 200,
                timeout=90,
            )

    def client(self, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def start_agents(self, names: list[str], group: str) -> list[Any]:
        started = []
        for name in names:
            argv = [
                project_python(), "-m", "opsplane", "agent", "--name", name, "--group", group,
                "--state-dir", str(self.root / "agents" / name), "--server",
                f"{HOST}:{self.grpc_port}",
            ]  # fmt: skip
            started.append(
                self.processes.spawn(argv, self.root / "agents" / f"{name}.log", env=self.env)
            )
        return started

    def online_in_group(self, client: httpx.Client, group: str) -> int:
        answer = client.get("/api/v1/hosts", params={"group": group, "status": "online"})
        answer.raise_for_status()
        return int(answer.json()["total"])

    def wait_online(self, group: str, count: int, timeout: float) -> float:
        """Seconds until ``count`` hosts of ``group`` are online."""
        with self.client() as client:
            return wait_until(
                f"{count} opsplane agents of {group} online",
                lambda: self.online_in_group(client, group) >= count,
                timeout=timeout,
            )


def submit(client: httpx.Client, command: str, targets: dict[str, Any]) -> str:
    answer = client.post("/api/v1/tasks", json={"command": command, "targets": targets})
    if answer.status_code != 201:
        raise RuntimeError(f"POST /api/v1/tasks: {answer.status_code} {answer.text[:300]}")
    return str(answer.json()["id"])


def events(client: httpx.Client, task_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The task's SSE events (kind, data) until its terminal ``task`` event, inclusive."""
    kind = ""
    with client.stream("GET", f"/api/v1/tasks/{task_id}/events") as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                yield kind, data
                if kind == "task" and data.get("status") in TERMINAL:
                    return


def run_to_end(client: httpx.Client, command: str, targets: dict[str, Any]) -> dict[str, Any]:
    """POST a task and follow its stream to the terminal event; that event's data."""
    task_id = submit(client, command, targets)
    for kind, data in events(client, task_id):
        if kind == "task" and data.get("status") in TERMINAL:
            if data["status"] != "succeeded":
                raise RuntimeError(f"task {task_id} ended {data['status']}: {data}")
            return data
    raise RuntimeError(f"task {task_id}: the event stream ended without a terminal event")


def timed_cli(plane: ControlPlane, argv: list[str]) -> float:
    import subprocess

    started = time.perf_counter()
    done = subprocess.run(
        [project_python(), "-m", "opsplane", *argv],
        env=plane.env, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        what = " ".join(argv)
        raise RuntimeError(f"opsplane {what}: rc {done.returncode} {done.stderr[-500:]!r}")
    return seconds
