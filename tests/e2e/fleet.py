"""A real control plane and real agents, as separate processes on loopback, for e2e tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn

from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(app: Any, port: int) -> AsyncIterator[None]:
    """``app`` served by uvicorn on ``127.0.0.1:port`` in this event loop (its lifespan run),
    from once it accepts connections until the block ends."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="on", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                assert not task.done(), "the server did not start"
                await asyncio.sleep(0.02)
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 15.0, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPLANE_")}
    env.update(
        OPSPLANE_HEARTBEAT_INTERVAL="1",
        OPSPLANE_LOST_GRACE="3",
        # Every test control plane starts with this admin token (Fleet.client() sends it).
        OPSPLANE_BOOTSTRAP_ADMIN_TOKEN=ADMIN_TOKEN,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Fleet:
    root: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    server: subprocess.Popen[bytes] | None = None
    # Settings for this fleet's control plane beyond child_env()'s (OPSPLANE_* variables). The
    # fleet's agents do not enroll (tests/e2e/test_enrollment.py covers enrollment), so the
    # control plane accepts agents that never enrolled unless a test asks otherwise.
    server_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server_env = {"OPSPLANE_REQUIRE_ENROLLMENT": "false", **self.server_env}

    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def client(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        """A client of the API, authenticated as the bootstrap admin (or with ``token``;
        None: anonymous)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, timeout=10.0, headers=headers)

    @property
    def auth_headers(self) -> dict[str, str]:
        return dict(ADMIN_HEADERS)

    def start_server(self, *extra_args: str) -> None:
        with (self.root / "server.log").open("ab") as log:
            self.server = subprocess.Popen(
            [
                    sys.executable, "-m", "opsplane", "server",
                    "--listen", f"127.0.0.1:{self.http_port}",
                    "--grpc-listen", self.grpc,
                    "--data-dir", str(self.data_dir),
                    *extra_args,
                ],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(**self.server_env),
            )  # fmt: skip
        with self.client() as client:

            def ready() -> bool:
                assert self.server is not None and self.server.poll() is None, self.server_log()
                with contextlib.suppress(httpx.HTTPError):
                    return client.get("/readyz").status_code == 200
                return False

            wait_for(ready, 30, "the control plane to be ready")

    def start_agent(
        self,
        name: str,
        *groups: str,
        workdir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        server: str | None = None,
        env: dict[str, str] | None = None,
        wrap: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:
        """Start an agent dialing the control plane (or ``server``: a proxy in between), with
        ``env`` added to its environment, its command line after ``wrap`` (which must exec
        it)."""
        cwd = workdir or (self.root / "work" / name)
        cwd.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "opsplane", "agent",
            "--server", server or self.grpc, "--name", name,
            "--state-dir", str(self.root / "agents" / name),
        ]  # fmt: skip
        for group in groups:
            argv += ["--group", group]
        argv = [*wrap, *argv, *extra_args]
        with (self.root / f"agent-{name}.log").open("ab") as log:
            process = subprocess.Popen(
                argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=child_env(**(env or {}))
            )
        self.agents[name] = process
        return process

    def amqp_agent_args(self, amqp_url: str) -> tuple[str, ...]:
        """The arguments of an agent on RabbitMQ at ``amqp_url`` that trusts this control
        plane's signing key."""
        key = self.data_dir / "keys" / "control-plane.pub"
        return (
            "--amqp-url",
            amqp_url,
            "--control-plane-key",
            str(key),
            "--heartbeat-interval",
            "1",
        )

    def start_amqp_agent(self, name: str, amqp_url: str, *groups: str) -> subprocess.Popen[bytes]:
        """Start an agent on RabbitMQ at ``amqp_url`` (a broker, or a proxy in front of it)."""
        return self.start_agent(name, *groups, extra_args=self.amqp_agent_args(amqp_url))

    def host(self, name: str) -> dict[str, Any] | None:
        """The host as the API shows it; None while unknown or while the API is not up."""
        try:
            with self.client() as client:
                response = client.get(f"/api/v1/hosts/{name}")
        except httpx.TransportError:
            return None
        return response.json() if response.status_code == 200 else None

    def host_status(self, name: str) -> str | None:
        host = self.host(name)
        return None if host is None else str(host["status"])

    def wait_online(self, *names: str, timeout: float = 20.0) -> None:
        for name in names:
            wait_for(lambda n=name: self.host_status(n) == "online", timeout, f"{name} online")  # type: ignore[misc]

    def wait_offline(self, name: str, timeout: float = 20.0) -> None:
        wait_for(lambda: self.host_status(name) == "offline", timeout, f"{name} offline")

    def stop_agent(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.agents.pop(name)
        if process.poll() is None:
            process.send_signal(sig)
        process.wait(timeout=20)

    def create_task(
        self, command: str, timeout: int | None = None, **targets: Any
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"command": command, "targets": targets}
        if timeout is not None:
            body["timeout"] = timeout
        with self.client() as client:
            response = client.post("/api/v1/tasks", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def task(self, task_id: str) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.get(f"/api/v1/tasks/{task_id}").json())

    def runs(self, task_id: str) -> dict[str, dict[str, Any]]:
        with self.client() as client:
            items = client.get(f"/api/v1/tasks/{task_id}/runs?output=true").json()["items"]
        return {run["host"]: run for run in items}

    def wait_task_done(self, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
        terminal = {"succeeded", "failed", "canceled", "timed_out"}

        def ended() -> dict[str, Any] | None:
            task = self.task(task_id)
            return task if task["status"] in terminal else None

        return wait_for(ended, timeout, f"task {task_id} to end")

    def server_log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def stop(self) -> None:
        for name in list(self.agents):
            with contextlib.suppress(Exception):
                self.stop_agent(name)
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)
            try:
                self.server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


@contextlib.contextmanager
def running_fleet(
    root: Path, agents: dict[str, tuple[str, ...]], server_env: dict[str, str] | None = None
) -> Iterator[Fleet]:
    fleet = Fleet(root, server_env=dict(server_env or {}))
    try:
        fleet.start_server()
        for name, groups in agents.items():
            fleet.start_agent(name, *groups)
        fleet.wait_online(*agents)
        yield fleet
    finally:
        fleet.stop()
