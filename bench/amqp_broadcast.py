"""Broadcast of a trivial command over RabbitMQ: submit → every result durable.

Starts a control plane with the RabbitMQ link (SQLite, or ``--database-url``) and N opsplane
agents on the RabbitMQ link in one group, then times a group task of ``true`` (published once
on ``cmd.group.G``) from POST to the terminal SSE event, and the same against N gRPC agents in
the same run for comparison.

    python bench/amqp_broadcast.py [--agents 2] [--iterations 20] [--database-url URL]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
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
