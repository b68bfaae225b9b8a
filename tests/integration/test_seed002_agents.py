"""Agents written from seed 002's text alone (tests/integration/seed_agent.py), each test on a
RabbitMQ virtual host of its own (issue 16 items 1-4, issue 15's fan-out):

- a seed agent never says ``started``: its long command outlives the start timeout;
- its groups come from the inventory (``hosts add --link amqp --group``), and a heartbeat
  without ``groups`` keeps them; a host that gets a group message it had no run for has its
  result stored as an ``unplanned`` run;
- its heartbeat's fractions are shown as percentages; ``"status": "offline"`` takes it offline;
- a group or broadcast message does not grow with its targets, and pacing never republishes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from opsplane.config import load_settings
from opsplane.domain.ids import run_id_for
from opsplane.domain.paging import PageRequest
from opsplane.domain.policy import Limit, TaskPolicy
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.security.signing import load_or_create_private_key
from opsplane.store.tables import RunRow
from opsplane.transport.amqp.link import AmqpLink
from tests.auth import ADMIN_HEADERS
from tests.integration.apps import admin_api, running_engine
from tests.integration.seed_agent import SeedAgent
from tests.rabbitmq import PrivateVhost, private_vhost

pytestmark = pytest.mark.service("rabbitmq")


@pytest.fixture
def vhost() -> Iterator[PrivateVhost]:
    with private_vhost("opsplane-seed002") as the_vhost:
        yield the_vhost


@asynccontextmanager
async def seed_engine(
    tmp_path: Path, vhost: PrivateVhost, *, heartbeat: float = 1.0, **settings: Any
) -> AsyncIterator[Engine]:
    config = load_settings(
        data_dir=tmp_path, heartbeat_interval=heartbeat, require_enrollment=False, **settings
    )
    key, _ = load_or_create_private_key(config.signing_key_path)
    link = AmqpLink(
        vhost.url, signing_key=key, heartbeat_interval=heartbeat, offline_after_missed=3
    )
    async with running_engine(config, [link]) as engine:
        yield engine


@asynccontextmanager
async def beating(*agents: SeedAgent, every: float = 0.5) -> AsyncIterator[None]:
    beats = []
    for agent in agents:
        await agent.start()
        beats.append(asyncio.create_task(agent.beat_every(every)))
    try:
        yield
    finally:
        for beat in beats:
            beat.cancel()
        await asyncio.gather(*beats, return_exceptions=True)
        for agent in agents:
            await agent.stop()


async def _host(engine: Engine, name: str) -> Any:
    hosts = (await engine.hosts.list_hosts(PageRequest(1000))).items
    return next((h for h in hosts if h.name == name), None)


async def _until(check: Any, what: str, within: float = 10.0) -> None:
    for _ in range(int(within / 0.1)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {within}s: {what}")


async def _online(engine: Engine, *agents: SeedAgent) -> None:
    async def all_online() -> bool:
        hosts = [await _host(engine, a.hostname) for a in agents]
        return all(h is not None and h.status == "online" for h in hosts)

    await _until(all_online, "the seed agents online")


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_a_seed_agents_long_command_outlives_the_start_timeout(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    """The seed's 70 s command, scaled down: start_timeout 1 s, a 4 s command. The agent
    never says ``started``; the run stays dispatched and its result is taken."""
    agent = SeedAgent(_name("slow"), url=vhost.url, announce_groups=False)
    async with (
        seed_engine(tmp_path, vhost, start_timeout=1.0, timeout_grace=5.0) as engine,
        beating(agent),
    ):
        await _online(engine, agent)
        request = TaskRequest(
            command="sleep 4; echo done", targets=Targets(hosts=(agent.hostname,)), timeout=10
        )
        task = await engine.tasks.create_task(request)
        async with asyncio.timeout(30):
            done = await engine.wait_task(task.id)
        (run,) = await engine.tasks.list_runs(task.id)
        assert (done.status, run.status, run.stdout) == (
            TaskStatus.SUCCEEDED,
            RunStatus.SUCCEEDED,
            "done\n",
        )


async def test_inventory_groups_hold_for_a_seed_agent_and_an_extra_host_is_stored_unplanned(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    group = _name("web")
    # In the group by the inventory only: its heartbeat names no groups.
    member = SeedAgent(_name("inv"), groups=(group,), url=vhost.url, announce_groups=False)
    # Binds the group's key itself, but nobody told the control plane.
    extra = SeedAgent(_name("extra"), groups=(group,), url=vhost.url, announce_groups=False)
    async with admin_api(
        tmp_path, amqp_url=vhost.url, require_enrollment=False, heartbeat_interval=1.0
    ) as (app, client):
        engine: Engine = app.state.engine
        added = await client.post(
            "/api/v1/hosts",
            json={"name": member.hostname, "link": "amqp", "groups": [group]},
            headers=ADMIN_HEADERS,
        )
        assert added.status_code == 201, added.text
        assert (added.json()["link"], added.json()["groups"]) == ("amqp", [group])
        refused = await client.post(
            "/api/v1/hosts",
            json={"name": _name("x"), "link": "amqp", "ssh": "root@10.0.0.1"},
            headers=ADMIN_HEADERS,
        )
        assert refused.status_code == 422, refused.text
        async with beating(member, extra):
            await _online(engine, member, extra)
            await asyncio.sleep(1.5)  # more heartbeats without groups
            assert (await _host(engine, member.hostname)).groups == [group]
            assert (await _host(engine, extra.hostname)).groups == []

            request = TaskRequest(command="echo hi", targets=Targets(groups=(group,)), timeout=30)
            task = await engine.tasks.create_task(request)
            assert task.total == 1  # the inventory's member only

            async def extra_stored() -> bool:
                runs = await engine.tasks.list_runs(task.id)
                return any(r.host == extra.hostname and r.finished_at for r in runs)

            await _until(extra_stored, "the extra host's result stored", within=15)
            async with asyncio.timeout(15):
                done = await engine.wait_task(task.id)
            runs: dict[str, RunRow] = {r.host: r for r in await engine.tasks.list_runs(task.id)}
            assert done.status == TaskStatus.SUCCEEDED and done.total == 2
            assert set(runs) == {member.hostname, extra.hostname}
            assert not runs[member.hostname].unplanned and runs[extra.hostname].unplanned
            assert (runs[extra.hostname].status, runs[extra.hostname].stdout) == (
                RunStatus.SUCCEEDED,
                "hi\n",
            )
            assert runs[extra.hostname].id == run_id_for(task.id, extra.hostname, 1)
            (message,) = member.received
            assert message == extra.received[0] and message["target"] == f"group:{group}"
            listed = await client.get(f"/api/v1/tasks/{task.id}/runs", headers=ADMIN_HEADERS)
            assert {r["host"]: r["unplanned"] for r in listed.json()["items"]} == {
                member.hostname: False,
                extra.hostname: True,
            }


async def test_seed_heartbeats_are_fractions_and_status_offline_is_at_once(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    seed = SeedAgent(_name("frac"), url=vhost.url, announce_groups=False)
    own = _name("own")
    # Silence alone would take 30 s to call a host offline.
    async with seed_engine(tmp_path, vhost, heartbeat=10.0) as engine, beating(seed, every=5):
        connection = await aio_pika.connect(vhost.url)
        async with connection:
            channel = await connection.channel()
            monitor = await channel.get_exchange("sys_monitor_exchange")
            # An opsplane agent's heartbeat (it has a version): percentages already.
            body = {
                "hostname": own, "status": "online", "timestamp": time.time(),
                "cpu_usage": 0.5, "memory_usage": 70.0, "version": "1.0", "groups": [],
                "signature": "",
            }  # fmt: skip
            await monitor.publish(aio_pika.Message(json.dumps(body).encode()), "heartbeat")
            await _online(engine, seed)

            async def own_online() -> bool:
                host = await _host(engine, own)
                return host is not None and host.status == "online"

            await _until(own_online, "the opsplane-shaped host online")
        host = await _host(engine, seed.hostname)
        assert (host.cpu_usage, host.memory_usage) == (50.0, 70.0)
        host = await _host(engine, own)
        assert (host.cpu_usage, host.memory_usage) == (0.5, 70.0)

        await seed.heartbeat(status="offline")

        async def seed_offline() -> bool:
            return (await _host(engine, seed.hostname)).status == "offline"

        await _until(seed_offline, "the host offline on its say-so", within=8)


async def test_a_broadcast_body_does_not_grow_with_its_targets(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    """Hosts registered by heartbeat only; a spy queue takes what the control plane publishes.
    A group of 3 and a group of 60 get one message each, of the same size."""
    small, big = _name("small"), _name("bigger")
    names = [_name("h") for _ in range(60)]
    async with seed_engine(tmp_path, vhost, heartbeat=10.0) as engine:
        connection = await aio_pika.connect(vhost.url)
        async with connection:
            channel = await connection.channel()
            commands = await channel.get_exchange("sys_cmd_exchange")
            spy = await channel.declare_queue(exclusive=True)
            await spy.bind(commands, "cmd.#")
            monitor = await channel.get_exchange("sys_monitor_exchange")
            for i, name in enumerate(names):
                body = {
                    "hostname": name, "status": "online", "timestamp": time.time(),
                    "cpu_usage": 0.1, "memory_usage": 0.1, "signature": "",
                    "groups": [big, small] if i < 3 else [big],
                }  # fmt: skip
                await monitor.publish(aio_pika.Message(json.dumps(body).encode()), "heartbeat")

            async def registered() -> bool:
                page = await engine.hosts.list_hosts(PageRequest(100), status="online", group=big)
                return page.total == len(names)

            await _until(registered, "60 hosts registered")
            sizes: dict[str, int] = {}
            for group in (small, big):
                request = TaskRequest(command="true", targets=Targets(groups=(group,)), timeout=30)
                await engine.tasks.create_task(request)
            got: list[aio_pika.abc.AbstractIncomingMessage] = []
            async with asyncio.timeout(10):
                while len(got) < 2:
                    message = await spy.get(fail=False)
                    if message is None:
                        await asyncio.sleep(0.1)
                        continue
                    got.append(message)
            await asyncio.sleep(1.0)
            assert await spy.get(fail=False) is None  # one message per task, nothing per host
            for message in got:
                sizes[message.routing_key or ""] = len(message.body)
        assert set(sizes) == {f"cmd.group.{small}", f"cmd.group.{big}"}
        # The group names differ by 1 character; the timestamps' digits may differ a little.
        assert abs(sizes[f"cmd.group.{big}"] - sizes[f"cmd.group.{small}"]) <= 8, sizes


async def test_pacing_sends_each_host_its_command_once(tmp_path: Path, vhost: PrivateVhost) -> None:
    """One host at a time over a group of three: each batch goes to its host's queue only,
    never again to the group (where every member would receive it)."""
    group = _name("paced")
    agents = [SeedAgent(_name("p"), groups=(group,), url=vhost.url) for _ in range(3)]
    async with seed_engine(tmp_path, vhost) as engine, beating(*agents):
        await _online(engine, *agents)
        request = TaskRequest(
            command="echo paced",
            targets=Targets(groups=(group,)),
            timeout=30,
            policy=TaskPolicy(max_concurrency=Limit(count=1)),
        )
        task = await engine.tasks.create_task(request)
        async with asyncio.timeout(30):
            done = await engine.wait_task(task.id)
        assert done.status == TaskStatus.SUCCEEDED
        await asyncio.sleep(1.0)
        for agent in agents:
            (message,) = agent.received
            assert message["target"] == agent.hostname and "run_id" in message
