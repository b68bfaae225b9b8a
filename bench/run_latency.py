"""Submit → every result durable, for a trivial command on the three demo agents.

Starts ``opsplane demo`` on free loopback ports in a temporary data directory, then measures:
- API: POST /api/v1/tasks → terminal ``task`` event on the SSE stream (client-side wall time);
- server: the task's ``finished_at - created_at`` (all three results committed);
- CLI: the whole ``opsplane run --all -- true`` process, Python start-up included;
- floor: three local ``sh -c true`` processes in parallel, the least any tool can do.
Prints a table of medians and p95 and the ratio to the floor.

    python bench/run_latency.py [--iterations 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

# The demo creates this admin token at start (OPSPLANE_BOOTSTRAP_ADMIN_TOKEN); the bench's
# client and CLI runs send it.
TOKEN = "ops_bench-bootstrap-admin-token-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("timed out waiting for the demo")


def _follow_to_end(client: httpx.Client, task_id: str) -> None:
    with client.stream("GET", f"/api/v1/tasks/{task_id}/events") as response:
        for line in response.iter_lines():
            if (
                line.startswith("data:")
                and '"status": "succeeded"' in line
                and '"progress"' in line
            ):
                return


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    http, grpc = _free_port(), _free_port()
    url = f"http://127.0.0.1:{http}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "OPSPLANE_URL": url,
            "OPSPLANE_TOKEN": TOKEN,
            "OPSPLANE_BOOTSTRAP_ADMIN_TOKEN": TOKEN,
        }
        demo = subprocess.Popen(
            [sys.executable, "-m", "opsplane", "demo", "--listen", f"127.0.0.1:{http}",
             "--grpc-listen", f"127.0.0.1:{grpc}", "--data-dir", str(Path(tmp) / "data")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
                _wait(
                    lambda: (
                        client.get("/api/v1/hosts", params={"status": "online"}).json()["total"]
                        == 3
                    ),
                    60,
                )
                api, server = [], []
                for _ in range(args.iterations):
                    started = time.perf_counter()
                    body = {"command": "true", "targets": {"all": True}}
                    task = client.post("/api/v1/tasks", json=body).json()
                    _follow_to_end(client, task["id"])
                    api.append((time.perf_counter() - started) * 1000)
                    done = client.get(f"/api/v1/tasks/{task['id']}").json()
                    assert done["status"] == "succeeded", json.dumps(done)
                    created = datetime.fromisoformat(done["created_at"])
                    finished = datetime.fromisoformat(done["finished_at"])
                    server.append((finished - created).total_seconds() * 1000)
            cli = []
            for _ in range(max(3, args.iterations // 6)):
                started = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "opsplane", "run", "--all", "--json", "--", "true"],
                    env=env, check=True, capture_output=True,
                )  # fmt: skip
                cli.append((time.perf_counter() - started) * 1000)
            floor = []
            for _ in range(args.iterations):
                started = time.perf_counter()
                procs = [subprocess.Popen(["sh", "-c", "true"]) for _ in range(3)]
                for proc in procs:
                    proc.wait()
                floor.append((time.perf_counter() - started) * 1000)
        finally:
            demo.send_signal(signal.SIGINT)
            demo.wait(timeout=30)
    base = statistics.median(floor)
    print(f"trivial command on 3 demo agents, {args.iterations} iterations (ms)")
    print(f"{'measure':<44}{'median':>10}{'p95':>10}{'x floor':>10}")
    for name, values in (
        ("API POST -> terminal SSE event", api),
        ("server created_at -> finished_at", server),
        ("CLI `opsplane run --all -- true` (process)", cli),
        ("floor: 3 local `sh -c true` in parallel", floor),
    ):
        median = statistics.median(values)
        print(f"{name:<44}{median:>10.1f}{_pct(values, 0.95):>10.1f}{median / base:>10.1f}")


if __name__ == "__main__":
    main()
