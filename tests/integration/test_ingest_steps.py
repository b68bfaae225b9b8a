"""Ingest hands the event loop back while it applies a large batch (docs/reliability.md,
scenario 8): a flood of small output chunks is a batch of a thousand reports, and applying
them in one step held the API and the links for 40-60 ms of CPU, several times that in wall
time on a busy machine."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.engine.ingest import EARLY_MAX_CHUNKS, gap_marker
from opsplane.transport.base import RunOutput, RunStarted
from opsplane.transport.memory import MemoryLink

REPORTS = 2000
CHUNK = b"opsplane flood 0123456789abcdef\n" * 32  # 1 KiB of lines, as ``yes`` prints them
# CPU time of the event loop's thread in one step (measured: about 6 ms with the fix, 80 ms
# without). CPU time, not wall time: a busy machine stretches a step, not what it does.
LONGEST_STEP = 0.025


@pytest.fixture(autouse=True)
def frozen_heap() -> Iterator[None]:
    """The collector as the server sets it up (``cli.processes.prepare_to_serve``): what
    exists before serving is frozen. Otherwise a full collection walks all of pytest's objects
    inside some step of the loop and that step is what gets measured."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    link = MemoryLink()
    settings = load_settings(data_dir=tmp_path, lost_grace=60.0, ingest_batch_size=REPORTS)
    the_engine = make_engine(settings, [link])
    await the_engine.start()
    await link.connect("web-1", ["web"])
    try:
        yield the_engine
    finally:
        await the_engine.stop()


async def test_a_batch_of_many_chunks_is_applied_in_short_steps(engine: Engine) -> None:
    task = await engine.tasks.create_task(
        TaskRequest(command="yes", targets=Targets(hosts=("web-1",)))
    )
    run_id = (await engine.tasks.list_runs(task.id))[0].id
    await (await engine.report(RunStarted("web-1", run_id, datetime.now(UTC))))
    steps: list[float] = []

    async def step_lengths() -> None:
        last = time.thread_time()
        while True:
            await asyncio.sleep(0)
            now = time.thread_time()
            steps.append(now - last)
            last = now

    # Queued in one go (queueing never waits here): ingest takes them as one batch.
    written = [
        await engine.report(RunOutput("web-1", run_id, "stdout", seq, CHUNK))
        for seq in range(1, REPORTS + 1)
    ]
    watcher = asyncio.create_task(step_lengths())
    try:
        await asyncio.gather(*written)
    finally:
        watcher.cancel()
    assert max(steps) < LONGEST_STEP, f"{max(steps) * 1000:.0f} ms"
    await engine.ingest.archived()
    log = await engine.archive.read(engine.archive.path_for(task.id, run_id, task.created_at))
    assert log == CHUNK * REPORTS


async def test_chunks_released_after_gaps_are_applied_in_short_steps(engine: Engine) -> None:
    """An agent whose spool overflowed under a flood leaves gaps in ``seq``: chunks after a gap
    wait (early), and once too many wait, all of them are placed at once with a marker per
    gap. That release, hundreds of chunks and gaps for one report, was one step of the loop
    (20-60 ms of CPU under the 1 GiB flood)."""
    task = await engine.tasks.create_task(
        TaskRequest(command="yes", targets=Targets(hosts=("web-1",)))
    )
    run_id = (await engine.tasks.list_runs(task.id))[0].id
    await (await engine.report(RunStarted("web-1", run_id, datetime.now(UTC))))
    steps: list[float] = []

    async def step_lengths() -> None:
        last = time.thread_time()
        while True:
            await asyncio.sleep(0)
            now = time.thread_time()
            steps.append(now - last)
            last = now

    # One chunk in four lost: a gap before every third one that arrives.
    sent = [seq for seq in range(1, REPORTS * 4 // 3 + 1) if seq % 4]
    written = [
        await engine.report(RunOutput("web-1", run_id, "stdout", seq, CHUNK)) for seq in sent
    ]
    watcher = asyncio.create_task(step_lengths())
    try:
        await asyncio.gather(*written)
    finally:
        watcher.cancel()
    assert max(steps) < LONGEST_STEP, f"{max(steps) * 1000:.0f} ms"
    await engine.ingest.archived()
    log = await engine.archive.read(engine.archive.path_for(task.id, run_id, task.created_at))
    # Chunks after a gap are placed EARLY_MAX_CHUNKS + 1 at a time, a marker for each gap;
    # the last ones still wait for the chunk before them (the run goes on).
    placed = log.count(CHUNK)
    assert log.replace(gap_marker(1), b"") == CHUNK * placed
    assert placed >= len(sent) - EARLY_MAX_CHUNKS - 1
    assert log.startswith(CHUNK * 3 + gap_marker(1) + CHUNK * 3 + gap_marker(1))
