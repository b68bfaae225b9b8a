"""Heartbeats off the hot path (issue 15): coalesced per host and written at a bounded cadence
in one statement, never behind run reports, and liveness from the stream for links that hold
one (docs/scale.md, "Heartbeats and liveness"). On every database backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import grpc.aio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import event, update

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.security.signing import public_key_text, sign
from opsplane.store.tables import HostRow
from opsplane.transport.base import HeartbeatReport, RunOutput
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.convert import CHALLENGE_KEY, hello_claims
from opsplane.transport.grpc.server import GrpcLink
from opsplane.transport.memory import MemoryLink
from tests.e2e.fleet import free_port

WAIT = 10.0


class StreamLink(MemoryLink):
    """An in-memory link whose connections are streams that check their peer (as gRPC's)."""

    liveness_by_stream: ClassVar[bool] = True


class BeatLink(MemoryLink):
    """An in-memory link whose hosts are alive by their heartbeats (as RabbitMQ's)."""

    name: ClassVar[str] = "amqp"


class Statements:
    """Counts the statements of one kind the engine sends to the database."""

    def __init__(self, engine: Engine, prefix: str, holding: str = "") -> None:
        self.prefix = prefix.lower()
        self.holding = holding
        self.executed: list[Any] = []
        self._engine = engine

    def _seen(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().lower().startswith(self.prefix) and self.holding in statement:
            self.executed.append(parameters)

    def __enter__(self) -> Statements:
        event.listen(self._engine.db.sync_engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self._engine.db.sync_engine, "before_cursor_execute", self._seen)


@pytest.fixture
async def engine(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    settings = load_settings(
        data_dir=tmp_path, database_url=database_url, heartbeat_interval=1.0, ingest_batch_size=10
    )
    the_engine = make_engine(settings, [link])
    await the_engine.start()
    for name in ("web-1", "web-2"):
        await link.connect(name, ["web"])
    try:
        yield the_engine
    finally:
        await the_engine.stop()


def _flat(parameters: Any) -> Iterator[Any]:
    """Every bound value of one execution, whatever shape the driver was given."""
    if isinstance(parameters, dict):
        yield from parameters.values()
    elif isinstance(parameters, list | tuple):
        for item in parameters:
            yield from _flat(item)
    else:
        yield parameters


def _beat(host: str, cpu: float) -> HeartbeatReport:
    return HeartbeatReport(host, datetime.now(UTC), cpu, 50.0, 0.5, 60.0)


async def test_two_beats_of_one_host_are_one_write_of_the_latest(engine: Engine) -> None:
    # A beat just written: the next ones wait for the cadence, together.
    await (await engine.report(_beat("web-2", 1.0)))
    with Statements(engine, "update hosts", "cpu_usage") as updates:
        first = await engine.report(_beat("web-1", 10.0))
        second = await engine.report(_beat("web-1", 20.0))
        other = await engine.report(_beat("web-2", 30.0))
        await asyncio.wait_for(asyncio.gather(first, second, other), WAIT)
    assert len(updates.executed) == 1, updates.executed
    # One statement for both hosts (store/bulk.py: the rows joined as a derived table), with
    # the latest beat of web-1, never its older one.
    values = list(_flat(updates.executed[0]))
    assert 20.0 in values and 30.0 in values and 10.0 not in values, values
    assert (await engine.hosts.get_host("web-1")).cpu_usage == 20.0
    assert (await engine.hosts.get_host("web-2")).cpu_usage == 30.0


async def test_beats_of_many_hosts_are_written_at_a_bounded_cadence(
    engine: Engine, link: MemoryLink
) -> None:
    names = [f"node-{i}" for i in range(20)]
    for name in names:
        await link.connect(name, ["fleet"])
    with (
        Statements(engine, "update hosts", "cpu_usage") as updates,
        Statements(engine, "insert into heartbeats") as history,
    ):
        futures = []
        # 20 beats over about 0.2 s, as a fleet beats at random instants.
        for i, name in enumerate(names):
            futures.append(await engine.report(_beat(name, float(i))))
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*futures), WAIT)
    # The first beat goes at once, the others together a cadence (1 s) later: not 20 writes.
    assert len(updates.executed) <= 2, len(updates.executed)
    assert 1 <= len(history.executed) <= 2, len(history.executed)
    cpus = [(await engine.hosts.get_host(name)).cpu_usage for name in names]
    assert cpus == [float(i) for i in range(20)]


async def test_a_backlog_of_run_reports_never_ages_a_heard_host_into_offline(
    engine: Engine, link: MemoryLink
) -> None:
    task = await engine.tasks.create_task(
        TaskRequest(command="true", targets=Targets(hosts=("web-1",)))
    )
    run_id = (await engine.tasks.list_runs(task.id))[0].id
    silent: list[str] = []
    on_silent = engine.monitor._on_silent

    async def record(hosts: list[tuple[str, str]]) -> None:
        silent.extend(name for name, _ in hosts)
        if on_silent is not None:
            await on_silent(hosts)

    engine.monitor._on_silent = record
    assert engine.monitor.started_at is not None
    engine.monitor.started_at -= timedelta(seconds=10)
    futures = []
    # The database is busy (another writer holds it) while run reports pile up behind it;
    # web-2 was last written 10 s ago, past the silence limit (3 beats of 1 s).
    async with engine.write() as changes:
        stale = datetime.now(UTC) - timedelta(seconds=10)
        await changes.session.execute(
            update(HostRow).where(HostRow.name == "web-2").values(last_seen_at=stale)
        )
        for seq in range(1, 500):
            if engine.ingest.queue_depth >= 190:
                break
            futures.append(
                await engine.report(RunOutput("web-1", run_id, "stdout", seq, b"line\n"))
            )
        await asyncio.sleep(0.2)  # ingest took its first batch and waits for the database
        assert engine.ingest.queue_depth >= 150
        # The heartbeat is taken at once, however full the report queue.
        beat = await asyncio.wait_for(engine.report(_beat("web-2", 3.0)), 1.0)
        # A monitor pass waits for the database right behind ingest's first batch: it runs
        # while the heartbeat is still on its way.
        check = asyncio.create_task(engine.monitor.check_once())
        await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(beat, check, *futures), WAIT)
    assert "web-2" not in silent
    host = await engine.hosts.get_host("web-2")
    assert (host.status, host.cpu_usage) == ("online", 3.0)


