"""The engine over every supported database (SQLite, MariaDB, PostgreSQL), each test on a fresh
database of its own, with the in-memory link standing in for agents."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, update

from opsplane.app_factory import make_engine
from opsplane.config import Settings, load_settings
from opsplane.domain.errors import Conflict, InvalidInput, NotFound
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.changes import task_view
from opsplane.engine.core import Engine
from opsplane.store import queries
from opsplane.store.tables import HostRow, RunRow
from opsplane.transport.base import HeartbeatReport, RunFinished, RunOutput, RunStarted
from opsplane.transport.memory import MemoryLink
from tests.integration.reports import report_result, task_status


def _settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(
        data_dir=tmp_path, database_url=database_url, heartbeat_interval=1.0, lost_grace=2.0
    )


@pytest.fixture
async def engine(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    the_engine = make_engine(_settings(tmp_path, database_url), [link])
    await the_engine.start()
    await link.connect("web-1", ["web"])
    await link.connect("web-2", ["web"])
    await link.connect("db-1", ["db"])
    try:
        yield the_engine
    finally:
        await the_engine.stop()


def _request(command: str = "true", **targets: object) -> TaskRequest:
    return TaskRequest(command=command, targets=Targets(**targets))  # type: ignore[arg-type]


def _finished(
    host: str, run_id: str, status: str = "succeeded", exit_code: int | None = 0
) -> RunFinished:
    now = datetime.now(UTC)
    return RunFinished(
        hostname=host, run_id=run_id, status=status, exit_code=exit_code, stdout="ok\n", stderr="",
        truncated=False, error=None, started_at=now, finished_at=now, duration_ms=1,
    )  # fmt: skip


async def _runs(engine: Engine, task_id: str) -> dict[str, str]:
    return {run.host: run.id for run in await engine.tasks.list_runs(task_id)}


async def test_create_dispatches_one_run_per_target_and_results_end_the_task(
    engine: Engine, link: MemoryLink
) -> None:
    task = await engine.tasks.create_task(_request(groups=("web",)))
    assert task.status == TaskStatus.RUNNING
    runs = await _runs(engine, task.id)
    assert set(runs) == {"web-1", "web-2"}
    assert [c.run_id for c in link.hosts["web-1"].commands] == [runs["web-1"]]
    for host, run_id in runs.items():
        await report_result(engine, _finished(host, run_id))
    assert await task_status(engine, task.id) == TaskStatus.SUCCEEDED
    progress = task_view(await engine.tasks.get_task(task.id))["progress"]
    assert progress["finished"] == 2 and progress["percent"] == 100.0
    assert task_view(await engine.tasks.get_task(task.id))["counts"]["succeeded"] == 2


async def test_a_duplicate_or_late_result_changes_nothing(engine: Engine) -> None:
    task = await engine.tasks.create_task(_request(hosts=("db-1",)))
    run_id = (await _runs(engine, task.id))["db-1"]
    await report_result(engine, _finished("db-1", run_id, "failed", 3))
    await report_result(engine, _finished("db-1", run_id, "succeeded", 0))
    run = await engine.tasks.get_run(task.id, run_id)
    assert (run.status, run.exit_code) == (RunStatus.FAILED, 3)
    assert await task_status(engine, task.id) == TaskStatus.FAILED


async def test_a_host_cannot_report_on_another_hosts_run(engine: Engine) -> None:
    task = await engine.tasks.create_task(_request(hosts=("db-1",)))
    run_id = (await _runs(engine, task.id))["db-1"]
    await report_result(engine, _finished("web-1", run_id))
    assert (await engine.tasks.get_run(task.id, run_id)).status == RunStatus.DISPATCHED


async def test_create_then_start_and_cancel_of_a_pending_task(
    engine: Engine, link: MemoryLink
) -> None:
    request = TaskRequest(command="true", targets=Targets(hosts=("web-1",)), start=False)
    task = await engine.tasks.create_task(request)
    assert task.status == TaskStatus.PENDING and not link.hosts["web-1"].commands
    canceled = await engine.tasks.cancel_task(task.id)
    assert canceled.status == TaskStatus.CANCELED
    with pytest.raises(Conflict):
        await engine.tasks.start_task(task.id)
    with pytest.raises(Conflict):
        await engine.tasks.cancel_task(task.id)


async def test_cancel_is_confirmed_by_the_host(engine: Engine, link: MemoryLink) -> None:
    task = await engine.tasks.create_task(_request(hosts=("web-2",)))
    run_id = (await _runs(engine, task.id))["web-2"]
    await (await engine.report(RunStarted("web-2", run_id, datetime.now(UTC))))
    await engine.tasks.cancel_task(task.id)
    assert link.hosts["web-2"].cancels == [run_id]
    assert await task_status(engine, task.id) == TaskStatus.RUNNING
    await report_result(engine, _finished("web-2", run_id, "canceled", None))
    assert await task_status(engine, task.id) == TaskStatus.CANCELED


async def test_offline_target_is_undeliverable_at_once(engine: Engine, link: MemoryLink) -> None:
    await engine.handle_host_connection_change("db-1", connected=False)
    await link.disconnect("db-1")
    task = await engine.tasks.create_task(_request(all=True))
    runs = {run.host: run for run in await engine.tasks.list_runs(task.id)}
    assert runs["db-1"].status == RunStatus.UNDELIVERABLE
    assert runs["web-1"].status == RunStatus.DISPATCHED
    assert (await engine.hosts.get_host("db-1")).status == "offline"


async def test_reconnecting_agent_that_forgot_a_run_makes_it_lost(
    engine: Engine, link: MemoryLink
) -> None:
    task = await engine.tasks.create_task(_request(groups=("web",)))
    runs = await _runs(engine, task.id)
    # Started, so its outcome is unknown once the agent forgets it (a run it never received
    # would be undeliverable instead).
    await (await engine.report(RunStarted("web-1", runs["web-1"], datetime.now(UTC))))
    await link.disconnect("web-1")
    await link.disconnect("web-2")
    await link.connect("web-1", ["web"])  # restarted: knows nothing
    await link.connect("web-2", ["web"], finished=[runs["web-2"]])  # holds a spooled result
    assert (await engine.tasks.get_run(task.id, runs["web-1"])).status == RunStatus.LOST
    assert (await engine.tasks.get_run(task.id, runs["web-2"])).status == RunStatus.DISPATCHED
    await report_result(engine, _finished("web-2", runs["web-2"]))
    assert await task_status(engine, task.id) == TaskStatus.FAILED


async def test_reconnecting_agent_that_never_received_a_run_makes_it_undeliverable(
    engine: Engine, link: MemoryLink
) -> None:
    task = await engine.tasks.create_task(_request(groups=("web",)))
    runs = await _runs(engine, task.id)
    await link.disconnect("web-1")
    await link.disconnect("web-2")
    # web-1 never accepted its command (the agent records one before running it); web-2's
    # crashed predecessor had accepted and started it, so its outcome is unknown.
    await link.connect("web-1", ["web"])
    await link.connect("web-2", ["web"], abandoned=[runs["web-2"]])
    never = await engine.tasks.get_run(task.id, runs["web-1"])
    assert never.status == RunStatus.UNDELIVERABLE and "never received" in (never.error or "")
    assert (await engine.tasks.get_run(task.id, runs["web-2"])).status == RunStatus.LOST


async def test_silent_host_goes_offline_and_its_runs_are_lost_after_the_grace_period(
    engine: Engine,
) -> None:
    task = await engine.tasks.create_task(_request(hosts=("db-1",)))
    run_id = (await _runs(engine, task.id))["db-1"]
    # Last heard of 10 s ago: past 3 heartbeat intervals (3 s) and the grace period (2 s),
    # and the monitor has been watching for that long.
    assert engine.monitor.started_at is not None
    engine.monitor.started_at -= timedelta(seconds=10)
    async with engine.write() as changes:
        stale = datetime.now(UTC) - timedelta(seconds=10)
        await changes.session.execute(
            update(HostRow).where(HostRow.name == "db-1").values(last_seen_at=stale)
        )
    await engine.monitor.check_once()
    assert (await engine.hosts.get_host("db-1")).status == "offline"
    await engine.monitor.check_once()
    run = await engine.tasks.get_run(task.id, run_id)
    assert run.status == RunStatus.LOST and "unreachable" in (run.error or "")


async def test_a_task_whose_runs_all_ended_without_ending_it_is_ended_by_the_monitor(
    engine: Engine,
) -> None:
    """Two instances ingesting a task's last two results at once each count the other's run as
    still open and neither ends the task (seen on PostgreSQL in the two-instance e2e test);
    here the runs end behind the engine's back, as those two commits leave them."""
    task = await engine.tasks.create_task(_request(groups=("web",)))
    async with engine.write() as changes:
        await changes.session.execute(
            update(RunRow).where(RunRow.task_id == task.id).values(status="succeeded")
        )
    assert (await engine.tasks.get_task(task.id)).status == TaskStatus.RUNNING
    await engine.monitor.check_once()
    ended = await engine.tasks.get_task(task.id)
    assert ended.status == TaskStatus.SUCCEEDED and ended.finished_at is not None
    assert ended.counts == {"succeeded": 2}


