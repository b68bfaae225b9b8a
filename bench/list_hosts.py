"""Read paths at fleet scale: N hosts (and one task with a run per host) in the database, then
the list endpoints timed through the real app in process (ASGI, no network).

Measures, per backend (SQLite file, PostgreSQL on 127.0.0.1:5432):
- ``GET /api/v1/hosts?size=100``, and with a group filter and a status filter;
- ``GET /api/v1/tasks/{id}/runs`` (what the endpoint returns by default; its size in bytes);
- the page's fleet view initial load: every host, the way the page fetches them (the base tree:
  ten pages of a thousand by page number; this tree: a cursor walk, 200 then 1000s), and the
  time to its first screen (the first request).
Each figure: median and p90 wall time of ``--repeat`` requests, and the process CPU time per
request (less sensitive to a shared machine than wall time).

Runs against whatever ``opsplane`` is importable, so the same script measures a base tree:
``PYTHONPATH=/tmp/base/src .venv/bin/python bench/list_hosts.py``.

    python bench/list_hosts.py [--hosts 10000] [--repeat 20] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import create_async_engine

from opsplane.app_factory import create_app
from opsplane.config import load_settings
from opsplane.store.tables import HostRow, RunRow, TaskRow

TOKEN = "ops_bench-bootstrap-admin-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
PG_ADMIN = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
GROUPS = ("web", "db", "cache", "batch")
TASK_ID = "0190aaaa-0000-7000-8000-000000000001"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def host_rows(count: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {
            "name": f"node-{i:05d}",
            "link": "grpc",
            "groups": [GROUPS[i % 4]],
            "labels": {"rack": f"r{i % 40}"},
            "status": "offline" if i % 97 == 0 else "online",
            "last_seen_at": now,
            "cpu_usage": float(i % 100),
            "memory_usage": 40.0,
            "load": 0.5,
            "disk_usage": 40.0,
            "agent_version": "0.1.0",
            "os": "Linux",
            "created_at": now,
        }
        for i in range(count)
    ]


def task_and_runs(count: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    now = datetime.now(UTC)
    task = {
        "id": TASK_ID, "name": "bench", "command": "uname -a", "targets": {"all": True},
        "timeout": 60, "status": "succeeded", "created_at": now, "counts": {}, "total": count,
    }  # fmt: skip
    runs = [
        {
            "id": f"0190bbbb-0000-7000-8000-{i:012d}",
            "task_id": TASK_ID,
            "host": f"node-{i:05d}",
            "attempt": 1,
            "status": "succeeded",
            "exit_code": 0,
            "stdout": "Linux node 6.1.0 #1 SMP x86_64 GNU/Linux\n" * 4,
            "stderr": "",
            "updated_at": now,
        }
        for i in range(count)
    ]
    return task, runs


async def seed(url: str, hosts: int) -> None:
    """Bulk inserts (one executemany per table, in chunks)."""
    db = create_async_engine(url)
    task, runs = task_and_runs(hosts)
    async with db.begin() as conn:
        rows = host_rows(hosts)
        for start in range(0, len(rows), 2000):
            await conn.execute(insert(HostRow.__table__), rows[start : start + 2000])
        await conn.execute(insert(TaskRow.__table__), [task])
        for start in range(0, len(runs), 2000):
            await conn.execute(insert(RunRow.__table__), runs[start : start + 2000])
    await db.dispose()


@asynccontextmanager
async def database(backend: str, root: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{root / 'bench.db'}"
        return
    name = f"bench_reads_{secrets.token_hex(4)}"
    admin = create_async_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        await admin.dispose()


async def timed(repeat: int, call: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    await call()  # warm: caches, compiled statements
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        await call()
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
    walls.sort()
    return {
        "median_ms": statistics.median(walls),
        "p90_ms": walls[int(0.9 * (len(walls) - 1))],
        "cpu_ms": statistics.median(cpus),
    }


async def fleet_load(client: httpx.AsyncClient) -> int:
    """Every host, as the page of this tree fetches them; returns how many."""
    first = (await client.get("/api/v1/hosts", params={"size": 200})).json()
    if "next_cursor" not in first:  # the base tree: pages by number
        total, got = first["total"], 0
        for number in range(1, (total + 999) // 1000 + 1):
            answer = await client.get("/api/v1/hosts", params={"page": number, "size": 1000})
            got += len(answer.json()["items"])
        return got
    got, body = len(first["items"]), first
    for _ in range(1000):
        if not body["next_cursor"]:
            break
        params = {"size": 1000, "cursor": body["next_cursor"]}
        body = (await client.get("/api/v1/hosts", params=params)).json()
        got += len(body["items"])
    return got


async def measure(backend: str, hosts: int, repeat: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with database(backend, root) as url:
            app = create_app(
                load_settings(
                    data_dir=root, database_url=url, bootstrap_admin_token=TOKEN,
                    grpc_listen=f"127.0.0.1:{free_port()}",
                )
            )  # fmt: skip
            async with app.router.lifespan_context(app):
                await seed(url, hosts)
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://bench", headers=HEADERS, timeout=120
                ) as client:

                    def get(path: str, **params: Any) -> Callable[[], Awaitable[Any]]:
                        async def call() -> httpx.Response:
                            answer = await client.get(path, params=params)
                            assert answer.status_code == 200, answer.text[:300]
                            return answer

                        return call

                    assert await fleet_load(client) == hosts
                    runs = await get(f"/api/v1/tasks/{TASK_ID}/runs")()
                    cases = {
                        "GET /hosts?size=100": get("/api/v1/hosts", size=100),
                        "GET /hosts?size=100&group=db": get("/api/v1/hosts", size=100, group="db"),
                        "GET /hosts?size=100&status=offline": get(
                            "/api/v1/hosts", size=100, status="offline"
                        ),
                        "GET /hosts?size=100&page=50": get("/api/v1/hosts", size=100, page=50),
                        f"GET /tasks/{{id}}/runs ({len(runs.content):,} B)": get(
                            f"/api/v1/tasks/{TASK_ID}/runs"
                        ),
                        "fleet view: first screen": get("/api/v1/hosts", size=200),
                        "fleet view: every host": lambda: fleet_load(client),
                    }
                    rows = []
                    for name, call in cases.items():
                        figures = await timed(repeat, call)
                        rows.append({"backend": backend, "case": name, **figures})
                        print(f"  {backend:10} {name:40} {figures}", flush=True)
                    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for backend in args.backends.split(","):
        rows += asyncio.run(measure(backend, args.hosts, args.repeat))
    print(f"\n{args.hosts:,} hosts, {args.repeat} requests each (median / p90 wall, median CPU)\n")
    print("| backend | request | median ms | p90 ms | CPU ms |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['case']} | {row['median_ms']:.1f} | "
            f"{row['p90_ms']:.1f} | {row['cpu_ms']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