async def test_the_monitor_takes_an_open_stream_as_liveness_and_heartbeats_elsewhere(
    tmp_path: Path, database_url: str
) -> None:
    stream, beats = StreamLink(), BeatLink()
    settings = load_settings(data_dir=tmp_path, database_url=database_url, heartbeat_interval=1.0)
    engine = make_engine(settings, [stream, beats])
    await engine.start()
    try:
        await stream.connect("agent-grpc", ["web"])
        await stream.connect("agent-gone", ["web"])
        await beats.connect("agent-amqp", ["web"])
        await stream.disconnect("agent-gone")
        # agent-gone's row says online (as after another instance held its stream).
        async with engine.write() as changes:
            stale = datetime.now(UTC) - timedelta(seconds=10)
            await changes.session.execute(
                update(HostRow).values(last_seen_at=stale, status="online")
            )
        assert engine.monitor.started_at is not None
        engine.monitor.started_at -= timedelta(seconds=10)
        await engine.monitor.check_once()
        names = ("agent-grpc", "agent-amqp", "agent-gone")
        statuses = {name: (await engine.hosts.get_host(name)).status for name in names}
        # Silent for 10 s: the host with an open stream is alive; the one whose liveness is
        # its heartbeat, and the one without a stream, are offline.
        assert statuses == {
            "agent-grpc": "online",
            "agent-amqp": "offline",
            "agent-gone": "offline",
        }, statuses
        # Seen now: the next pass does not find it again until it is past the limit anew.
        seen = (await engine.hosts.get_host("agent-grpc")).last_seen_at
        assert seen is not None and seen > stale + timedelta(seconds=5)
    finally:
        await engine.stop()


async def test_a_grpc_agent_with_an_open_stream_stays_online_without_heartbeats(
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    link = GrpcLink(address, heartbeat_interval=0.5)
    settings = load_settings(data_dir=tmp_path, heartbeat_interval=0.5, require_enrollment=False)
    engine = make_engine(settings, [link])
    await engine.start()
    key = Ed25519PrivateKey.generate()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.CommandServiceStub(channel).ConnectForCommands()
            challenge = (await call.initial_metadata()).get(CHALLENGE_KEY)
            hello = pb.Hello(
                hostname="quiet-1",
                public_key=public_key_text(key.public_key()),
                timestamp=time.time(),
                challenge=str(challenge),
            )
            hello.signature = sign(key, hello_claims(hello))
            await call.write(pb.CommandMessage(hello=hello))
            welcome = (await asyncio.wait_for(call.read(), WAIT)).welcome
            # The welcome tells a current agent to send metrics only, now and then.
            assert welcome.metrics_interval_seconds == 60
            assert welcome.heartbeat_interval_seconds == 1  # older agents: as before
            # Four silence limits (3 x 0.5 s) without a heartbeat: the stream is the liveness.
            await asyncio.sleep(6.0)
            host = await engine.hosts.get_host("quiet-1")
            assert host.status == "online"
            ended_at = datetime.now(UTC)
            call.cancel()
        # The stream's end is the host's end, at once.
        status = ""
        for _ in range(int(WAIT / 0.05)):
            status = (await engine.hosts.get_host("quiet-1")).status
            if status == "offline":
                break
            await asyncio.sleep(0.05)
        assert status == "offline"
        # Alive until its stream ended: the grace before its runs are lost counts from there.
        seen = (await engine.hosts.get_host("quiet-1")).last_seen_at
        assert seen is not None and seen >= ended_at - timedelta(seconds=1)
    finally:
        await engine.stop()
