"""The control plane's RabbitMQ link against the real broker, with seed-002 agents."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest

from opsplane.config import load_settings
from opsplane.domain.paging import PageRequest
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.security.signing import load_or_create_private_key
from opsplane.transport.amqp.link import AmqpLink, mask_url
from tests.integration.apps import running_engine
from tests.integration.seed_agent import AMQP_URL, SeedAgent, purge_shared_queues
from tests.rabbitmq import private_vhost

pytestmark = pytest.mark.service("rabbitmq")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    await purge_shared_queues()
    # Seed-002 agents know nothing of enrollment.
    settings = load_settings(data_dir=tmp_path, heartbeat_interval=1.0, require_enrollment=False)
    key, _ = load_or_create_private_key(settings.signing_key_path)
    link = AmqpLink(AMQP_URL, signing_key=key, heartbeat_interval=1.0, offline_after_missed=3)
    async with running_engine(settings, [link]) as the_engine:
        yield the_engine


@pytest.fixture
async def agents(engine: Engine) -> AsyncIterator[dict[str, SeedAgent]]:
    suffix = uuid.uuid4().hex[:8]
    public = load_or_create_private_key(engine.settings.signing_key_path)[0].public_key()
    fleet = {
        name: SeedAgent(f"{name}-{suffix}", groups=(f"{group}-{suffix}",), control_plane_key=public)
        for name, group in (("web-1", "web"), ("web-2", "web"), ("db-1", "db"))
    }
    beats = []
    for agent in fleet.values():
        await agent.start()
        beats.append(asyncio.create_task(agent.beat_every(0.5)))
    for _ in range(100):  # up to 10 s for the heartbeats to register the hosts
        statuses = [await _status(engine, a.hostname) for a in fleet.values()]
        if statuses == ["online"] * len(fleet):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"agents did not come online: {statuses}")
    try:
        yield fleet
    finally:
        for beat in beats:
            beat.cancel()
        await asyncio.gather(*beats, return_exceptions=True)
        for agent in fleet.values():
            await agent.stop()


async def _status(engine: Engine, name: str) -> str | None:
    hosts = (await engine.hosts.list_hosts(PageRequest(1000))).items
    return next((h.status for h in hosts if h.name == name), None)


async def _run(
    engine: Engine, command: str, targets: Targets
) -> tuple[str, dict[str, tuple[str, int | None, str]]]:
    task = await engine.tasks.create_task(TaskRequest(command=command, targets=targets, timeout=30))
    async with asyncio.timeout(15):
        done = await engine.wait_task(task.id)
    runs = await engine.tasks.list_runs(task.id)
    return done.status, {r.host: (r.status, r.exit_code, r.stdout) for r in runs}


async def test_seed_agent_registers_by_heartbeat_and_runs_a_signed_command(
    engine: Engine, agents: dict[str, SeedAgent]
) -> None:
    web1 = agents["web-1"]
    status, runs = await _run(engine, "echo hello; exit 3", Targets(hosts=(web1.hostname,)))
    assert status == TaskStatus.FAILED
    assert runs == {web1.hostname: (RunStatus.FAILED, 3, "hello\n")}
    (command,) = web1.received
    assert web1.bad_signatures == 0
    for field in (
        "task_id",
        "command",
        "timeout",
        "user",
        "timestamp",
        "sign",
        "run_id",
        "attempt",
        "type",
    ):
        assert field in command
    # seed 002's user is the account to run as: none asked, so the agent's own; the API
    # caller is submitted_by.
    assert command["user"] == "" and "submitted_by" in command
    host = await engine.hosts.get_host(web1.hostname)
    # The seed's heartbeat says 0.5 of the CPU: shown as 50 %.
    assert (host.link, host.groups, host.cpu_usage) == ("amqp", list(web1.groups), 50.0)
    assert host.memory_usage == 70.0


async def test_group_and_broadcast_are_published_once_and_tracked_per_host(
    engine: Engine, agents: dict[str, SeedAgent]
) -> None:
    web_group = agents["web-1"].groups[0]
    status, runs = await _run(engine, "echo hi", Targets(groups=(web_group,)))
    assert status == TaskStatus.SUCCEEDED
    assert set(runs) == {agents["web-1"].hostname, agents["web-2"].hostname}
    group_message = agents["web-1"].received[-1]
    assert group_message == agents["web-2"].received[-1]  # one message, both received it
    # No per-host map: each host's run id is derived from the task, its name and the attempt.
    assert "run_ids" not in group_message and "run_id" not in group_message
    assert group_message["target"] == f"group:{web_group}"
    assert agents["db-1"].received == []

    # Two groups go host by host (a host in both must not get the command twice).
    names = tuple(a.hostname for a in agents.values())
    before = {name: len(a.received) for name, a in agents.items()}
    status, runs = await _run(
        engine, "true", Targets(groups=tuple(a.groups[0] for a in agents.values()))
    )
    assert status == TaskStatus.SUCCEEDED and set(runs) == set(names)
    for name, agent in agents.items():
        (message,) = agent.received[before[name] :]
        assert message["target"] == agent.hostname and "run_id" in message


async def test_host_without_a_queue_is_undeliverable_at_once(
    engine: Engine, agents: dict[str, SeedAgent]
) -> None:
    db1 = agents["db-1"]
    await db1.stop()  # its exclusive queue goes with the connection; its heartbeat is still fresh
    await asyncio.sleep(0.3)
    status, runs = await _run(engine, "true", Targets(hosts=(db1.hostname,)))
    assert status == TaskStatus.FAILED
    assert runs[db1.hostname][0] == RunStatus.UNDELIVERABLE
    (run,) = await engine.tasks.list_runs(
        (await engine.tasks.list_tasks(status=None, name=None, page=PageRequest(1))).items[0].id
    )
    assert "unroutable" in (run.error or "")


async def test_duplicate_and_malformed_results_change_nothing(
    engine: Engine, agents: dict[str, SeedAgent]
) -> None:
    web2 = agents["web-2"]
    status, _ = await _run(engine, "echo once", Targets(hosts=(web2.hostname,)))
    assert status == TaskStatus.SUCCEEDED
    task_id = web2.received[-1]["task_id"]
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        results = await channel.get_exchange("sys_result_exchange")
        key = f"result.node.{web2.hostname}"
        duplicate = {
            "task_id": task_id,
            "exit_code": 1,
            "stdout": "again",
            "stderr": "",
            "timestamp": 0,
        }
        await results.publish(aio_pika.Message(json.dumps(duplicate).encode()), routing_key=key)
        await results.publish(aio_pika.Message(b"{not json"), routing_key=key)
        await results.publish(aio_pika.Message(b'{"exit_code": 0}'), routing_key=key)
    await asyncio.sleep(1.0)
    (run,) = await engine.tasks.list_runs(task_id)
    assert (run.status, run.exit_code, run.stdout) == (RunStatus.SUCCEEDED, 0, "once\n")


def test_passwords_are_masked_in_urls() -> None:
    assert mask_url("amqp://guest:secret@rabbit:5672/") == "amqp://guest:******@rabbit:5672/"
    assert mask_url("amqp://rabbit/") == "amqp://rabbit/"


@pytest.fixture
def url() -> Iterator[str]:
    """A virtual host of the test's own: another control plane on the default one would take
    these tests' heartbeats."""
    with private_vhost("opsplane-amqpscale") as vhost:
        yield vhost.url


