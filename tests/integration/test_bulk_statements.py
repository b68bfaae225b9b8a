"""One statement per batch, not per row, for heartbeats on every backend (store/bulk.py;
docs/scale.md, "RabbitMQ on MariaDB, after the heartbeat and statement fixes"): asyncmy runs
an UPDATE's executemany row by row, so a row is counted here as the statement it costs
MariaDB. Run state changes stay one UPDATE per run there (measured: the bulk form cost more
CPU than it saved), and are checked for their outcome only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.store import queries
from opsplane.transport.base import HeartbeatReport, HostReport, RunFinished, RunStarted
from opsplane.transport.memory import MemoryLink

FLEET = 120


@pytest.fixture
async def engine(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    settings = load_settings(
        data_dir=tmp_path, database_url=database_url, heartbeat_interval=60.0, lost_grace=120.0
    )
    the_engine = make_engine(settings, [link])
    await the_engine.start()
    for i in range(FLEET):
        await link.connect(f"h{i:03}", ["all"])
    try:
        yield the_engine
    finally:
        await the_engine.stop()


async def _updates_for(engine: Engine, reports: list[HostReport]) -> int:
    """Write ``reports`` as one ingest batch; the UPDATE statements MariaDB would run (an
    executemany counting one per row)."""
    updates = 0

    def count(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, many: bool
    ) -> None:
        nonlocal updates
        if statement.lstrip().upper().startswith("UPDATE"):
            updates += len(parameters) if many else 1

    await engine.ingest.loop.stop()  # queued first, written together when it starts
    futures = [await engine.report(report) for report in reports]
    listener: Callable[..., None] = count
    event.listen(engine.db.sync_engine, "before_cursor_execute", listener)
    try:
        engine.ingest.loop.start()
        async with asyncio.timeout(30):
            await asyncio.gather(*futures)
    finally:
        event.remove(engine.db.sync_engine, "before_cursor_execute", listener)
    return updates


async def _broadcast(engine: Engine, hosts: int) -> tuple[int, int]:
    """A task on ``hosts`` hosts, its runs started and ended in one batch; then every host's
    heartbeat in one batch: the UPDATEs of the heartbeats, and how many runs succeeded."""
    names = tuple(f"h{i:03}" for i in range(hosts))
    task = await engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(hosts=names), timeout=60)
    )
    runs = {run.host: run.id for run in await engine.tasks.list_runs(task.id)}
    now = datetime.now(UTC)
    reports: list[HostReport] = [RunStarted(h, runs[h], now) for h in names]
    reports += [
        RunFinished(
            hostname=h, run_id=runs[h], status="succeeded", exit_code=0, stdout="", stderr="",
            truncated=False, error=None, started_at=now, finished_at=now, duration_ms=1,
        )
        for h in names
    ]  # fmt: skip
    await _updates_for(engine, reports)
    beats: list[HostReport] = [HeartbeatReport(h, now, 1.0, 2.0, 0.1, 3.0) for h in names]
    updates = await _updates_for(engine, beats)
    succeeded = [r for r in await engine.tasks.list_runs(task.id) if r.status == "succeeded"]
    return updates, len(succeeded)


async def test_a_batch_of_heartbeats_costs_the_same_statements_for_10_or_120_hosts(
    engine: Engine,
) -> None:
    small = await _broadcast(engine, 10)
    large = await _broadcast(engine, FLEET)
    assert (small[1], large[1]) == (10, FLEET)
    assert large[0] <= small[0], f"UPDATEs for 10 hosts' beats: {small[0]}, {FLEET}: {large[0]}"
    host = await engine.hosts.get_host(f"h{FLEET - 1:03}")
    assert (host.status, host.cpu_usage, host.disk_usage) == ("online", 1.0, 3.0)


async def test_batches_of_every_size_leave_a_bounded_number_of_compiled_statements(
    engine: Engine,
) -> None:
    """A statement whose shape follows its batch's size is one entry of SQLAlchemy's compiled
    cache per size, each holding its first batch's values (60 to 100 MiB of RSS per 5,000-host
    broadcast, docs/scale.md): batches of 1 to 120 rows must share a few shapes."""
    cache = engine.db.sync_engine._compiled_cache
    assert cache is not None
    now = datetime.now(UTC)
    sizes = range(1, FLEET + 1)
    before = len(cache)
    for size in sizes:
        names = [f"h{i:03}" for i in range(size)]
        beats = [
            {"name": n, "last_seen_at": now, "cpu_usage": float(size), "memory_usage": 2.0,
             "load": 0.1, "disk_usage": 3.0}
            for n in names
        ]  # fmt: skip
        async with engine.sessions() as session, session.begin():
            await queries.record_heartbeats(session, beats, [])
            await queries.bulk_update_hosts(
                session, [{"name": n, "agent_version": "9"} for n in names]
            )
            await queries.latest_runs_of(session, [("t-1", n) for n in names])
    grown = len(cache) - before
    # Per path: the sizes 1, 2, 4 … 128 (eight shapes), and a few for the reads around them.
    assert grown <= 40, f"{grown} compiled statements for batches of {len(sizes)} sizes"
    host = await engine.hosts.get_host(f"h{FLEET - 1:03}")
    assert (host.status, host.cpu_usage, host.agent_version) == ("online", float(FLEET), "9")
