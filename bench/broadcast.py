"""Broadcast ``true`` to N simulated gRPC agents: submit latency, submit → all runs terminal and
committed, SQL statements per broadcast, control-plane CPU; and sustained throughput of many
small tasks over a few agents.

The control plane runs in this process (engine on SQLite, the gRPC link with a signing key, so
commands are signed as in production); the simulated agents run in a child process (so their
CPU is not the control plane's), sharing a few channels, one ``ConnectForCommands`` stream each.
An agent answers every command at once with a succeeded result, as if ``true`` had run; it
does not verify the signature (the agent's own cost is not measured here).

    python bench/broadcast.py [--agents 2000] [--broadcasts 3] [--tasks 0]

Minimal on purpose: the full swarm (real signatures both ways, heartbeats, RabbitMQ) is
``bench/swarm``; this one isolates the fan-out path for profiling (run under py-spy).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc.aio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import event

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.server import GrpcLink

STREAMS_PER_CHANNEL = 100


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The simulated fleet (child process) ------------------------------------------------------


async def _agent(channel: grpc.aio.Channel, name: str, stop: asyncio.Event) -> None:
    call = pb_grpc.CommandServiceStub(channel).ConnectForCommands()
    await call.write(pb.CommandMessage(hello=pb.Hello(hostname=name, groups=["bench"])))
    while not stop.is_set():
        message = await call.read()
        if not isinstance(message, pb.CommandMessage):
            return
        if message.HasField("command_content"):
            cmd = message.command_content
            now = time.time()
            result = pb.CommandResult(
                task_id=cmd.task_id,
                run_id=cmd.run_id,
                attempt=cmd.attempt,
                status="succeeded",
                exit_code=0,
                started_at=now,
                finished_at=now,
            )
            await call.write(pb.CommandMessage(command_result=result))


async def _fleet(address: str, count: int) -> None:
    stop = asyncio.Event()
    channels = [grpc.aio.insecure_channel(address) for _ in range(0, count, STREAMS_PER_CHANNEL)]
    agents = []
    for i in range(count):
        channel = channels[i // STREAMS_PER_CHANNEL]
        agents.append(asyncio.create_task(_agent(channel, f"bench-{i:05d}", stop)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)  # no connect storm: that is another helper's bench
    await asyncio.gather(*agents, return_exceptions=True)


def _fleet_process(address: str, count: int) -> None:
    asyncio.run(_fleet(address, count))


# The control plane (this process) ---------------------------------------------------------


class _Statements:
    """Counts SQL statements by their first word (INSERT, UPDATE, SELECT…)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, *args: Any) -> None:
        statement = str(args[2]).lstrip().split(None, 1)[0].upper()
        self.counts[statement] = self.counts.get(statement, 0) + 1

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


async def _broadcast(engine: Engine, name: str) -> tuple[float, float, float]:
    start = time.perf_counter()
    cpu = _cpu()
    task = await engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(all=True), timeout=60, name=name)
    )
    submitted = time.perf_counter() - start
    async with asyncio.timeout(300):
        done = await engine.wait_task(task.id)
    total = time.perf_counter() - start
    assert done.status == "succeeded", (done.status, done.counts)
    return submitted, total, _cpu() - cpu


async def _throughput(engine: Engine, hosts: list[str], tasks: int, parallel: int) -> float:
    """Runs per second: ``tasks`` one-host tasks, ``parallel`` in flight at a time."""
    slots = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with slots:
            task = await engine.tasks.create_task(
                TaskRequest(
                    command="true",
                    targets=Targets(hosts=(hosts[i % len(hosts)],)),
                    timeout=60,
                    name="tp",
                )
            )
            async with asyncio.timeout(120):
                await engine.wait_task(task.id)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(tasks)))
    return tasks / (time.perf_counter() - start)


async def main(agents: int, broadcasts: int, tasks: int, pause: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        address = f"127.0.0.1:{_free_port()}"
        # The simulated agents send no heartbeats: a long interval keeps the monitor from
        # judging them silent during the bench (liveness is another helper's bench).
        key = Ed25519PrivateKey.generate()
        link = GrpcLink(address, heartbeat_interval=3600.0, signing_key=key)
        settings = load_settings(
            data_dir=Path(tmp), require_enrollment=False, heartbeat_interval=3600.0
        )
        engine = make_engine(settings, [link])
        await engine.start()
        statements = _Statements()
        event.listen(engine.db.sync_engine, "before_cursor_execute", statements)
        fleet = multiprocessing.get_context("spawn").Process(
            target=_fleet_process, args=(address, agents), daemon=True
        )
        fleet.start()
        try:
            deadline = time.monotonic() + 600
            names = [f"bench-{i:05d}" for i in range(agents)]
            while (online := sum(map(link.is_connected, names))) < agents:
                if time.monotonic() > deadline or not fleet.is_alive():
                    raise SystemExit(f"the fleet did not come online in 600 s ({online} online)")
                await asyncio.sleep(0.5)
            print(f"{agents} agents online; python {sys.version.split()[0]}", flush=True)
            await asyncio.sleep(pause)  # time to attach a profiler: py-spy record --pid
            print("| broadcast | submit s | submit → all terminal s | CP CPU s | statements |")
            print("|---|---|---|---|---|")
            totals = []
            for i in range(broadcasts):
                statements.take()
                submitted, total, cpu = await _broadcast(engine, f"bcast-{i}")
                totals.append(total)
                counts = statements.take()
                shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                print(f"| {i + 1} | {submitted:.2f} | {total:.2f} | {cpu:.2f} | {shown} |")
            print(f"median submit → all terminal: {statistics.median(totals):.2f} s")
            if tasks:
                hosts = [f"bench-{i:05d}" for i in range(min(agents, 100))]
                rate = await _throughput(engine, hosts, tasks, parallel=200)
                print(f"throughput: {tasks} one-host tasks over {len(hosts)} agents: "
                      f"{rate:.0f} runs/s")  # fmt: skip
        finally:
            fleet.kill()
            await engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--broadcasts", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to wait once online")
    args = parser.parse_args()
    asyncio.run(main(args.agents, args.broadcasts, args.tasks, args.pause))
