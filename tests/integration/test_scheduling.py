"""The scheduler over every supported database, with the in-memory link standing in for agents:
priority under shared limits, retries, max_concurrency, max_errors, canary rollout, delivery
deadlines, task deadlines and re-runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.errors import Conflict
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.store.tables import RunRow
from opsplane.transport.base import RunFinished
from opsplane.transport.memory import MemoryLink
from tests.integration.reports import report_result, task_status
from tests.integration.test_heartbeats import StreamLink

HOSTS = ("db-1", "web-1", "web-2")
T = TypeVar("T")


@pytest.fixture
async def link() -> MemoryLink:
    # The scheduler is under test, not liveness: hosts stay online while connected, as a gRPC
    # agent's do while its stream is open. Without heartbeats the monitor would call them
    # silent after 0.6 s and their runs lost 2 s later, racing the deadlines tested here.
    return StreamLink()


async def _engine(
    tmp_path: Path, database_url: str, link: MemoryLink, **settings: object
) -> Engine:
    engine = make_engine(
        load_settings(
            data_dir=tmp_path,
            database_url=database_url,
            heartbeat_interval=0.2,
            lost_grace=2.0,
            **settings,
        ),
        [link],
    )
    await engine.start()
    for host in HOSTS:
        await link.connect(host, [host.split("-")[0]])
    return engine


@pytest.fixture
async def engine(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    the_engine = await _engine(tmp_path, database_url, link)
    try:
        yield the_engine
    finally:
        await the_engine.stop()


@pytest.fixture
async def one_slot(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    the_engine = await _engine(tmp_path, database_url, link, max_running_runs=1)
    try:
        yield the_engine
    finally:
        await the_engine.stop()


def _request(
    command: str = "true", policy: TaskPolicy | None = None, **targets: object
) -> TaskRequest:
    return TaskRequest(command=command, targets=Targets(**targets), policy=policy)  # type: ignore[arg-type]


async def _finish(engine: Engine, run: RunRow, status: str = "succeeded") -> None:
    now = datetime.now(UTC)
    await report_result(engine,
        RunFinished(
            hostname=run.host, run_id=run.id, status=status,
            exit_code=0 if status == "succeeded" else 1, stdout="", stderr="", truncated=False,
            error=None, started_at=now, finished_at=now, duration_ms=1,
        )
    )  # fmt: skip


async def _latest(engine: Engine, task_id: str) -> dict[str, RunRow]:
    return {run.host: run for run in await engine.tasks.list_runs(task_id) if not run.superseded}


async def _eventually(probe: Callable[[], Awaitable[T | None]], what: str, limit: float = 5) -> T:
    async with asyncio.timeout(limit):
        while True:
            value = await probe()
            if value:
                return value
            await asyncio.sleep(0.05)
    raise AssertionError(what)  # pragma: no cover (the timeout raises first)


async def _dispatched(engine: Engine, task_id: str, host: str) -> RunRow:
    async def probe() -> RunRow | None:
        run = (await _latest(engine, task_id)).get(host)
        return run if run is not None and run.status == RunStatus.DISPATCHED else None

    return await _eventually(probe, f"{host}'s run of {task_id} to be dispatched")


async def _ended(engine: Engine, task_id: str) -> TaskStatus:
    async def probe() -> TaskStatus | None:
        status = await task_status(engine, task_id)
        return status if status not in (TaskStatus.PENDING, TaskStatus.RUNNING) else None

    return await _eventually(probe, f"task {task_id} to end")


async def test_higher_priority_goes_first_when_capacity_is_short(one_slot: Engine) -> None:
    engine = one_slot
    blocker = await engine.tasks.create_task(_request(hosts=("web-1",)))
    blocking = await _dispatched(engine, blocker.id, "web-1")
    low_a = await engine.tasks.create_task(_request(hosts=("web-2",)))
    low_b = await engine.tasks.create_task(_request(hosts=("db-1",)))
    high = await engine.tasks.create_task(
        _request(hosts=("db-1",), policy=TaskPolicy.parse(priority=5))
    )
    await asyncio.sleep(0.5)
    waiting = [await _latest(engine, t.id) for t in (low_a, low_b, high)]
    assert all(r.status == RunStatus.PENDING for runs in waiting for r in runs.values()), (
        "nothing goes while the only slot is taken"
    )
    order = []
    await _finish(engine, blocking)
    for _ in range(3):
        run = await _eventually(
            lambda: _any_dispatched(engine, [high.id, low_a.id, low_b.id]), "the next run to go"
        )
        order.append(run.task_id)
        await _finish(engine, run)
        await _ended(engine, run.task_id)
    assert order == [high.id, low_a.id, low_b.id]


async def _any_dispatched(engine: Engine, task_ids: list[str]) -> RunRow | None:
    for task_id in task_ids:
        for run in (await _latest(engine, task_id)).values():
            if run.status == RunStatus.DISPATCHED:
                return run
    return None


async def test_a_flaky_run_succeeds_on_its_third_attempt(engine: Engine) -> None:
    policy = TaskPolicy.parse(retries={"max_attempts": 3, "backoff_seconds": 0})
    task = await engine.tasks.create_task(_request(hosts=("db-1",), policy=policy))
    for attempt in (1, 2):
        run = await _dispatched(engine, task.id, "db-1")
        assert run.attempt == attempt
        await _finish(engine, run, "failed")
    last = await _dispatched(engine, task.id, "db-1")
    assert last.attempt == 3
    assert await task_status(engine, task.id) == TaskStatus.RUNNING
    await _finish(engine, last)
    assert await _ended(engine, task.id) == TaskStatus.SUCCEEDED
    runs = sorted(await engine.tasks.list_runs(task.id), key=lambda r: r.attempt)
    assert [(r.attempt, r.status, r.superseded) for r in runs] == [
        (1, "failed", True),
        (2, "failed", True),
        (3, "succeeded", False),
    ]
    counts = (await engine.tasks.get_task(task.id)).counts
    assert counts == {"succeeded": 1}


async def test_retries_stop_after_max_attempts_and_wait_for_their_backoff(engine: Engine) -> None:
    policy = TaskPolicy.parse(retries={"max_attempts": 2, "backoff_seconds": 0.5, "on": ["failed"]})
    task = await engine.tasks.create_task(_request(hosts=("db-1",), policy=policy))
    await _finish(engine, await _dispatched(engine, task.id, "db-1"), "failed")
    waiting = (await _latest(engine, task.id))["db-1"]
    assert (waiting.attempt, waiting.status) == (2, RunStatus.PENDING)
    assert waiting.not_before is not None
    second = await _dispatched(engine, task.id, "db-1")
    assert second.dispatched_at is not None and second.dispatched_at >= waiting.not_before
    await _finish(engine, second, "failed")
    assert await _ended(engine, task.id) == TaskStatus.FAILED
    assert len(await engine.tasks.list_runs(task.id)) == 2


async def test_max_errors_stops_the_fan_out(engine: Engine) -> None:
    policy = TaskPolicy.parse(max_concurrency=1, max_errors=1)
    task = await engine.tasks.create_task(_request(all=True, policy=policy))
    runs = await _latest(engine, task.id)
    assert [r.status for r in runs.values()].count(RunStatus.DISPATCHED) == 1
    first = await _dispatched(engine, task.id, "db-1")
    await _finish(engine, first, "failed")
    assert await _ended(engine, task.id) == TaskStatus.FAILED
    runs = await _latest(engine, task.id)
    assert {h: r.status for h, r in runs.items()} == {
        "db-1": "failed",
        "web-1": "canceled",
        "web-2": "canceled",
    }
    assert (runs["web-1"].error or "").startswith("max_errors reached: 1 errors (limit 1)")
    assert (await engine.tasks.get_task(task.id)).stop_reason == "max_errors"


async def test_max_concurrency_as_a_percentage_paces_the_task(engine: Engine) -> None:
    task = await engine.tasks.create_task(
        _request(all=True, policy=TaskPolicy.parse(max_concurrency="50%"))
    )
    runs = await _latest(engine, task.id)
    sent = [r for r in runs.values() if r.status == RunStatus.DISPATCHED]
    assert len(sent) == 2  # ceil(3 x 50%)
    await _finish(engine, sent[0])
    waiting = next(h for h, r in runs.items() if r.status == RunStatus.PENDING)
    await _dispatched(engine, task.id, waiting)


async def test_canary_goes_first_and_the_rest_only_after_it_succeeded(
    engine: Engine, link: MemoryLink
) -> None:
    policy = TaskPolicy.parse(rollout={"canary": 1, "then": 1})
    task = await engine.tasks.create_task(_request(all=True, policy=policy))
    canary = await _dispatched(engine, task.id, "db-1")
    assert [r.status for r in (await _latest(engine, task.id)).values()].count("pending") == 2
    await _finish(engine, canary)
    second = await _dispatched(engine, task.id, "web-1")
    assert (await _latest(engine, task.id))["web-2"].status == RunStatus.PENDING
    await _finish(engine, second)
    await _finish(engine, await _dispatched(engine, task.id, "web-2"))
    assert await _ended(engine, task.id) == TaskStatus.SUCCEEDED


async def test_a_failed_canary_cancels_the_rest(engine: Engine) -> None:
    task = await engine.tasks.create_task(
        _request(all=True, policy=TaskPolicy.parse(rollout={"canary": 1}))
    )
    await _finish(engine, await _dispatched(engine, task.id, "db-1"), "failed")
    assert await _ended(engine, task.id) == TaskStatus.FAILED
    runs = await _latest(engine, task.id)
    assert runs["web-1"].status == runs["web-2"].status == RunStatus.CANCELED
    assert (runs["web-2"].error or "").startswith("canary failed (db-1 failed)")


async def test_a_delayed_run_goes_when_its_host_returns(engine: Engine, link: MemoryLink) -> None:
    await link.disconnect("web-2")
    task = await engine.tasks.create_task(
        _request(hosts=("web-2",), policy=TaskPolicy.parse(delivery_deadline=60))
    )
    assert (await _latest(engine, task.id))["web-2"].status == RunStatus.DELAYED
    await link.connect("web-2", ["web"])
    run = await _dispatched(engine, task.id, "web-2")
    assert run.error is None
    assert link.hosts["web-2"].commands[-1].deliver_by is not None


async def test_a_delayed_run_is_undeliverable_after_the_delivery_deadline(
    engine: Engine, link: MemoryLink
) -> None:
    await link.disconnect("web-2")
    task = await engine.tasks.create_task(
        _request(hosts=("web-2",), policy=TaskPolicy.parse(delivery_deadline=1))
    )
    assert await _ended(engine, task.id) == TaskStatus.FAILED
    run = (await _latest(engine, task.id))["web-2"]
    assert run.status == RunStatus.UNDELIVERABLE
    assert (run.error or "").startswith("delivery deadline passed")


async def test_the_task_deadline_ends_every_unfinished_run(
    engine: Engine, link: MemoryLink
) -> None:
    policy = TaskPolicy.parse(deadline=1, max_concurrency=1)
    task = await engine.tasks.create_task(_request(groups=("web",), policy=policy))
    running = await _dispatched(engine, task.id, "web-1")
    assert await _ended(engine, task.id) == TaskStatus.TIMED_OUT
    runs = await _latest(engine, task.id)
    assert runs["web-1"].status == RunStatus.TIMED_OUT
    assert runs["web-2"].status == RunStatus.CANCELED
    assert link.hosts["web-1"].cancels == [running.id]
    stored = await engine.tasks.get_task(task.id)
    assert stored.stop_reason == "deadline" and stored.deadline_at is not None


async def test_rerun_takes_exactly_the_hosts_that_ended_so(engine: Engine) -> None:
    task = await engine.tasks.create_task(_request(all=True))
    with pytest.raises(Conflict, match="once it has ended"):
        await engine.tasks.rerun_task(task.id, "failed", created_by="test")
    runs = await _latest(engine, task.id)
    await _finish(engine, runs["db-1"], "failed")
    await _finish(engine, runs["web-1"], "timed_out")
    await _finish(engine, runs["web-2"])
    await _ended(engine, task.id)
    again = await engine.tasks.rerun_task(task.id, "failed", created_by="test")
    assert again.rerun_of == task.id and again.command == task.command
    assert set(await _latest(engine, again.id)) == {"db-1"}
    all_again = await engine.tasks.rerun_task(task.id, "all", created_by="test")
    assert set(await _latest(engine, all_again.id)) == set(HOSTS)
    with pytest.raises(Conflict, match="nothing to re-run"):
        await engine.tasks.rerun_task(task.id, "undeliverable", created_by="test")
