"""Control-plane CPU with N idle gRPC agents (heartbeats and liveness only), and its commits.

Starts a real control plane in this process (engine on SQLite, gRPC link on loopback), then N
simulated agents in ``--workers`` child processes, each agent on its own channel, speaking the
real protocol: a signed hello answering the stream's challenge, then signed heartbeats as the
welcome asks (every ``heartbeat_interval_seconds``; or, from a control plane that sets
``metrics_interval_seconds``, every that many seconds). Once all are welcomed and a warm-up
has passed, it measures this process's CPU time (all its threads: the event loop and gRPC's
own) and the database commits over ``--window`` seconds, and prints a Markdown table; the
fleet's own CPU is printed too, so that a saturated fleet is never silently the bottleneck.

Works against an older checkout too (``PYTHONPATH=/tmp/base/src``), for a before/after. Minimal
on purpose: the full swarm (``bench/swarm``) may absorb it later.

    python bench/idle_fleet.py --agents 2000 5000 [--workers 4] [--warmup 30] [--window 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Connects in flight per worker: the control plane's connect path is not what is measured.
CONNECTS_IN_FLIGHT = 100
CONNECT_DEADLINE = 600.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The fleet side (a child process) --------------------------------------------------------


async def _agent(
    address: str, name: str, welcomed: asyncio.Event, stop: asyncio.Event, drops: list[int]
) -> None:
    """One agent: connect, beat as the welcome asks; after a drop, reconnect (counted)."""
    import grpc.aio
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from opsplane.security.signing import public_key_text, sign
    from opsplane.transport.grpc import convert
    from opsplane.transport.grpc import opsplane_pb2 as pb
    from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc

    key = Ed25519PrivateKey.generate()
    challenge_key = getattr(convert, "CHALLENGE_KEY", None)
    deadline = time.monotonic() + CONNECT_DEADLINE
    while not stop.is_set() and time.monotonic() < deadline:
        channel = grpc.aio.insecure_channel(address)
        try:
            call = pb_grpc.CommandServiceStub(channel).ConnectForCommands()
            fields: dict[str, Any] = {}
            if challenge_key is not None:
                metadata = await asyncio.wait_for(call.initial_metadata(), 30)
                fields["challenge"] = str((metadata or {}).get(challenge_key) or "")
            hello = pb.Hello(
                hostname=name,
                groups=["bench"],
                public_key=public_key_text(key.public_key()),
                timestamp=time.time(),
                **fields,
            )
            hello.signature = sign(key, convert.hello_claims(hello))
            await call.write(pb.CommandMessage(hello=hello))
            first = await asyncio.wait_for(call.read(), 30)
            if not isinstance(first, pb.CommandMessage) or not first.HasField("welcome"):
                raise ConnectionError("no welcome")
            interval = float(first.welcome.heartbeat_interval_seconds or 10)
            every = float(getattr(first.welcome, "metrics_interval_seconds", 0) or 0) or interval
            welcomed.set()
            # Beats at random phases, as a real fleet's; figures that do not move.
            await asyncio.sleep(random.uniform(0, every))
            while not stop.is_set():
                beat = pb.Heartbeat(
                    hostname=name, status="online", timestamp=time.time(),
                    cpu_usage=5.0, memory_usage=30.0, load=0.1, disk_usage=40.0,
                )  # fmt: skip
                beat.signature = sign(key, convert.signed_fields(beat))
                await call.write(pb.CommandMessage(heartbeat=beat))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)
            call.cancel()
            return
        except (
            grpc.aio.AioRpcError,
            grpc.aio.UsageError,
            asyncio.InvalidStateError,
            TimeoutError,
            ConnectionError,
        ):
            if welcomed.is_set():
                drops[0] += 1
            await asyncio.sleep(random.uniform(0.5, 3.0))
        finally:
            await channel.close()


async def _fleet(address: str, names: list[str]) -> None:
    """Connect ``names`` (bounded in flight), report on stdout, run until stdin closes."""
    import resource

    stop = asyncio.Event()
    drops = [0]
    welcomed = [asyncio.Event() for _ in names]
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)

    async def one(i: int) -> None:
        async with gate:
            task = asyncio.create_task(_agent(address, names[i], welcomed[i], stop, drops))
            waiter = asyncio.ensure_future(welcomed[i].wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        await task

    agents = [asyncio.create_task(one(i)) for i in range(len(names))]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def report() -> None:
        while not stop.is_set():
            usage = resource.getrusage(resource.RUSAGE_SELF)
            line = {
                "welcomed": sum(e.is_set() for e in welcomed),
                "cpu": usage.ru_utime + usage.ru_stime,
                "drops": drops[0],
            }
            print(json.dumps(line), flush=True)
            await asyncio.sleep(1.0)

    reporter = asyncio.create_task(report())
    await reader.read()  # the parent closes stdin: stop
    stop.set()
    await asyncio.wait(agents, timeout=10)
    reporter.cancel()


# The control plane's side ------------------------------------------------------------------


class _Worker:
    def __init__(self, address: str, agents: int, first: int, step: int) -> None:
        """Agents ``idle-{first}``, ``idle-{first + step}``, … below ``agents``."""
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", address, f"{agents}:{first}:{step}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=os.environ.copy(),
        )
        self.welcomed = 0
        self.cpu = 0.0
        self.drops = 0

    async def follow(self) -> None:
        assert self.process.stdout is not None
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, self.process.stdout.readline)
            if not line:
                return
            data = json.loads(line)
            self.welcomed, self.cpu, self.drops = data["welcomed"], data["cpu"], data["drops"]

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


async def _measure(agents: int, workers: int, warmup: float, window: float) -> dict[str, Any]:
    from sqlalchemy import event

    from opsplane.app_factory import make_engine
    from opsplane.config import load_settings
    from opsplane.transport.grpc.server import GrpcLink

    with tempfile.TemporaryDirectory() as tmp:
        address = f"127.0.0.1:{_free_port()}"
        link = GrpcLink(address, heartbeat_interval=10.0)
        engine = make_engine(load_settings(data_dir=Path(tmp), require_enrollment=False), [link])
        await engine.start()
        commits = 0

        def _count(_connection: object) -> None:
            nonlocal commits
            commits += 1

        event.listen(engine.db.sync_engine, "commit", _count)
        fleet = [_Worker(address, agents, w, workers) for w in range(workers)]
        followers = [asyncio.create_task(w.follow()) for w in fleet]
        try:
            started = time.monotonic()
            while sum(w.welcomed for w in fleet) < agents:
                waited = time.monotonic() - started
                if round(waited) % 10 == 0:
                    welcomed = sum(w.welcomed for w in fleet)
                    print(f"{waited:.0f} s: {welcomed} welcomed", file=sys.stderr, flush=True)
                if waited > CONNECT_DEADLINE:
                    raise TimeoutError(f"only {sum(w.welcomed for w in fleet)} agents welcomed")
                await asyncio.sleep(1.0)
            connected_in = time.monotonic() - started
            await asyncio.sleep(warmup)
            cpu0, commits0, fleet0 = time.process_time(), commits, sum(w.cpu for w in fleet)
            drops0 = sum(w.drops for w in fleet)
            wall0 = time.monotonic()
            await asyncio.sleep(window)
            wall = time.monotonic() - wall0
            cpu = time.process_time() - cpu0
            fleet_cpu = sum(w.cpu for w in fleet) - fleet0
            return {
                "agents": agents,
                "connected_s": round(connected_in, 1),
                "window_s": round(wall, 1),
                "cp_cpu_pct": round(100 * cpu / wall, 1),
                "commits_per_s": round((commits - commits0) / wall, 1),
                "fleet_cpu_pct": round(100 * fleet_cpu / wall, 1),
                "online_at_end": len(link._streams),
                "offline_at_end": await _offline_hosts(engine),
                "drops_in_window": sum(w.drops for w in fleet) - drops0,
            }
        finally:
            event.remove(engine.db.sync_engine, "commit", _count)
            for worker in fleet:
                worker.stop()
            for follower in followers:
                follower.cancel()
            await engine.stop()


async def _offline_hosts(engine: Any) -> int:
    """Hosts offline now (an idle fleet should have none)."""
    from sqlalchemy import func, select

    from opsplane.store.tables import HostRow

    async with engine.sessions() as session:
        stmt = select(func.count()).select_from(HostRow).where(HostRow.status == "offline")
        return int((await session.execute(stmt)).scalar_one())


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        agents, first, step = (int(part) for part in sys.argv[3].split(":"))
        names = [f"idle-{i:05d}" for i in range(first, agents, step)]
        asyncio.run(_fleet(sys.argv[2], names))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[2000, 5000])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--json", action="store_true", help="one JSON object per line as well")
    args = parser.parse_args()
    rows = []
    for count in args.agents:
        row = asyncio.run(_measure(count, args.workers, args.warmup, args.window))
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        "| agents | connected in | CP CPU (% of a core) | commits/s | fleet CPU "
        "| streams at end | hosts offline at end | drops in window |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['agents']} | {r['connected_s']} s | {r['cp_cpu_pct']} | {r['commits_per_s']} "
            f"| {r['fleet_cpu_pct']} % | {r['online_at_end']} | {r['offline_at_end']} "
            f"| {r['drops_in_window']} |"
        )


if __name__ == "__main__":
    main()
