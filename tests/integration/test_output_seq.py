"""Output chunks are placed by ``seq`` (issue 13, defect 8): a chunk re-sent after a reconnect
is archived once, one that comes early waits for those before it, and a gap that is never
filled is marked in the archive. Over every supported database (``runs.output_seq``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.states import RunStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.engine.ingest import gap_marker
from opsplane.store.tables import RunRow
from opsplane.transport.base import RunFinished, RunOutput, RunStarted
from opsplane.transport.memory import MemoryLink
from tests.integration.reports import report_result


@pytest.fixture
async def engine(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    settings = load_settings(data_dir=tmp_path, database_url=database_url, lost_grace=60.0)
    the_engine = make_engine(settings, [link])
    await the_engine.start()
    await link.connect("web-1", ["web"])
    try:
        yield the_engine
    finally:
        await the_engine.stop()


async def _running(engine: Engine) -> tuple[str, str, datetime]:
    task = await engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(hosts=("web-1",)))
    )
    run_id = (await engine.tasks.list_runs(task.id))[0].id
    await (await engine.report(RunStarted("web-1", run_id, datetime.now(UTC))))
    return task.id, run_id, task.created_at


async def _send(engine: Engine, run_id: str, *chunks: tuple[int, bytes]) -> None:
    for seq, data in chunks:
        await (await engine.report(RunOutput("web-1", run_id, "stdout", seq, data)))


async def _finish(engine: Engine, run_id: str) -> None:
    now = datetime.now(UTC)
    await report_result(engine,
        RunFinished(
            hostname="web-1", run_id=run_id, status="succeeded", exit_code=0, stdout="",
            stderr="", truncated=False, error=None, started_at=now, finished_at=now,
            duration_ms=1,
        )
    )  # fmt: skip


async def _archived(engine: Engine, task_id: str, run_id: str, created: datetime) -> bytes:
    await engine.ingest.archived()
    return await engine.archive.read(engine.archive.path_for(task_id, run_id, created))


async def test_chunks_sent_again_after_a_reconnect_are_archived_once(engine: Engine) -> None:
    task_id, run_id, created = await _running(engine)
    await _send(engine, run_id, (1, b"one\n"), (2, b"two\n"))
    # The agent cannot know what arrived before the cut: it sends everything again.
    await _send(engine, run_id, (1, b"one\n"), (2, b"two\n"), (3, b"three\n"))
    await _finish(engine, run_id)
    assert await _archived(engine, task_id, run_id, created) == b"one\ntwo\nthree\n"


async def test_an_early_chunk_waits_for_the_one_before_it(engine: Engine) -> None:
    task_id, run_id, created = await _running(engine)
    await _send(engine, run_id, (1, b"a\n"), (3, b"c\n"), (4, b"d\n"))
    assert await _archived(engine, task_id, run_id, created) == b"a\n"
    await _send(engine, run_id, (2, b"b\n"))
    assert await _archived(engine, task_id, run_id, created) == b"a\nb\nc\nd\n"
    await _finish(engine, run_id)
    assert await _archived(engine, task_id, run_id, created) == b"a\nb\nc\nd\n"


async def test_a_gap_never_filled_is_marked_when_the_result_comes(engine: Engine) -> None:
    task_id, run_id, created = await _running(engine)
    await _send(engine, run_id, (1, b"a\n"), (4, b"d\n"))
    await _finish(engine, run_id)
    assert await _archived(engine, task_id, run_id, created) == b"a\n" + gap_marker(2) + b"d\n"
    # What comes after the result is not the run's any more.
    await _send(engine, run_id, (2, b"b\n"))
    assert await _archived(engine, task_id, run_id, created) == b"a\n" + gap_marker(2) + b"d\n"


async def test_output_of_a_run_already_lost_is_not_archived(engine: Engine) -> None:
    task_id, run_id, created = await _running(engine)
    await _send(engine, run_id, (1, b"before\n"))
    async with engine.write() as changes:
        run = await changes.session.get_one(RunRow, run_id)
        changes.move(run, RunStatus.LOST, error="gone")
    await _send(engine, run_id, (2, b"after\n"))
    await _finish(engine, run_id)
    assert (await engine.tasks.get_run(task_id, run_id)).status == RunStatus.LOST
    assert await _archived(engine, task_id, run_id, created) == b"before\n"
