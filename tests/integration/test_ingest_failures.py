"""Ingest survives what hosts send and what the disk does (issue 13, defect 3): a report it
cannot take fails alone, an archive error keeps the database effect, and a loop that crashes
is restarted and shown by /readyz. On every database backend, the in-memory link for agents."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from opsplane.app_factory import create_app, make_engine
from opsplane.config import load_settings
from opsplane.domain.errors import ReportRejected
from opsplane.domain.states import RunStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.background import Supervised
from opsplane.engine.core import Engine
from opsplane.transport.base import HeartbeatReport, RunFinished, RunOutput, RunStarted
from opsplane.transport.memory import MemoryLink
from tests.e2e.fleet import free_port

WAIT = 10.0


@pytest.fixture
async def engine(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    # A linger, so that reports sent together are written in one batch.
    settings = load_settings(
        data_dir=tmp_path, database_url=database_url, heartbeat_interval=30.0, ingest_linger=0.2
    )
    the_engine = make_engine(settings, [link])
    await the_engine.start()
    await link.connect("web-1", ["web"])
    await link.connect("web-2", ["web"])
    try:
        yield the_engine
    finally:
        await the_engine.stop()


def _finished(host: str, run_id: str, status: str = "succeeded") -> RunFinished:
    now = datetime.now(UTC)
    return RunFinished(
        hostname=host, run_id=run_id, status=status, exit_code=0, stdout="ok\n", stderr="",
        truncated=False, error=None, started_at=now, finished_at=now, duration_ms=1,
    )  # fmt: skip


async def _two_runs(engine: Engine) -> tuple[str, dict[str, str]]:
    task = await engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(groups=("web",)))
    )
    runs = {run.host: run.id for run in await engine.tasks.list_runs(task.id)}
    return task.id, runs


async def _status(engine: Engine, task_id: str, run_id: str) -> str:
    return str((await engine.tasks.get_run(task_id, run_id)).status)


async def test_a_result_with_an_unknown_status_is_refused_and_counted_and_ingest_goes_on(
    engine: Engine,
) -> None:
    task_id, runs = await _two_runs(engine)
    bad = await engine.report(_finished("web-1", runs["web-1"], status="exploded"))
    with pytest.raises(ReportRejected, match="exploded"):
        await asyncio.wait_for(bad, WAIT)
    assert engine.refused[("engine", "malformed")] == 1
    # Later results and heartbeats are written.
    await asyncio.wait_for(await engine.report(_finished("web-2", runs["web-2"])), WAIT)
    await asyncio.wait_for(
        await engine.report(HeartbeatReport("web-1", datetime.now(UTC), 1.0, 2.0)), WAIT
    )
    assert await _status(engine, task_id, runs["web-2"]) == RunStatus.SUCCEEDED
    assert await _status(engine, task_id, runs["web-1"]) == RunStatus.DISPATCHED
    assert engine.loops.problems() == {}


async def test_a_report_ingest_cannot_apply_fails_alone_and_the_rest_of_its_batch_is_written(
    engine: Engine,
) -> None:
    task_id, runs = await _two_runs(engine)
    # Past the link's checks (a link of ours built it wrong): straight into ingest, in one batch
    # with good reports.
    started = await engine.ingest.report(RunStarted("web-2", runs["web-2"], datetime.now(UTC)))
    bad = await engine.ingest.report(_finished("web-1", runs["web-1"], status="exploded"))
    beat = await engine.ingest.report(HeartbeatReport("web-1", datetime.now(UTC), 7.0, 8.0))
    good = await engine.ingest.report(_finished("web-2", runs["web-2"]))
    with pytest.raises(ReportRejected, match="exploded"):
        await asyncio.wait_for(bad, WAIT)
    await asyncio.wait_for(asyncio.gather(started, beat, good), WAIT)
    assert await _status(engine, task_id, runs["web-2"]) == RunStatus.SUCCEEDED
    assert (await engine.hosts.get_host("web-1")).cpu_usage == 7.0
    assert engine.refused[("ingest", "unprocessable")] == 1
    # The loop lives on: the offender's run can still end.
    await asyncio.wait_for(await engine.report(_finished("web-1", runs["web-1"])), WAIT)
    assert await _status(engine, task_id, runs["web-1"]) == RunStatus.SUCCEEDED


async def test_an_archive_error_keeps_the_result_and_ingest_goes_on(
    engine: Engine, tmp_path: Path
) -> None:
    task_id, runs = await _two_runs(engine)
    # The archive cannot be written: its directory is a file (as good as a full disk).
    logs = engine.archive.logs_dir
    shutil.rmtree(logs, ignore_errors=True)
    logs.write_bytes(b"not a directory")
    for host in ("web-1", "web-2"):
        output = RunOutput(host, runs[host], "stdout", 1, b"hello\n")
        await asyncio.wait_for(await engine.report(output), WAIT)
    await asyncio.wait_for(await engine.report(_finished("web-1", runs["web-1"])), WAIT)
    assert await _status(engine, task_id, runs["web-1"]) == RunStatus.SUCCEEDED
    assert engine.ingest.archive_failures >= 1
    # The disk is back: the next output is archived.
    logs.unlink()
    await asyncio.wait_for(
        await engine.report(RunOutput("web-2", runs["web-2"], "stdout", 2, b"again\n")), WAIT
    )
    await asyncio.wait_for(await engine.report(_finished("web-2", runs["web-2"])), WAIT)
    run = await engine.tasks.get_run(task_id, runs["web-2"])
    assert run.log_path and await engine.archive.read(Path(run.log_path)) == b"again\n"
    assert engine.loops.problems() == {}


async def test_a_crashed_loop_is_restarted_with_backoff() -> None:
    calls: list[float] = []
    recovered = asyncio.Event()

    async def body() -> None:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) < 3:
            raise RuntimeError(f"crash {len(calls)}")
        recovered.set()
        await asyncio.Event().wait()

    crashes: list[BaseException] = []
    loop = Supervised("flaky", body, initial_backoff=0.05, on_crash=crashes.append)
    loop.start()
    try:
        await asyncio.wait_for(recovered.wait(), WAIT)
        assert [str(e) for e in crashes] == ["crash 1", "crash 2"]
        assert (loop.state, loop.restarts) == ("running", 2)
        assert loop.last_error == "RuntimeError: crash 2"
        # The second wait was twice the first.
        assert calls[2] - calls[1] >= 2 * 0.05 * 0.9
    finally:
        await loop.stop()
    assert loop.state == "stopped"


async def test_readyz_names_a_background_loop_that_is_down(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, grpc_listen=f"127.0.0.1:{free_port()}")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        engine: Engine = app.state.engine
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/readyz")).status_code == 200

            async def broken() -> None:
                raise OSError("disk on fire")

            loop = engine.loops.add(Supervised("broken", broken, initial_backoff=30.0))
            loop.start()
            try:
                await asyncio.sleep(0.05)
                answer = await client.get("/readyz")
                assert answer.status_code == 503
                assert answer.json()["status"] == "degraded"
                assert "broken restarting after OSError: disk on fire" in answer.json()["detail"]
            finally:
                await loop.stop()
            assert (await client.get("/readyz")).status_code == 200


async def test_a_heartbeat_does_not_wait_behind_queued_run_reports(
    tmp_path: Path, database_url: str, link: MemoryLink
) -> None:
    settings = load_settings(
        data_dir=tmp_path, database_url=database_url, heartbeat_interval=30.0, ingest_batch_size=10
    )
    engine = make_engine(settings, [link])
    await engine.start()
    try:
        await link.connect("web-1", ["web"])
        await link.connect("web-2", ["web"])
        _, runs = await _two_runs(engine)
        done: list[str] = []
        futures = []
        # The database is busy (another writer holds the lock) while output piles up.
        async with engine._write_lock:
            for seq in range(200):
                output = RunOutput("web-1", runs["web-1"], "stdout", seq, b"line\n")
                future = await engine.report(output)
                future.add_done_callback(lambda _f: done.append("output"))
                futures.append(future)
            beat = await engine.report(HeartbeatReport("web-2", datetime.now(UTC), 3.0, 4.0))
            beat.add_done_callback(lambda _f: done.append("heartbeat"))
        await asyncio.wait_for(asyncio.gather(beat, *futures), WAIT)
        # Written with the first batches, not after the 200 reports queued before it.
        assert done.index("heartbeat") <= 20, done.index("heartbeat")
        assert (await engine.hosts.get_host("web-2")).cpu_usage == 3.0
    finally:
        await engine.stop()