async def test_heartbeats_update_the_host(engine: Engine) -> None:
    await (await engine.report(HeartbeatReport("web-1", datetime.now(UTC), 12.5, 40.0, 0.3, 55.0)))
    host = await engine.hosts.get_host("web-1")
    assert (host.cpu_usage, host.memory_usage, host.load, host.disk_usage) == (
        12.5,
        40.0,
        0.3,
        55.0,
    )


async def test_reports_are_written_in_batches_not_one_transaction_each(engine: Engine) -> None:
    task = await engine.tasks.create_task(_request(hosts=("web-1",)))
    run_id = (await _runs(engine, task.id))["web-1"]
    await (await engine.report(RunStarted("web-1", run_id, datetime.now(UTC))))
    commits = 0

    def _count(_connection: object) -> None:
        nonlocal commits
        commits += 1

    event.listen(engine.db.sync_engine, "commit", _count)
    futures = [
        await engine.report(RunOutput("web-1", run_id, "stdout", i, b"x\n")) for i in range(500)
    ]
    futures.append(await engine.report(_finished("web-1", run_id)))
    for future in futures:
        await future
    event.remove(engine.db.sync_engine, "commit", _count)
    assert commits <= 5, f"{commits} transactions for 501 reports"
    log = await engine.archive.read(engine.archive.path_for(task.id, run_id, task.created_at))
    assert log == b"x\n" * 500


