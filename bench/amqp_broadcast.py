"""Broadcast of a trivial command over RabbitMQ: submit → every result durable.

Starts a control plane with the RabbitMQ link (SQLite, or ``--database-url``) and N opsplane
agents on the RabbitMQ link in one group, then times a group task of ``true`` (published once
on ``cmd.group.G``) from POST to the terminal SSE event, and the same against N gRPC agents in
the same run for comparison.

    python bench/amqp_broadcast.py [--agents 2] [--iterations 20] [--database-url URL]

``--bytes 1000 10000`` instead counts what one broadcast (``targets: all``) to N hosts costs the
broker, in process on a private virtual host: N hosts registered by seed-002 heartbeats, a spy
queue bound to ``cmd.#`` that takes every command published; it prints the messages published,
the body size, the bytes delivered to the N agent queues (body x N: every agent's queue is bound
to ``cmd.all``), and the time from ``create_task`` to the message at the spy. Run it with
``PYTHONPATH=<other tree>/src`` to compare two versions (it uses only APIs both have).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)


def _time_group(client: httpx.Client, group: str, iterations: int) -> list[float]:
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        task = client.post(
            "/api/v1/tasks", json={"command": "true", "targets": {"groups": [group]}}
        )
        task.raise_for_status()
        with client.stream("GET", f"/api/v1/tasks/{task.json()['id']}/events") as response:
            for line in response.iter_lines():
                if (
                    line.startswith("data:")
                    and '"progress"' in line
                    and '"status": "succeeded"' in line
                ):
                    break
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def _broadcast_bytes(hosts: int, url: str, data_dir: Path) -> tuple[int, int, float]:
    """(messages published, body bytes of the largest, seconds create_task → at the spy)."""
    import asyncio
    import json

    import aio_pika

    from opsplane.app_factory import make_engine
    from opsplane.config import load_settings
    from opsplane.domain.targeting import Targets
    from opsplane.domain.tasks import TaskRequest
    from opsplane.security.signing import load_or_create_private_key
    from opsplane.transport.amqp.link import AmqpLink

    # Heartbeats stay fresh for the whole run: the hosts need no agent behind them.
    settings = load_settings(data_dir=data_dir, heartbeat_interval=600.0, require_enrollment=False)
    key, _ = load_or_create_private_key(settings.signing_key_path)
    link = AmqpLink(url, signing_key=key, heartbeat_interval=600.0, offline_after_missed=3)
    engine = make_engine(settings, [link])
    await engine.start()
    try:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            commands = await channel.get_exchange("sys_cmd_exchange")
            spy = await channel.declare_queue(exclusive=True)
            await spy.bind(commands, "cmd.#")
            monitor = await channel.get_exchange("sys_monitor_exchange")
            suffix = uuid.uuid4().hex[:6]
            for i in range(hosts):
                beat = {
                    "hostname": f"bench-{i:05d}-{suffix}", "status": "online",
                    "timestamp": time.time(), "cpu_usage": 0.1, "memory_usage": 0.1,
                    "signature": "",
                }  # fmt: skip
                await monitor.publish(aio_pika.Message(json.dumps(beat).encode()), "heartbeat")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 600
            while loop.time() < deadline:
                _, online = await engine.hosts.list_hosts(
                    status="online", group=None, page=1, size=1
                )
                if online >= hosts:
                    break
                await asyncio.sleep(0.5)
            else:
                raise SystemExit(f"only {online} of {hosts} hosts registered")
            started = time.perf_counter()
            request = TaskRequest(command="true", targets=Targets(all=True), timeout=30)
            await engine.tasks.create_task(request)
            first: float | None = None
            count, largest = 0, 0
            quiet_until = loop.time() + 60
            while loop.time() < quiet_until:
                message = await spy.get(fail=False, no_ack=True)
                if message is None:
                    if count:
                        # Nothing more for a second after the last one: the broadcast is out.
                        quiet_until = min(quiet_until, loop.time() + 1.0)
                    await asyncio.sleep(0.05)
                    continue
                first = first or time.perf_counter() - started
                count += 1
                largest = max(largest, len(message.body))
                quiet_until = loop.time() + 1.0
        return count, largest, first or float("nan")
    finally:
        await engine.stop()


def body_bytes(sizes: list[int]) -> None:
    """The signed body of a broadcast to N hosts as the link builds it, without a broker:
    the version on PYTHONPATH decides whether it carries a per-host ``run_ids`` map."""
    import inspect
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from opsplane.domain.ids import new_id
    from opsplane.security.signing import sign
    from opsplane.transport.amqp import messages
    from opsplane.transport.base import CommandEnvelope

    key = Ed25519PrivateKey.generate()
    per_host_map = "run_ids" in inspect.signature(messages.command_body).parameters
    print(f"broadcast body as published ({'run_ids map' if per_host_map else 'no per-host map'})")
    print(f"{'hosts':>8}{'body B':>12}{'delivered B':>18}")
    for hosts in sizes:
        task_id = new_id()
        envelope = CommandEnvelope(task_id, "", 1, "true", 30)
        extra: dict[str, object] = (
            {"run_ids": {f"host-{i:05d}.example.com": new_id() for i in range(hosts)}}
            if per_host_map
            else {"fanout": True}
        )
        body = messages.command_body(envelope, time.time(), target="all", **extra)  # type: ignore[arg-type,unused-ignore]
        body["sign"] = sign(key, body)
        size = len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
        # Every agent's queue is bound to cmd.all: the broker delivers the body to each.
        print(f"{hosts:>8}{size:>12,}{size * hosts:>18,}")


def count_bytes(sizes: list[int]) -> None:
    import asyncio

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.rabbitmq import private_vhost

    print("broadcast (targets: all) to N hosts, RabbitMQ, SQLite, in process")
    header = f"{'hosts':>8}{'messages':>10}{'body B':>12}{'delivered B':>16}{'publish s':>11}"
    print(header)
    for hosts in sizes:
        with private_vhost("opsplane-bench") as vhost, tempfile.TemporaryDirectory() as tmp:
            count, body, seconds = asyncio.run(_broadcast_bytes(hosts, vhost.url, Path(tmp)))
        # One fan-out message reaches every agent's queue; unicast ones reach one each.
        delivered = body * hosts if count == 1 else body * count
        print(f"{hosts:>8}{count:>10}{body:>12,}{delivered:>16,}{seconds:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--bytes", type=int, nargs="+", default=None, metavar="HOSTS")
    parser.add_argument("--body-bytes", type=int, nargs="+", default=None, metavar="HOSTS")
    args = parser.parse_args()
    if args.body_bytes:
        body_bytes(args.body_bytes)
        return
    if args.bytes:
        count_bytes(args.bytes)
        return
    token = f"bench-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "OPSPLANE_BOOTSTRAP_ADMIN_TOKEN": token,
        "OPSPLANE_HEARTBEAT_INTERVAL": "2",
        # The bench's agents do not enroll: it measures the broker path, not enrollment.
        "OPSPLANE_REQUIRE_ENROLLMENT": "false",
    }
    http, grpc = _free_port(), _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        server = [
            sys.executable, "-m", "opsplane", "server", "--listen", f"127.0.0.1:{http}",
            "--grpc-listen", f"127.0.0.1:{grpc}", "--data-dir", str(data), "--amqp-url", AMQP_URL,
        ]  # fmt: skip
        if args.database_url:
            server += ["--database-url", args.database_url]
        processes.append(_spawn(server, env, root / "server.log"))
        try:
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(
                base_url=f"http://127.0.0.1:{http}", timeout=30, headers=headers
            ) as client:
                for _ in range(300):
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.1)
                suffix = uuid.uuid4().hex[:6]
                key = data / "keys" / "control-plane.pub"
                for i in range(args.agents):
                    for link in ("amqp", "grpc"):
                        name = f"{link}-{i}-{suffix}"
                        argv = [
                            sys.executable, "-m", "opsplane", "agent", "--name", name,
                            "--group", f"{link}-{suffix}", "--state-dir", str(root / name),
                        ]  # fmt: skip
                        if link == "amqp":
                            argv += ["--amqp-url", AMQP_URL, "--control-plane-key", str(key),
                                     "--heartbeat-interval", "2"]  # fmt: skip
                        else:
                            argv += ["--server", f"127.0.0.1:{grpc}"]
                        processes.append(_spawn(argv, env, root / f"{name}.log"))
                for _ in range(600):
                    online = client.get("/api/v1/fleet/summary").json()["online"]
                    if online >= 2 * args.agents:
                        break
                    time.sleep(0.1)
                rows = [(link, _time_group(client, f"{link}-{suffix}", args.iterations))
                        for link in ("amqp", "grpc")]  # fmt: skip
        finally:
            for process in reversed(processes):
                process.send_signal(signal.SIGINT)
            for process in processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
    base = statistics.median(rows[1][1])
    print(f"group task of `true` to {args.agents} agents, {args.iterations} iterations (ms)")
    print(f"{'link':<12}{'median':>10}{'p95':>10}{'x grpc':>10}")
    for link, samples in rows:
        ordered = sorted(samples)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        median = statistics.median(samples)
        print(f"{link:<12}{median:>10.1f}{p95:>10.1f}{median / base:>10.2f}")


if __name__ == "__main__":
    main()
