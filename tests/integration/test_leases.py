"""Singleton duties across instances sharing one database (DESIGN §7, docs/instances.md): a
lease is held by one instance at a time, renewed by it, taken over once it has expired."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import delete

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.engine.core import Engine
from opsplane.engine.leases import Lease
from opsplane.store.tables import LeaseRow
from opsplane.transport.memory import MemoryLink


@asynccontextmanager
async def _instance(data_dir: Path, database_url: str) -> AsyncIterator[Engine]:
    """One control-plane engine (its own connection pool and data directory)."""
    settings = load_settings(database_url=database_url, data_dir=data_dir)
    engine = make_engine(settings, [MemoryLink()])
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.fixture
async def two(tmp_path: Path, database_url: str) -> AsyncIterator[tuple[Engine, Engine]]:
    async with (
        _instance(tmp_path / "a", database_url) as a,
        _instance(tmp_path / "b", database_url) as b,
    ):
        yield a, b


async def test_a_lease_is_held_by_one_instance_and_renewed_by_it(
    two: tuple[Engine, Engine],
) -> None:
    a, b = two
    lease_a = Lease(a.write, "duty", holder="a", ttl=60)
    lease_b = Lease(b.write, "duty", holder="b", ttl=60)
    assert await lease_a.claim()
    assert not await lease_b.claim()
    assert await lease_a.claim()  # renewed
    assert not await lease_b.claim()
    # Another duty's lease is another row.
    assert await Lease(b.write, "other", holder="b", ttl=60).claim()


async def test_an_expired_lease_is_taken_over_and_a_released_one_at_once(
    two: tuple[Engine, Engine],
) -> None:
    a, b = two
    lease_a = Lease(a.write, "duty", holder="a", ttl=0.3)
    lease_b = Lease(b.write, "duty", holder="b", ttl=60)
    assert await lease_a.claim()
    assert not await lease_b.claim()
    await asyncio.sleep(0.5)  # a died: it renewed nothing
    assert await lease_b.claim()
    assert not await lease_a.claim()
    await lease_b.release()
    assert await lease_a.claim()


async def test_instances_claiming_at_the_same_time_get_one_holder(
    two: tuple[Engine, Engine],
) -> None:
    a, b = two
    for round_ in range(10):
        leases = [
            Lease(engine.write, f"race-{round_}", holder=f"{name}{i}", ttl=60)
            for engine, name in ((a, "a"), (b, "b"))
            for i in range(3)
        ]
        held = await asyncio.gather(*(lease.claim() for lease in leases))
        assert sum(held) == 1, f"round {round_}: {held}"


async def test_database_retention_runs_on_the_lease_holder_only(
    two: tuple[Engine, Engine],
) -> None:
    a, b = two
    for engine in (a, b):
        await engine.retention.stop()  # its passes are run here, and its lease given up
    # A start-up pass cancelled by that stop may have claimed the lease as its transaction
    # ended (seen once on MariaDB): the contest below starts from no holder.
    async with a.write() as changes:
        await changes.session.execute(delete(LeaseRow).where(LeaseRow.name == "retention"))
    a.instance, b.instance = "instance-a", "instance-b"
    lease_of = {
        engine: Lease(engine.write, "retention", holder=engine.instance, ttl=60)
        for engine in (a, b)
    }
    passes: dict[str, int] = {"instance-a": 0, "instance-b": 0}
    for engine in (a, b):
        engine.retention._lease = lease_of[engine]

        async def counted(engine: Engine = engine) -> object:
            passes[engine.instance] += 1
            return type("R", (), {"complete": True})()

        engine.retention.run_once = counted  # type: ignore[method-assign]
    for _ in range(3):
        for engine in (a, b):
            assert await engine.retention._complete_pass()
    assert sorted(passes.values()) == [0, 3]