async def test_invalid_requests_and_unknown_ids(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match="ghost"):
        await engine.tasks.create_task(_request(hosts=("ghost",)))
    with pytest.raises(NotFound):
        await engine.tasks.get_task("nope")
    with pytest.raises(NotFound):
        await engine.hosts.get_host("nope")


async def test_idempotency_key_returns_the_first_task(engine: Engine) -> None:
    request = TaskRequest(command="true", targets=Targets(hosts=("web-1",)), idempotency_key="k-1")
    first = await engine.tasks.create_task(request)
    second = await engine.tasks.create_task(request)
    assert first.id == second.id


async def test_output_with_nul_bytes_and_emoji_is_stored_on_every_database(
    engine: Engine,
) -> None:
    task = await engine.tasks.create_task(_request(hosts=("web-1",)))
    run_id = (await _runs(engine, task.id))["web-1"]
    await (await engine.report(RunStarted("web-1", run_id, datetime.now(UTC))))
    text = "héllo 部署 🚀\x00done\n"
    chunk = text.encode()
    # Split inside the rocket: the decoder must join the halves of one character.
    await (await engine.report(RunOutput("web-1", run_id, "stdout", 0, chunk[:16])))
    await (await engine.report(RunOutput("web-1", run_id, "stdout", 1, chunk[16:])))
    await report_result(
        engine, replace(_finished("web-1", run_id), stdout=text, stderr="\x00", error="e\x00")
    )
    # PostgreSQL refuses NUL in text: every database keeps U+FFFD in its place.
    stored = text.replace("\x00", "\ufffd")
    run = await engine.tasks.get_run(task.id, run_id)
    assert (run.status, run.stdout, run.stderr, run.error) == (
        RunStatus.SUCCEEDED,
        stored,
        "\ufffd",
        "e\ufffd",
    )
    async with engine.sessions() as session:
        events = await queries.events_after(session, task.id, 0, 100)
    output = "".join(e.data["data"] for e in events if e.kind == "output")
    assert output == stored
    assert [e.id for e in events] == sorted({e.id for e in events})
    # The archive keeps the bytes as the host sent them.
    assert (
        await engine.archive.read(engine.archive.path_for(task.id, run_id, task.created_at))
        == chunk
    )


