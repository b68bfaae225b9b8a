"""The control plane's own timeout clock with a seed-002 agent on RabbitMQ (issue 16 item 9): an
agent written from the seed alone sends no ``started``, so its run is judged from its dispatch:
no result by timeout + ``timeout_grace`` ends it ``lost``, and a cancel is published to the
agent's queue."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.paging import PageRequest
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.security.signing import load_or_create_private_key
from opsplane.transport.amqp.link import AmqpLink
from tests.integration.seed_agent import AMQP_URL, SeedAgent, purge_shared_queues

pytestmark = pytest.mark.service("rabbitmq")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    await purge_shared_queues()
    settings = load_settings(
        data_dir=tmp_path, heartbeat_interval=1.0, require_enrollment=False, timeout_grace=1.0
    )
    key, _ = load_or_create_private_key(settings.signing_key_path)
    link = AmqpLink(AMQP_URL, signing_key=key, heartbeat_interval=1.0, offline_after_missed=3)
    the_engine = make_engine(settings, [link])
    await the_engine.start()
    try:
        yield the_engine
    finally:
        await the_engine.stop()


async def test_a_seed_agents_run_without_a_result_ends_lost_and_is_canceled(
    engine: Engine, tmp_path: Path
) -> None:
    agent = SeedAgent(f"slow-{uuid.uuid4().hex[:8]}")
    await agent.start()
    beat = asyncio.create_task(agent.beat_every(0.5))
    try:
        for _ in range(100):  # up to 10 s for its heartbeat to register the host
            if await _status(engine, agent.hostname) == "online":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the seed agent did not come online")
        # The seed agent runs it to the end (it knows no timeout) and says nothing meanwhile.
        ended = tmp_path / "ended"
        request = TaskRequest(
            command=f"sleep 5; touch {ended}", targets=Targets(hosts=(agent.hostname,)), timeout=2
        )
        task = await engine.tasks.create_task(request)
        async with asyncio.timeout(15):  # 2 s + 1 s after the dispatch, on a loaded machine
            done = await engine.wait_task(task.id)
        (run,) = await engine.tasks.list_runs(task.id)
        assert done.status == TaskStatus.FAILED
        assert run.status == RunStatus.LOST
        assert "2s + 1s after the dispatch" in (run.error or "")
        for _ in range(100):  # up to 10 s for the cancel to reach the agent's queue
            cancels = [m for m in agent.received if m.get("type") == "cancel"]
            if cancels:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"no cancel reached the agent: {agent.received}")
        (cancel,) = cancels
        assert (cancel["task_id"], cancel["run_id"]) == (task.id, run.id)
        # The seed agent knows no cancel: its command ends and its result comes, late.
        for _ in range(150):  # up to 15 s
            if ended.exists():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the seed agent's command did not end")
        await asyncio.sleep(1.0)  # its result travels and is ingested (and ignored)
        assert (await engine.tasks.get_run(task.id, run.id)).status == RunStatus.LOST
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        await agent.stop()


async def _status(engine: Engine, name: str) -> str | None:
    hosts = (await engine.hosts.list_hosts(PageRequest(1000))).items
    return next((h.status for h in hosts if h.name == name), None)
