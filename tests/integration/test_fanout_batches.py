"""Fan-out in batches (issue 15, docs/scale.md "Fan-out"): a broadcast writes its runs and
events in a number of statements that does not grow with the fleet, and a batch of results
still ends every run in its own state, with its events in order. On every database backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.engine.dispatcher import Dispatch, Dispatcher, DispatchPlan
from opsplane.store import queries
from opsplane.transport.base import CommandEnvelope, RunFinished
from opsplane.transport.memory import MemoryLink

FLEET = 120


@pytest.fixture
async def engine(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    settings = load_settings(data_dir=tmp_path, database_url=database_url)
    the_engine = make_engine(settings, [link])
    await the_engine.start()
    for i in range(FLEET):
        await link.connect(f"node-{i:03d}", ["small" if i < 10 else "big"])
    try:
        yield the_engine
    finally:
        await the_engine.stop()


class _Inserts:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args: Any) -> None:
        if str(args[2]).lstrip().upper().startswith("INSERT"):
            self.count += 1


async def _inserts_to_create(engine: Engine, group: str) -> tuple[int, int]:
    """(INSERT statements, runs) of creating and dispatching a task on ``group``."""
    inserts = _Inserts()
    event.listen(engine.db.sync_engine, "before_cursor_execute", inserts)
    try:
        task = await engine.tasks.create_task(
            TaskRequest(command="true", targets=Targets(groups=(group,)))
        )
    finally:
        event.remove(engine.db.sync_engine, "before_cursor_execute", inserts)
    return inserts.count, len(await engine.tasks.list_runs(task.id))


async def test_a_broadcast_writes_its_runs_and_events_in_a_constant_number_of_inserts(
    engine: Engine,
) -> None:
    small, small_runs = await _inserts_to_create(engine, "small")
    big, big_runs = await _inserts_to_create(engine, "big")
    assert (small_runs, big_runs) == (10, FLEET - 10)
    # The task, its runs in one statement, its events in one: eleven times the hosts, the
    # same statements (one INSERT per run or per event used to be hundreds).
    assert big == small
    assert big <= 4


def _finished(host: str, run_id: str, exit_code: int) -> RunFinished:
    now = datetime.now(UTC)
    return RunFinished(
        hostname=host, run_id=run_id, status="succeeded" if exit_code == 0 else "failed",
        exit_code=exit_code, stdout="", stderr="", truncated=False, error=None,
        started_at=now, finished_at=now, duration_ms=1,
    )  # fmt: skip


async def test_a_batch_of_results_ends_each_run_in_its_state_with_its_events_in_order(
    engine: Engine, link: MemoryLink
) -> None:
    task = await engine.tasks.create_task(TaskRequest(command="true", targets=Targets(all=True)))
    runs = await engine.tasks.list_runs(task.id)
    assert len(runs) == FLEET
    exit_codes = {run.id: i % 3 == 0 for i, run in enumerate(runs)}
    # Reported together, so that ingest takes many of them in one transaction.
    durable = [
        await engine.report(_finished(run.host, run.id, int(exit_codes[run.id]))) for run in runs
    ]
    async with asyncio.timeout(60):
        await asyncio.gather(*durable)
        ended = await engine.wait_task(task.id)
    assert ended.status == TaskStatus.FAILED
    stored = {run.id: run for run in await engine.tasks.list_runs(task.id)}
    for run_id, failed in exit_codes.items():
        expected = RunStatus.FAILED if failed else RunStatus.SUCCEEDED
        assert (stored[run_id].status, stored[run_id].exit_code) == (expected, int(failed))
    async with engine.sessions() as session:
        events = await queries.events_after(session, task.id, 0, 10_000)
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    by_run: dict[str, list[str]] = {}
    for e in events:
        if e.kind == "run":
            by_run.setdefault(e.data["run_id"], []).append(e.data["status"])
    for run_id, failed in exit_codes.items():
        final = RunStatus.FAILED if failed else RunStatus.SUCCEEDED
        assert by_run[run_id] == [RunStatus.DISPATCHED, final]
    assert events[-1].kind == "task" and events[-1].data["status"] == TaskStatus.FAILED


async def test_a_batch_move_skips_runs_for_which_it_is_illegal(engine: Engine) -> None:
    task = await engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(groups=("small",)))
    )
    runs = await engine.tasks.list_runs(task.id)
    done, waiting = runs[0], runs[1:]
    await (await engine.report(_finished(done.host, done.id, 0)))
    async with engine.sessions() as session:
        before = len(await queries.events_after(session, task.id, 0, 10_000))
    async with engine.write() as changes:
        loaded = await queries.runs_by_id(changes.session, [run.id for run in runs])
        moved = await changes.move_all(list(loaded.values()), RunStatus.RUNNING)
    # dispatched → running is legal; succeeded → running is not: that run and its events stay.
    assert sorted(run.id for run in moved) == sorted(run.id for run in waiting)
    stored = {run.id: run.status for run in await engine.tasks.list_runs(task.id)}
    assert stored[done.id] == RunStatus.SUCCEEDED
    assert {stored[run.id] for run in waiting} == {RunStatus.RUNNING}
    async with engine.sessions() as session:
        events = await queries.events_after(session, task.id, 0, 10_000)
    new_runs = [e.data["run_id"] for e in events[before:] if e.kind == "run"]
    assert sorted(new_runs) == sorted(run.id for run in waiting)


class _TaskCountingLink(MemoryLink):
    """Records the most tasks alive while a command is being sent, and every command sent."""

    def __init__(self) -> None:
        super().__init__()
        self.most_tasks = 0
        self.sent: list[str] = []

    def is_connected(self, hostname: str) -> bool:
        return True

    async def send_command(self, hostname: str, command: CommandEnvelope) -> None:
        self.most_tasks = max(self.most_tasks, len(asyncio.all_tasks()))
        await asyncio.sleep(0)  # a write that waits, as a stream's does
        self.sent.append(command.run_id)


async def _tasks_to_send(hosts: int) -> tuple[int, list[str]]:
    """(most tasks alive, run ids sent) of sending one command to each of ``hosts`` hosts."""
    link = _TaskCountingLink()

    def no_writes() -> Any:
        raise AssertionError("every send succeeds: nothing to write")

    dispatcher = Dispatcher(no_writes, {"grpc": link}, max_in_flight_sends=8)
    plan = DispatchPlan(
        unicast=[
            Dispatch("grpc", f"h{i}", CommandEnvelope("t", f"r{i}", 1, "true", 10))
            for i in range(hosts)
        ]
    )
    await dispatcher.send(plan)
    return link.most_tasks, link.sent


async def test_a_broadcast_is_sent_by_a_bounded_number_of_tasks_whatever_the_fleet() -> None:
    small, small_sent = await _tasks_to_send(100)
    big, big_sent = await _tasks_to_send(1000)
    # Each run exactly once.
    assert sorted(small_sent) == sorted(f"r{i}" for i in range(100))
    assert sorted(big_sent) == sorted(f"r{i}" for i in range(1000))
    # One task per run used to mean a thousand tasks alive for a thousand hosts; the senders
    # are bounded by max_in_flight_sends, so ten times the hosts takes the same tasks.
    assert big == small
    # This test's task, the one gathering the senders, and the 8 senders.
    assert big <= len(asyncio.all_tasks()) + 1 + 8