async def _backdate(
    engine: Engine, run_id: str, *, dispatched: float, started: float | None
) -> None:
    """Move a run's dispatch (and start) this many seconds into the past."""
    now = datetime.now(UTC)
    values: dict[str, object] = {"dispatched_at": now - timedelta(seconds=dispatched)}
    if started is not None:
        values["started_at"] = now - timedelta(seconds=started)
    async with engine.write() as changes:
        await changes.session.execute(update(RunRow).where(RunRow.id == run_id).values(**values))


async def test_the_control_plane_ends_runs_past_their_timeout_and_cancels_them(
    engine: Engine, link: MemoryLink
) -> None:
    """Issue 16 item 9 (seed 001: "the server marks the command timed out"): a host that never
    reports a result does not keep a run open past its timeout plus ``timeout_grace``."""
    assert engine.settings.timeout_grace == 30.0
    task = await engine.tasks.create_task(
        replace(_request(groups=("web",)), timeout=5)  # 5 s + 30 s grace = 35 s
    )
    runs = await _runs(engine, task.id)
    other = await engine.tasks.create_task(replace(_request(hosts=("db-1",)), timeout=5))
    waiting = (await _runs(engine, other.id))["db-1"]
    await (await engine.report(RunStarted("web-1", runs["web-1"], datetime.now(UTC))))
    # web-1 started 40 s ago; web-2 (a seed-002 agent: no "started") was sent 40 s ago;
    # db-1's run was sent 40 s ago, but the host says it started 10 s ago: not yet overdue.
    await _backdate(engine, runs["web-1"], dispatched=41, started=40)
    await _backdate(engine, runs["web-2"], dispatched=40, started=None)
    await (await engine.report(RunStarted("db-1", waiting, datetime.now(UTC))))
    await _backdate(engine, waiting, dispatched=40, started=10)
    assert engine.monitor.started_at is not None
    engine.monitor.started_at -= timedelta(seconds=60)
    await engine.monitor.check_once()
    started = await engine.tasks.get_run(task.id, runs["web-1"])
    assert started.status == RunStatus.TIMED_OUT and "5s + 30s" in (started.error or "")
    unstarted = await engine.tasks.get_run(task.id, runs["web-2"])
    assert unstarted.status == RunStatus.LOST and "never reported" in (unstarted.error or "")
    assert link.hosts["web-1"].cancels == [runs["web-1"]]
    assert link.hosts["web-2"].cancels == [runs["web-2"]]
    assert (await engine.tasks.get_run(other.id, waiting)).status == RunStatus.RUNNING
    assert link.hosts["db-1"].cancels == []
    assert await task_status(engine, task.id) == TaskStatus.FAILED
    # The agent's own result, arriving late, changes nothing.
    await report_result(engine, _finished("web-1", runs["web-1"]))
    assert (await engine.tasks.get_run(task.id, runs["web-1"])).status == RunStatus.TIMED_OUT


async def test_the_timeout_clock_counts_from_the_dispatch_when_the_host_clock_is_behind(
    engine: Engine, link: MemoryLink
) -> None:
    task = await engine.tasks.create_task(replace(_request(hosts=("db-1",)), timeout=5))
    run_id = (await _runs(engine, task.id))["db-1"]
    await (await engine.report(RunStarted("db-1", run_id, datetime.now(UTC))))
    # The host dates its start 100 s back, but the run was sent only 20 s ago.
    await _backdate(engine, run_id, dispatched=20, started=100)
    assert engine.monitor.started_at is not None
    engine.monitor.started_at -= timedelta(seconds=60)
    await engine.monitor.check_once()
    assert (await engine.tasks.get_run(task.id, run_id)).status == RunStatus.RUNNING
    assert link.hosts["db-1"].cancels == []
