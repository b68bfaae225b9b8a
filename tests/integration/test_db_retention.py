"""What the database keeps is bounded: output events per run, old task events, hosts gone for
good; and the monitor's work follows what changed, not the number of hosts ever seen."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select, update

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.errors import Conflict
from opsplane.domain.states import RunStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.changes import TaskEvent
from opsplane.engine.core import Engine
from opsplane.store.tables import HeartbeatRow, HostRow, RunRow, TaskEventRow, TaskRow
from opsplane.transport.base import RunFinished, RunOutput, RunStarted
from opsplane.transport.memory import MemoryLink

MiB = 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    """On SQLite, the embedded default (where the bound-parameter limit bit)."""
    async with _engine(tmp_path, None) as the_engine:
        yield the_engine


@pytest.fixture
async def any_engine(tmp_path: Path, database_url: str) -> AsyncIterator[Engine]:
    """On every database backend."""
    async with _engine(tmp_path, database_url) as the_engine:
        yield the_engine


@asynccontextmanager
async def _engine(tmp_path: Path, database_url: str | None) -> AsyncIterator[Engine]:
    link = MemoryLink()
    settings = load_settings(
        database_url=database_url,
        data_dir=tmp_path,
        heartbeat_interval=1.0,
        lost_grace=2.0,
        redact_patterns=[],  # storage is the subject here, not redaction
        event_retention_days=7,
        host_retention_days=30,
    )
    the_engine = make_engine(settings, [link])
    await the_engine.start()
    # Passes are run by the tests, not by the background duty.
    await the_engine.retention.stop()
    await link.connect("web-1", ["web"])
    try:
        yield the_engine
    finally:
        await the_engine.stop()


async def _event_bytes(engine: Engine, run_id: str) -> tuple[int, list[TaskEventRow]]:
    async with engine.sessions() as session:
        rows = list(
            (
                await session.execute(
                    select(TaskEventRow).where(
                        TaskEventRow.run_id == run_id, TaskEventRow.kind == "output"
                    )
                )
            ).scalars()
        )
    return sum(len(str(r.data.get("data", "")).encode()) for r in rows), rows


async def test_twenty_mib_of_output_keeps_a_bounded_head_in_the_database_and_all_in_the_archive(
    engine: Engine,
) -> None:
    task = await engine.tasks.create_task(
        TaskRequest(command="yes", targets=Targets(hosts=("web-1",)))
    )
    (run,) = await engine.tasks.list_runs(task.id)
    subscription = engine.hub.subscribe(task.id)
    await (await engine.report(RunStarted("web-1", run.id, datetime.now(UTC))))
    line = b"y" * 1023 + b"\n"
    chunk = line * (CHUNK // len(line))
    total = 20 * MiB
    futures = []
    for seq in range(total // CHUNK):
        futures.append(await engine.report(RunOutput("web-1", run.id, "stdout", seq, chunk)))
    # A host that ignored its own cap: the run row must not take 20 MiB either.
    big = (chunk * (total // CHUNK)).decode()
    now = datetime.now(UTC)
    finished = RunFinished(
        hostname="web-1", run_id=run.id, status="succeeded", exit_code=0, stdout=big,
        stderr="", truncated=False, error=None, started_at=now, finished_at=now, duration_ms=1,
    )  # fmt: skip
    futures.append(await engine.report(finished))
    await asyncio.gather(*futures)
    await engine.ingest.archived()

    stored, rows = await _event_bytes(engine, run.id)
    cap = engine.settings.event_output_cap
    assert cap <= stored <= cap + 8, stored
    (marker,) = [r for r in rows if r.data.get("capped")]
    assert marker.data["log"] == f"/api/v1/tasks/{task.id}/runs/{run.id}/log"
    assert marker.id == max(r.id for r in rows)  # after the head, nothing more stored

    # Live subscribers saw every byte, durable head and live-only rest alike, in order.
    live: list[TaskEvent] = []
    while not subscription.queue.empty():
        live.append(subscription.queue.get_nowait())
    engine.hub.unsubscribe(subscription)
    seen = "".join(str(e.data.get("data", "")) for e in live if e.kind == "output")
    assert len(seen) == total and seen[: len(line)] == line.decode()
    assert any(not e.durable for e in live)
    # On the SSE stream a live-only event carries no id: Last-Event-ID stays on stored events.
    from opsplane.api.routers.tasks import _sse

    assert _sse(next(e for e in live if not e.durable)).id is None
    assert _sse(live[0]).id == str(live[0].id)

    # The archive keeps the whole; the row keeps a head and a tail.
    ended = await engine.tasks.get_run(task.id, run.id)
    assert ended.log_path is not None
    assert len(await engine.archive.read(Path(ended.log_path))) == total
    assert ended.status == RunStatus.SUCCEEDED and ended.truncated
    assert len(ended.stdout.encode()) <= 2 * engine.settings.output_cap + 128


async def _age_task(engine: Engine, task_id: str, days: float) -> None:
    then = datetime.now(UTC) - timedelta(days=days)
    async with engine.write() as changes:
        await changes.session.execute(
            update(TaskRow).where(TaskRow.id == task_id).values(finished_at=then)
        )
        await changes.session.execute(
            update(TaskEventRow).where(TaskEventRow.task_id == task_id).values(created_at=then)
        )


async def _events_of(engine: Engine, task_id: str) -> int:
    async with engine.sessions() as session:
        stmt = select(func.count()).select_from(TaskEventRow)
        return int((await session.execute(stmt.where(TaskEventRow.task_id == task_id))).scalar())


async def test_events_of_tasks_ended_past_the_retention_are_pruned_in_bounded_batches(
    any_engine: Engine,
) -> None:
    tasks = []
    for _ in range(3):
        task = await any_engine.tasks.create_task(
            TaskRequest(command="true", targets=Targets(hosts=("web-1",)))
        )
        (run,) = await any_engine.tasks.list_runs(task.id)
        now = datetime.now(UTC)
        for seq in range(5):
            await (await any_engine.report(RunOutput("web-1", run.id, "stdout", seq, b"line\n")))
        await (
            await any_engine.report(
                RunFinished("web-1", run.id, "succeeded", 0, "", "", False, None, now, now, 1)
            )
        )
        tasks.append(task.id)
    old, recent, running_long = tasks
    await _age_task(any_engine, old, 8)
    await _age_task(any_engine, recent, 6)
    before = {t: await _events_of(any_engine, t) for t in tasks}
    assert all(n > 5 for n in before.values())

    any_engine.retention._batch = 3  # several small batches, each its own transaction
    result = await any_engine.retention.run_once()
    assert result.events == before[old] and result.complete
    assert await _events_of(any_engine, old) == 0
    assert await _events_of(any_engine, recent) == before[recent]
    assert await _events_of(any_engine, running_long) == before[running_long]

    # The SSE replay of a pruned task still ends, with the task's final state.
    from opsplane.api.routers.tasks import _event_stream

    events = [e async for e in _event_stream(any_engine, old, 0)]
    assert len(events) == 1 and events[0].event == "task" and '"succeeded"' in events[0].data


async def _bulk_hosts(engine: Engine, count: int, seen: datetime) -> None:
    rows = [
        {"name": f"gone-{i:06d}", "link": "grpc", "groups": [], "labels": {}, "status": "offline",
         "last_seen_at": seen, "created_at": seen}
        for i in range(count)
    ]  # fmt: skip
    async with engine.write() as changes:
        for start in range(0, count, 5000):
            await changes.session.execute(insert(HostRow), rows[start : start + 5000])


async def test_the_monitor_copes_with_forty_thousand_offline_hosts(engine: Engine) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=1)
    await _bulk_hosts(engine, 40_000, long_ago)
    task = await engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(hosts=("web-1",)))
    )
    (run,) = await engine.tasks.list_runs(task.id)
    assert engine.monitor.started_at is not None
    engine.monitor.started_at -= timedelta(seconds=10)
    async with engine.write() as changes:
        await changes.session.execute(
            update(HostRow).where(HostRow.name == "web-1").values(last_seen_at=long_ago)
        )
    # Every statement the monitor sends, with its bound parameters and the rows it read.
    statements: list[tuple[str, int]] = []

    def seen(_conn: Any, _cursor: Any, sql: str, params: Any, *_rest: Any) -> None:
        statements.append((sql, len(params) if isinstance(params, list | tuple | dict) else 0))

    event.listen(engine.db.sync_engine, "before_cursor_execute", seen)
    try:
        await engine.monitor.check_once(prune=True)
        assert (await engine.hosts.get_host("web-1")).status == "offline"
        await engine.monitor.check_once()
    finally:
        event.remove(engine.db.sync_engine, "before_cursor_execute", seen)
    assert (await engine.tasks.get_run(task.id, run.id)).status == RunStatus.LOST
    # Its work follows what changed (one host, one run), not the 40,000 hosts gone long ago:
    # no statement binds a parameter per host.
    assert statements and max(n for _, n in statements) < 100, max(n for _, n in statements)


async def test_hosts_gone_past_the_retention_are_forgotten_unless_busy(any_engine: Engine) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=40)
    await _bulk_hosts(any_engine, 2_500, long_ago)
    # One of them still has a run waiting for it: kept until that run ends.
    async with any_engine.write() as changes:
        await changes.session.execute(
            update(HostRow).where(HostRow.name == "gone-000007").values(groups=["keep"])
        )
        changes.session.add(HeartbeatRow(host="gone-000001", at=long_ago))
    await any_engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(groups=("keep",)), start=False)
    )
    result = await any_engine.retention.run_once()
    assert result.hosts == 2_499
    async with any_engine.sessions() as session:
        names = set((await session.execute(select(HostRow.name))).scalars())
        beats = (await session.execute(select(func.count()).select_from(HeartbeatRow))).scalar()
    assert "gone-000007" in names and "web-1" in names and "gone-000001" not in names
    assert beats == 0


async def test_removing_a_host_refuses_a_connected_agent_and_a_host_with_runs_in_flight(
    any_engine: Engine,
) -> None:
    with pytest.raises(Conflict, match="connected"):
        await any_engine.hosts.remove_host("web-1")
    long_ago = datetime.now(UTC) - timedelta(days=1)
    await _bulk_hosts(any_engine, 2, long_ago)
    async with any_engine.write() as changes:
        await changes.session.execute(
            update(HostRow).where(HostRow.name == "gone-000000").values(groups=["g"])
        )
    await any_engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(groups=("g",)), start=False)
    )
    with pytest.raises(Conflict, match="waiting or in flight"):
        await any_engine.hosts.remove_host("gone-000000")
    removed = await any_engine.hosts.remove_host("gone-000001")
    assert removed.name == "gone-000001"
    async with any_engine.sessions() as session:
        names = set((await session.execute(select(HostRow.name))).scalars())
        runs = (await session.execute(select(func.count()).select_from(RunRow))).scalar()
    assert names == {"web-1", "gone-000000"} and runs == 1
