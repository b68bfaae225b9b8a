"""Schedules on a real database (issue 20): a stepped clock for the policies, two engines on one
database that never fire a due time twice, and one schedule in real time over the API."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from opsplane.config import load_settings
from opsplane.domain.targeting import Targets
from opsplane.domain.templates import ParamSpec, TemplateSpec
from opsplane.engine.core import Engine
from opsplane.engine.schedules import ScheduleService, ScheduleSpec
from opsplane.store.tables import ScheduleFireRow, TaskRow
from opsplane.transport.base import RunFinished
from opsplane.transport.memory import MemoryLink
from tests.integration.apps import running_engine
from tests.integration.databases import backend_params, throwaway_database
from tests.integration.reports import report_result
from tests.integration.test_templates_api import RESTART_WEB, api

TEMPLATE = TemplateSpec(
    name="tick",
    command='echo "$PARAM_WHO"',
    targets=Targets(groups=("web",)),
    parameters=(ParamSpec.parse({"name": "who", "default": "cron"}),),
)


class Clock:
    """A controllable clock, an hour behind the real one (task rows carry real times)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)

    def __call__(self) -> datetime:
        return self.now

    def step(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
async def one(tmp_path: Path) -> AsyncIterator[tuple[Engine, MemoryLink]]:
    link = MemoryLink()
    settings = load_settings(data_dir=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path}/d.db")
    async with running_engine(settings, [link]) as engine:
        # The test drives its own service with a stepped clock; the real-time loop stays out.
        await engine.schedules.stop()
        await link.connect("web-1", ["web"])
        await engine.templates.create(TEMPLATE, by="test")
        yield engine, link


def _service(engine: Engine, clock: Clock) -> ScheduleService:
    return ScheduleService(
        engine.sessions, engine.write, engine.templates, engine.secrets, clock=clock
    )


async def _outcomes(service: ScheduleService, schedule_id: str) -> list[tuple[float, str]]:
    fires = await service.history(schedule_id, 1000)
    first = min(f.due_at for f in fires) if fires else None
    return (
        [((f.due_at - first).total_seconds(), f.outcome) for f in reversed(fires)] if first else []
    )


async def _finish(engine: Engine, task_id: str) -> None:
    now = datetime.now(UTC)
    for run in await engine.tasks.list_runs(task_id):
        await report_result(
            engine,
            RunFinished(
                hostname=run.host,
                run_id=run.id,
                status="succeeded",
                exit_code=0,
                stdout="",
                stderr="",
                truncated=False,
                error=None,
                started_at=now,
                finished_at=now,
                duration_ms=1,
            ),
        )


async def test_an_every_2_s_schedule_fires_once_per_due_time_under_a_stepped_clock(
    one: tuple[Engine, MemoryLink],
) -> None:
    engine, link = one
    clock = Clock()
    service = _service(engine, clock)
    schedule = await service.create(
        ScheduleSpec(template="tick", params={"who": "me"}, interval_seconds=2), by="test"
    )
    assert [(t - clock.now).total_seconds() for t in schedule.next_fire_times] == [2, 4, 6, 8, 10]
    for _ in range(40):  # 20 s in 0.5 s ticks; each due time is looked at up to 4 times
        clock.step(0.5)
        await service.run_once()
        # The launched task ends before the next due time: no overlap.
        last = (await service.get(schedule.id)).last_task_id
        if last is not None:
            await _finish(engine, last)
    outcomes = await _outcomes(service, schedule.id)
    assert outcomes == [(2.0 * k, "launched") for k in range(10)]
    assert len(link.hosts["web-1"].commands) == 10
    assert {c.env["PARAM_WHO"] for c in link.hosts["web-1"].commands} == {"me"}


async def test_overlap_skip_skips_while_the_previous_launch_runs(
    one: tuple[Engine, MemoryLink],
) -> None:
    engine, _link = one
    clock = Clock()
    service = _service(engine, clock)
    schedule = await service.create(
        ScheduleSpec(template="tick", params={}, interval_seconds=10, overlap="skip"), by="test"
    )
    for _ in range(3):  # 10 s: launched (and left running); 20 s, 30 s: skipped
        clock.step(10)
        await service.run_once()
    first = (await service.get(schedule.id)).last_task_id
    assert first is not None
    await _finish(engine, first)
    clock.step(10)
    await service.run_once()
    assert await _outcomes(service, schedule.id) == [
        (0.0, "launched"), (10.0, "skipped"), (20.0, "skipped"), (30.0, "launched"),
    ]  # fmt: skip


async def test_overlap_queue_holds_the_due_time_and_runs_it_once_when_the_previous_ends(
    one: tuple[Engine, MemoryLink],
) -> None:
    engine, _link = one
    clock = Clock()
    service = _service(engine, clock)
    schedule = await service.create(
        ScheduleSpec(template="tick", params={}, interval_seconds=10, overlap="queue"), by="test"
    )
    for _ in range(4):  # 10 s: launched; 20 s held; 30 s, 40 s pass while it is held
        clock.step(10)
        await service.run_once()
    assert await _outcomes(service, schedule.id) == [(0.0, "launched")]
    first = (await service.get(schedule.id)).last_task_id
    assert first is not None
    await _finish(engine, first)
    clock.step(5)  # 45 s
    await service.run_once()
    # The held due time runs once (at the latest one passed), the others folded into it.
    assert await _outcomes(service, schedule.id) == [
        (0.0, "launched"), (10.0, "missed"), (30.0, "launched"),
    ]  # fmt: skip


async def test_misfire_policies_after_the_control_plane_was_down(
    one: tuple[Engine, MemoryLink],
) -> None:
    engine, _link = one
    clock = Clock()
    service = _service(engine, clock)
    skip = await service.create(
        ScheduleSpec(template="tick", params={}, interval_seconds=60, misfire="skip"), by="t"
    )
    once = await service.create(
        ScheduleSpec(
            template="tick", params={}, interval_seconds=60, misfire="run_once",
            misfire_window=600,
        ),
        by="t",
    )  # fmt: skip
    clock.step(60 * 5 + 45)  # down for five due times; the latest is 45 s old
    await service.run_once()
    assert await _outcomes(service, skip.id) == [(0.0, "missed")]
    assert await _outcomes(service, once.id) == [(0.0, "missed"), (240.0, "launched")]
    history = await service.history(skip.id)
    assert history[0].detail is not None and history[0].detail.startswith("5 due time(s)")


async def test_a_paused_schedule_fires_nothing_and_resumes_from_now(
    one: tuple[Engine, MemoryLink],
) -> None:
    engine, _link = one
    clock = Clock()
    service = _service(engine, clock)
    schedule = await service.create(
        ScheduleSpec(template="tick", params={}, interval_seconds=10), by="t"
    )
    paused = await service.update(schedule.id, {"paused": True})
    assert paused.paused and paused.next_fire_times == []
    clock.step(35)
    await service.run_once()
    resumed = await service.update(schedule.id, {"paused": False})
    assert resumed.next_fire_times[0] == clock.now + timedelta(seconds=5)
    clock.step(5)
    await service.run_once()
    assert await _outcomes(service, schedule.id) == [(0.0, "launched")]


@pytest.mark.parametrize("backend", backend_params())
async def test_two_engines_on_one_database_never_fire_a_due_time_twice(
    backend: str, tmp_path: Path
) -> None:
    async with throwaway_database(backend, tmp_path, migrated=True) as url:
        links = [MemoryLink(), MemoryLink()]
        settings = [
            load_settings(data_dir=tmp_path / name, database_url=url) for name in ("a", "b")
        ]
        async with (
            running_engine(settings[0], [links[0]]) as a,
            running_engine(settings[1], [links[1]]) as b,
        ):
            for engine, link in ((a, links[0]), (b, links[1])):
                await engine.schedules.stop()
                await link.connect("web-1", ["web"])
            await a.templates.create(TEMPLATE, by="test")
            clock = Clock()
            services = [_service(a, clock), _service(b, clock)]
            schedule = await services[0].create(
                ScheduleSpec(template="tick", params={}, interval_seconds=2, overlap="queue"),
                by="test",
            )
            for _ in range(20):  # 10 s in 0.5 s ticks, both instances looking at once
                clock.step(0.5)
                await asyncio.gather(*(s.run_once() for s in services))
                last = (await services[1].get(schedule.id)).last_task_id
                if last is not None and (await a.tasks.get_task(last)).status == "running":
                    await _finish(a, last)
            outcomes = await _outcomes(services[1], schedule.id)
            async with a.sessions() as session:
                tasks = await session.scalar(
                    select(func.count()).select_from(TaskRow).where(TaskRow.template == "tick")
                )
                fires = await session.scalar(
                    select(func.count())
                    .select_from(ScheduleFireRow)
                    .where(ScheduleFireRow.outcome == "launched")
                )
    assert outcomes == [(2.0 * k, "launched") for k in range(5)]
    assert tasks == fires == 5
    # Each due time reached the host once, from one instance or the other.
    assert sum(len(link.hosts["web-1"].commands) for link in links) == 5


async def test_a_schedule_every_2_s_in_real_time_over_the_api(tmp_path: Path) -> None:
    async with api(tmp_path) as (app, link, client):
        engine: Engine = app.state.engine
        assert (await client.post("/api/v1/templates", json=RESTART_WEB)).status_code == 201
        body = {"template": "restart-web", "params": {"mode": "soft"}, "interval_seconds": 2}
        created = await client.post("/api/v1/schedules", json=body)
        assert created.status_code == 201, created.text
        began = time.monotonic()
        schedule = created.json()
        times = [datetime.fromisoformat(t) for t in schedule["next_fire_times"]]
        assert [(b - a).total_seconds() for a, b in itertools.pairwise(times)] == [2.0] * 4
        path = f"/api/v1/schedules/{schedule['id']}"
        while time.monotonic() - began < 7.2:
            await asyncio.sleep(0.2)
            # The host answers each launch at once (the memory link has no agent).
            for task in await engine.tasks.tasks_named(
                "restart-web", ended_after=datetime.now(UTC)
            ):
                if task.status == "running":
                    await _finish(engine, task.id)
        paused = await client.patch(path, json={"paused": True})
        elapsed = time.monotonic() - began
        assert paused.status_code == 200 and paused.json()["paused"] is True
        history = (await client.get(f"{path}/history")).json()["items"]
        launched = [h for h in history if h["outcome"] == "launched"]
        # Due at 2, 4, 6 s; the loop looks every second, so the last may be a tick late.
        assert int(elapsed // 2) - 1 <= len(launched) <= int(elapsed // 2), (elapsed, history)
        assert len(launched) >= 3
        assert all(h["task_id"] and h["task_status"] for h in launched)
        assert len(link.hosts["web-1"].commands) == len(launched)
        audited = (await client.get("/api/v1/audit", params={"action": "schedule.launch"})).json()
        records = audited["items"] if isinstance(audited, dict) else audited
        assert sorted(r["target"] for r in records) == sorted(h["task_id"] for h in launched)
        assert {r["actor"] for r in records} == {f"schedule:{schedule['id']}"}
        await asyncio.sleep(2.5)
        after = (await client.get(f"{path}/history")).json()["items"]
        assert len(after) == len(history), "a paused schedule fired"
        listed = (await client.get("/api/v1/schedules")).json()["items"]
        assert [s["id"] for s in listed] == [schedule["id"]]
        busy = await client.delete("/api/v1/templates/restart-web")
        assert busy.status_code == 409 and schedule["id"] in busy.json()["detail"]
        assert (await client.delete(path)).status_code == 204
        assert (await client.get(path)).status_code == 404
        unknown = await client.post("/api/v1/schedules", json={**body, "template": "nope"})
        assert unknown.status_code == 404
        bad_param = await client.post("/api/v1/schedules", json={**body, "params": {"m": 1}})
        assert bad_param.status_code == 422 and "m" in bad_param.json()["detail"]
        bad_cron = await client.post(
            "/api/v1/schedules",
            json={**body, "interval_seconds": None, "cron": "*/5 * * *"},
        )
        assert bad_cron.status_code == 422 and "cron" in bad_cron.json()["detail"]
        berlin = await client.post(
            "/api/v1/schedules",
            json={
                **body, "interval_seconds": None, "cron": "*/5 * * * *",
                "timezone": "Europe/Berlin",
            },
        )  # fmt: skip
        assert berlin.status_code == 201, berlin.text
        first = datetime.fromisoformat(berlin.json()["next_fire_times"][0])
        assert first.minute % 5 == 0 and first.second == 0
