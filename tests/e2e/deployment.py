"""The reference deployment of docs/deployment.md on loopback, for e2e tests: ``opsplane
server`` instances on one database and one RabbitMQ vhost, HAProxy in front of them (TCP for
gRPC, HTTP for the API and SSE), every port chosen at run time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.auth import ADMIN_TOKEN
from tests.e2e.fleet import child_env, free_port

T = TypeVar("T")
TERMINAL_RUNS = {"succeeded", "failed", "canceled", "timed_out", "lost", "undeliverable"}
TERMINAL_TASKS = {"succeeded", "failed", "canceled", "timed_out"}


async def until(
    probe: Callable[[], Awaitable[T | None]], within: float, what: str, every: float = 0.1
) -> T:
    """Await ``probe`` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + within
    last: T | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = await probe()
            if last:
                return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {within}s waiting for {what} (last: {last!r})")


def admin(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url, timeout=30.0, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )


@dataclass
class Instance:
    """One ``opsplane server`` process of the deployment."""

    name: str
    root: Path
    database_url: str
    amqp_url: str
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def data_dir(self) -> Path:
        return self.root / self.name

    @property
    def log(self) -> Path:
        return self.root / f"server-{self.name}.log"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = child_env(OPSPLANE_REQUIRE_ENROLLMENT="false")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "opsplane", "server",
                    "--listen", f"127.0.0.1:{self.http_port}", "--grpc-listen", self.grpc,
                    "--data-dir", str(self.data_dir), "--database-url", self.database_url,
                    "--amqp-url", self.amqp_url,
                ],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    async def start(self) -> None:
        self.spawn()
        async with httpx.AsyncClient(base_url=self.url, timeout=5.0) as client:

            async def ready() -> bool:
                assert self.process is not None
                assert self.process.poll() is None, self.log_tail()
                return (await client.get("/readyz")).status_code == 200

            await until(ready, 120, f"instance {self.name} to be ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert os.access(found, os.X_OK), "haproxy is not installed"
    return found


def haproxy_config(
    grpc_port: int, http_port: int, stats_port: int, instances: list[Instance]
) -> str:
    """docs/deployment.md's configuration on the given ports (keep the two alike), with
    faster health checks (1 s) and a file limit this machine allows."""
    grpc_servers = "\n".join(
        f"    server {i.name} {i.grpc} check port {i.http_port}" for i in instances
    )
    http_servers = "\n".join(
        f"    server {i.name} 127.0.0.1:{i.http_port} check" for i in instances
    )
    return f"""\
global
    maxconn 4000

defaults
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s
    timeout http-keep-alive 10s
    retries 3
    option redispatch

frontend grpc_in
    mode tcp
    bind 127.0.0.1:{grpc_port}
    default_backend grpc_instances

backend grpc_instances
    mode tcp
    balance leastconn
    option httpchk GET /readyz
    default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions
{grpc_servers}

frontend api_in
    mode http
    bind 127.0.0.1:{http_port}
    option forwardfor
    default_backend api_instances

backend api_instances
    mode http
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{http_servers}

listen stats
    mode http
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /
"""


@dataclass
class HAProxy:
    root: Path
    instances: list[Instance]
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    stats_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def servers_up(self, within: float = 60) -> None:
        """Until HAProxy's checks count every instance up in both backends (a check that
        failed on a loaded machine marks an instance down for a while)."""
        want = {(b, i.name) for b in ("grpc_instances", "api_instances") for i in self.instances}

        async def up() -> bool:
            async with httpx.AsyncClient(timeout=5.0) as client:
                csv = (await client.get(f"http://127.0.0.1:{self.stats_port}/;csv")).text
            rows = {tuple(line.split(",")[:2]): line.split(",")[17] for line in csv.splitlines()}
            return all(rows.get(key, "").startswith("UP") for key in want)

        await until(up, within, "HAProxy to count every instance up")

    def spawn(self) -> None:
        config = self.root / "haproxy.cfg"
        config.write_text(
            haproxy_config(self.grpc_port, self.http_port, self.stats_port, self.instances)
        )
        binary = haproxy_binary()
        checked = subprocess.run(
            [binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with (self.root / "haproxy.log").open("ab") as log:
            # -db: in the foreground, not daemonized, so that it is our child to stop.
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
            )

    async def start(self) -> None:
        self.spawn()
        async with admin(self.url) as client:

            async def ready() -> bool:
                assert self.process is not None and self.process.poll() is None
                return (await client.get("/readyz")).status_code == 200

            await until(ready, 30, "HAProxy to serve the API")
        await self.servers_up()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@contextlib.asynccontextmanager
async def deployment(
    root: Path, database_url: str, amqp_url: str, names: tuple[str, ...] = ("a", "b")
) -> AsyncIterator[tuple[list[Instance], HAProxy]]:
    """The instances and HAProxy, started; the command-signing and secrets keys made by the
    first instance and copied to the others before they start (docs/deployment.md)."""
    instances = [Instance(name, root, database_url, amqp_url) for name in names]
    proxy = HAProxy(root, instances)
    try:
        first, *others = instances
        await first.start()
        for other in others:
            shutil.copytree(first.data_dir / "keys", other.data_dir / "keys")
            await other.start()
        await proxy.start()
        yield instances, proxy
    finally:
        proxy.stop()
        for instance in instances:
            instance.stop()


@contextlib.asynccontextmanager
async def database(url: str) -> AsyncIterator[Callable[[str], Awaitable[list[tuple[object, ...]]]]]:
    """A reader of the shared database, for what the API does not show (which instance holds
    which agent's stream)."""
    engine = create_async_engine(url)

    async def query(sql: str) -> list[tuple[object, ...]]:
        async with engine.connect() as connection:
            return [tuple(row) for row in (await connection.execute(text(sql))).all()]

    try:
        yield query
    finally:
        await engine.dispose()


async def online_by_pid(
    query: Callable[[str], Awaitable[list[tuple[object, ...]]]], prefix: str
) -> dict[int, int]:
    """How many hosts named ``prefix…`` are online, by the pid of the instance holding their
    stream (an instance's name is ``host:pid:random``)."""
    rows = await query(
        "SELECT instance, COUNT(*) FROM hosts "
        f"WHERE status = 'online' AND name LIKE '{prefix}%' GROUP BY instance"
    )
    counts: dict[int, int] = {}
    for instance, n in rows:
        pid = int(str(instance).split(":")[1]) if instance else 0
        counts[pid] = counts.get(pid, 0) + int(str(n))
    return counts
