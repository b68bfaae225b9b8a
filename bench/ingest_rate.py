"""Result and heartbeat ingest rate into each database, through the real engine.

For every backend (SQLite, MariaDB, PostgreSQL — servers skipped when unreachable) this makes a
fresh database, registers N simulated hosts on the in-memory link, dispatches one task to all of
them, then reports N ``started`` + N final results and N heartbeats as fast as they can be queued,
and times until the last one is durable. Prints results/s and heartbeats/s, and each backend's
ratio to SQLite.

    python bench/ingest_rate.py [--hosts 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.transport.base import HeartbeatReport, RunFinished, RunStarted
from opsplane.transport.memory import MemoryLink

SERVERS = {
    "mariadb": ("mysql+asyncmy://root@127.0.0.1:3306", "test", 3306),
    "postgresql": ("postgresql+asyncpg://postgres@127.0.0.1:5432", "postgres", 5432),
}


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def _admin(backend: str, sql: str) -> None:
    base, admin_db, _ = SERVERS[backend]
    engine = create_async_engine(
        f"{base}/{admin_db}", poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as connection:
            await connection.execute(text(sql))
    finally:
        await engine.dispose()


async def _measure(url: str, data_dir: Path, hosts: int) -> tuple[float, float]:
    link = MemoryLink()
    engine = make_engine(load_settings(data_dir=data_dir, database_url=url), [link])
    await engine.start()
    try:
        names = [f"h{i:05d}" for i in range(hosts)]
        for name in names:
            await link.connect(name, ["bench"])
        task = await engine.tasks.create_task(
            TaskRequest(command="true", targets=Targets(all=True))
        )
        runs = {run.host: run.id for run in await engine.tasks.list_runs(task.id)}
        now = datetime.now(UTC)
        began = time.perf_counter()
        futures = []
        for name in names:
            futures.append(await engine.report(RunStarted(name, runs[name], now)))
        for name in names:
            finished = RunFinished(
                name, runs[name], "succeeded", 0, "", "", False, None, now, now, 1
            )
            futures.append(await engine.report(finished))
        await asyncio.gather(*futures)
        results = hosts / (time.perf_counter() - began)
        assert (await engine.tasks.get_task(task.id)).status == "succeeded"
        began = time.perf_counter()
        beats = [
            await engine.report(HeartbeatReport(n, datetime.now(UTC), 1.0, 2.0, 0.1, 3.0))
            for n in names
        ]
        await asyncio.gather(*beats)
        heartbeats = hosts / (time.perf_counter() - began)
        return results, heartbeats
    finally:
        await engine.stop()


async def main(hosts: int) -> None:
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(
            ("sqlite", *await _measure(f"sqlite+aiosqlite:///{tmp}/bench.db", Path(tmp), hosts))
        )
        for backend, (base, _, port) in SERVERS.items():
            if not _reachable(port):
                print(f"{backend}: not reachable, skipped")
                continue
            name = f"opsplane_bench_{secrets.token_hex(4)}"
            await _admin(backend, f"CREATE DATABASE {name}")
            try:
                rows.append((backend, *await _measure(f"{base}/{name}", Path(tmp), hosts)))
            finally:
                await _admin(backend, f"DROP DATABASE {name}")
    base_results, base_beats = rows[0][1], rows[0][2]
    print(
        f"ingest through the engine, {hosts} hosts (started + result per host; one heartbeat each)"
    )
    print(f"{'database':<12}{'results/s':>12}{'x sqlite':>10}{'heartbeats/s':>15}{'x sqlite':>10}")
    for backend, results, beats in rows:
        ratios = f"{results / base_results:>10.2f}{beats:>15.0f}{beats / base_beats:>10.2f}"
        print(f"{backend:<12}{results:>12.0f}{ratios}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=2000)
    asyncio.run(main(parser.parse_args().hosts))