async def test_heartbeats_are_acked_on_receipt_and_liveness_never_waits_on_the_database(
    tmp_path: Path, url: str
) -> None:
    """With nothing written (ingest stopped: a database far behind), heartbeats still leave
    the broker as they come, and the host stays online past the silence limit: the link heard
    it. Before, a beat was acked once written: with ingest stalled they piled up in the broker
    (prefetch 1: all but one of them) and the fleet went offline (docs/amqp.md)."""
    settings = load_settings(data_dir=tmp_path, heartbeat_interval=1.0, require_enrollment=False)
    key, _ = load_or_create_private_key(settings.signing_key_path)
    link = AmqpLink(
        url, signing_key=key, heartbeat_interval=1.0, offline_after_missed=3, prefetch=1
    )
    async with running_engine(settings, [link]) as engine:
        agent = SeedAgent(f"beat-{uuid.uuid4().hex[:8]}", url=url)
        await agent.start()
        beats = asyncio.create_task(agent.beat_every(0.2))
        try:
            for _ in range(100):
                if await _status(engine, agent.hostname) == "online":
                    break
                await asyncio.sleep(0.1)
            await engine.ingest.loop.stop()
            try:
                await asyncio.sleep(4.5)  # past the silence limit (3 intervals of 1 s)
                connection = await aio_pika.connect(url)
                async with connection:
                    channel = await connection.channel()
                    queue = await channel.declare_queue("monitor.heartbeat", passive=True)
                    waiting = queue.declaration_result.message_count
                assert waiting is not None and waiting < 3, f"{waiting} heartbeats in the broker"
                assert link.heard(agent.hostname)
                assert await _status(engine, agent.hostname) == "online"
            finally:
                engine.ingest.loop.start()
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            await agent.stop()
