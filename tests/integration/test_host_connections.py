"""Issue 15, the connect path: agents' connections are decided in memory and written in
batches (engine/connections.py, docs/scale.md), on every database backend."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import event

from opsplane.config import load_settings
from opsplane.domain.errors import NameTaken
from opsplane.domain.states import RunStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.engine.hosts import HostService
from opsplane.transport.base import AgentHello
from opsplane.transport.memory import MemoryLink
from tests.faults.proxy import running_proxy
from tests.integration.apps import running_engine
from tests.integration.databases import server_params, throwaway_database


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements ``engine`` sends while the block runs (an executemany is one)."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]).strip().upper())

    event.listen(engine.db.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.db.sync_engine, "before_cursor_execute", record)


def _hello(name: str, **fields: Any) -> AgentHello:
    return AgentHello(hostname=name, link="grpc", groups=("wave",), **fields)


async def test_a_wave_of_hellos_is_written_in_one_transaction(engine: Engine) -> None:
    before = engine.hosts.connections.transactions
    with _statements(engine) as statements:
        durable = [engine.host_connecting(_hello(f"wave-{i:03d}")) for i in range(60)]
        await asyncio.gather(*durable)
    assert engine.hosts.connections.transactions == before + 1
    inserts = [s for s in statements if s.startswith("INSERT INTO HOSTS")]
    assert len(inserts) == 1, inserts
    hosts = await engine.hosts.hosts_named({f"wave-{i:03d}" for i in range(60)})
    assert len(hosts) == 60
    assert {h.status for h in hosts} == {"online"}
    assert {tuple(h.groups) for h in hosts} == {("wave",)}
    # A second wave of the same hosts updates their rows, in one transaction as well.
    durable = [engine.host_connecting(_hello(f"wave-{i:03d}", version="2")) for i in range(60)]
    await asyncio.gather(*durable)
    assert engine.hosts.connections.transactions == before + 2
    hosts = await engine.hosts.hosts_named({f"wave-{i:03d}" for i in range(60)})
    assert {h.agent_version for h in hosts} == {"2"}


async def test_name_taken_is_decided_at_once_without_the_database(engine: Engine) -> None:
    # (An SSH host, as the store holds it.)
    await engine.hosts.host_connected(AgentHello(hostname="ssh-9", link="ssh", groups=("db",)))
    with _statements(engine) as statements, pytest.raises(NameTaken, match="is a ssh host"):
        engine.host_connecting(_hello("ssh-9"))
    assert statements == []
    # And the view is loaded from the store at start: a fresh registry knows the name too.
    fresh = HostService(engine.sessions, engine.write, engine.links)
    await fresh.load()
    with pytest.raises(NameTaken):
        fresh.claim(_hello("ssh-9"))


async def test_a_connect_then_an_immediate_disconnect_ends_offline(engine: Engine) -> None:
    connected = engine.host_connecting(_hello("brief-1"))
    gone = asyncio.create_task(engine.host_disconnected("brief-1", "grpc"))
    await asyncio.gather(connected, gone)
    assert (await engine.hosts.get_host("brief-1")).status == "offline"
    # A disconnect then a reconnect in one batch: online, whatever the batch holds.
    gone = asyncio.create_task(engine.host_disconnected("brief-1", "grpc"))
    await asyncio.sleep(0)
    await asyncio.gather(gone, engine.host_connecting(_hello("brief-1")))
    assert (await engine.hosts.get_host("brief-1")).status == "online"
    # A disconnect from another link than the host's changes nothing.
    await engine.host_disconnected("brief-1", "amqp")
    assert (await engine.hosts.get_host("brief-1")).status == "online"


async def test_a_batch_reconciles_the_runs_of_all_its_hosts(
    engine: Engine, link: MemoryLink
) -> None:
    names = [f"recon-{i}" for i in range(5)]
    for name in names:
        await link.connect(name, ["recon"])
    request = TaskRequest(command="true", targets=Targets(hosts=tuple(names)))
    task = await engine.tasks.create_task(request)

    async def dispatched() -> bool:
        runs = await engine.tasks.list_runs(task.id)
        return len(runs) == 5 and all(r.status == RunStatus.DISPATCHED for r in runs)

    await _until(dispatched)
    runs = {r.host: r.id for r in await engine.tasks.list_runs(task.id)}
    # All five say hello again in one wave; only recon-0 still runs its run.
    before = engine.hosts.connections.transactions
    await asyncio.gather(
        *(
            engine.host_connecting(
                AgentHello(
                    hostname=n,
                    link=link.name,
                    running_run_ids=frozenset({runs[n]} if n == "recon-0" else ()),
                )
            )
            for n in names
        )
    )
    assert engine.hosts.connections.transactions == before + 1
    after = {r.host: r.status for r in await engine.tasks.list_runs(task.id)}
    assert after["recon-0"] == RunStatus.DISPATCHED
    assert {after[n] for n in names[1:]} == {RunStatus.UNDELIVERABLE}


async def test_two_hellos_of_a_host_in_one_batch_reconcile_against_both(
    engine: Engine, link: MemoryLink
) -> None:
    # docs/deployment.md "Defects found": an agent welcomed twice before its connect was
    # written named a run abandoned in its first hello only; the run must end lost.
    names = ["twice-1", "twice-2"]
    for name in names:
        await link.connect(name, ["twice"])
    task = await engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(hosts=tuple(names)))
    )

    async def dispatched() -> bool:
        runs = await engine.tasks.list_runs(task.id)
        return len(runs) == 2 and all(r.status == RunStatus.DISPATCHED for r in runs)

    await _until(dispatched)
    runs = {r.host: r.id for r in await engine.tasks.list_runs(task.id)}
    before = engine.hosts.connections.transactions
    await asyncio.gather(
        engine.host_connecting(
            AgentHello(
                hostname="twice-1",
                link=link.name,
                version="1",
                abandoned_run_ids=frozenset({runs["twice-1"]}),
            )
        ),
        # twice-2 still runs its run in the first hello, and the second forgets it.
        engine.host_connecting(
            AgentHello(
                hostname="twice-2", link=link.name, running_run_ids=frozenset({runs["twice-2"]})
            )
        ),
        engine.host_connecting(AgentHello(hostname="twice-1", link=link.name, version="2")),
        engine.host_connecting(AgentHello(hostname="twice-2", link=link.name)),
    )
    assert engine.hosts.connections.transactions == before + 1
    after = {r.host: r.status for r in await engine.tasks.list_runs(task.id)}
    assert after == {"twice-1": RunStatus.LOST, "twice-2": RunStatus.DISPATCHED}
    # The latest hello's other fields are the host's.
    assert (await engine.hosts.get_host("twice-1")).agent_version == "2"


async def _until(probe: Any, limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not await probe():  # noqa: ASYNC110 (the store has no event to wait on)
            await asyncio.sleep(0.05)


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) > 1 else host))


@pytest.mark.parametrize("backend", server_params())
async def test_connections_written_while_the_database_is_down_are_retried(
    backend: str, tmp_path: Path
) -> None:
    async with throwaway_database(backend, tmp_path, migrated=True) as url:
        target = urlsplit(url)
        with running_proxy("127.0.0.1", target.port or 0) as proxy:
            settings = load_settings(data_dir=tmp_path, database_url=_through(url, proxy.port))
            async with running_engine(settings, []) as engine:
                await engine.host_connected(_hello("outage-1"))
                proxy.cut()
                durable = engine.host_connecting(_hello("outage-2"))
                gone = asyncio.create_task(engine.host_disconnected("outage-1", "grpc"))
                await asyncio.sleep(2.0)
                assert not durable.done()
                proxy.resume()
                async with asyncio.timeout(30):
                    await asyncio.gather(durable, gone)
                assert (await engine.hosts.get_host("outage-2")).status == "online"
                assert (await engine.hosts.get_host("outage-1")).status == "offline"
