"""Two control-plane instances on one database and one RabbitMQ (docs/instances.md): a command
for an agent whose gRPC stream the other instance holds is routed to it; task events reach the
other instance's live streams; an enrollment or a revocation made on one is seen by the other
at once. Real engines on one database (each backend), real gRPC agents, a private RabbitMQ vhost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from opsplane.agent import Agent, AgentConfig
from opsplane.agent.enroll import agent_key_path
from opsplane.api.routers.tasks import _event_stream
from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.states import TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.changes import TaskEvent
from opsplane.engine.core import Engine
from opsplane.security.signing import load_or_create_private_key, public_key_text
from opsplane.store.tables import HostRow
from opsplane.transport.amqp.instances import InstanceRouter
from opsplane.transport.grpc.server import GrpcLink
from tests.e2e.fleet import free_port
from tests.rabbitmq import PrivateVhost, private_vhost

WAIT = 30.0


@pytest.fixture
def vhost() -> Iterator[PrivateVhost]:
    with private_vhost("opsplane-instances") as the_vhost:
        yield the_vhost


@contextlib.asynccontextmanager
async def _instance(
    tmp_path: Path,
    name: str,
    database_url: str,
    url: str,
    key: Ed25519PrivateKey,
    **settings: object,
) -> AsyncIterator[Engine]:
    """One control plane: its own data directory, gRPC port and connections; the database,
    the broker and the command-signing key shared with the others."""
    config = load_settings(
        data_dir=tmp_path / name,
        database_url=database_url,
        grpc_listen=f"127.0.0.1:{free_port()}",
        heartbeat_interval=1.0,
        **settings,
    )
    link = GrpcLink(config.grpc_listen, heartbeat_interval=1.0, signing_key=key)
    engine = make_engine(config, [link], router=InstanceRouter(url))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@contextlib.asynccontextmanager
async def _two(
    tmp_path: Path, database_url: str, vhost: PrivateVhost, **settings: object
) -> AsyncIterator[tuple[Engine, Engine, Ed25519PrivateKey]]:
    key = Ed25519PrivateKey.generate()
    async with (
        _instance(tmp_path, "a", database_url, vhost.url, key, **settings) as a,
        _instance(tmp_path, "b", database_url, vhost.url, key, **settings) as b,
    ):
        yield a, b, key


@contextlib.asynccontextmanager
async def _agent(
    engine: Engine, tmp_path: Path, name: str, key: Ed25519PrivateKey
) -> AsyncIterator[Agent]:
    """The real agent, connected to ``engine`` only, verifying commands with the shared key."""
    config = AgentConfig(
        server=engine.settings.grpc_listen,
        name=name,
        state_dir=tmp_path / f"agent-{name}",
        reconnect_initial=0.05,
        reconnect_max=0.3,
        control_plane_key=public_key_text(key.public_key()),
    )
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 15)


def _grpc(engine: Engine) -> GrpcLink:
    link = engine.links[GrpcLink.name]
    assert isinstance(link, GrpcLink)
    return link


async def _until(condition: Callable[[], bool], within: float = WAIT) -> None:
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


async def _held_by(engine: Engine, host: str) -> str | None:
    async with engine.sessions() as session:
        return await session.scalar(select(HostRow.instance).where(HostRow.name == host))


async def _connected(engine: Engine, host: str) -> None:
    """Until ``engine`` holds ``host``'s stream and the database says so."""
    await _until(lambda: _grpc(engine).is_connected(host))
    async with asyncio.timeout(WAIT):
        while True:
            if await _held_by(engine, host) == engine.instance:
                return
            await asyncio.sleep(0.05)


async def test_a_task_submitted_to_one_instance_runs_on_an_agent_of_the_other(
    tmp_path: Path, database_url: str, vhost: PrivateVhost
) -> None:
    async with (
        _two(tmp_path, database_url, vhost, require_enrollment=False) as (a, b, key),
        _agent(b, tmp_path, "web-1", key),
    ):
        await _connected(b, "web-1")
        assert not _grpc(a).is_connected("web-1")
        request = TaskRequest(command="echo routed", targets=Targets(hosts=("web-1",)))
        task = await a.tasks.create_task(request)
        async with asyncio.timeout(WAIT):
            done = await a.wait_task(task.id)
        assert done.status == TaskStatus.SUCCEEDED
        [run] = await a.tasks.list_runs(task.id)
        # The command was signed on A and verified by the agent against the pinned key.
        assert run.stdout == "routed\n"
        assert run.attempt == 1

        # A cancel is routed the same way.
        request = TaskRequest(command="sleep 30", targets=Targets(hosts=("web-1",)))
        slow = await a.tasks.create_task(request)
        await _until_run_status(a, slow.id, "running")
        await a.tasks.cancel_task(slow.id)
        async with asyncio.timeout(WAIT):
            ended = await a.wait_task(slow.id)
        assert ended.status == TaskStatus.CANCELED


async def _until_run_status(engine: Engine, task_id: str, status: str) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            [run] = await engine.tasks.list_runs(task_id)
            if run.status == status:
                return
            await asyncio.sleep(0.05)


async def test_a_command_for_an_instance_that_is_gone_is_undeliverable_at_once(
    tmp_path: Path, database_url: str, vhost: PrivateVhost
) -> None:
    async with (
        _two(tmp_path, database_url, vhost, require_enrollment=False) as (a, b, key),
        _agent(b, tmp_path, "web-2", key),
    ):
        await _connected(b, "web-2")
        # B's queue goes (as if B died), while its row still says it holds the stream.
        assert isinstance(b.router, InstanceRouter)
        await b.router.stop()
        request = TaskRequest(command="echo lost", targets=Targets(hosts=("web-2",)))
        task = await a.tasks.create_task(request)
        async with asyncio.timeout(WAIT):
            done = await a.wait_task(task.id)
        [run] = await a.tasks.list_runs(task.id)
        assert run.status == "undeliverable"
        assert "gone" in (run.error or "")
        assert done.status != TaskStatus.SUCCEEDED


async def test_an_sse_client_on_one_instance_sees_the_events_of_a_task_on_the_other(
    tmp_path: Path, database_url: str, vhost: PrivateVhost
) -> None:
    async with (
        _two(tmp_path, database_url, vhost, require_enrollment=False) as (a, b, key),
        _agent(a, tmp_path, "db-1", key),
    ):
        await _connected(a, "db-1")
        request = TaskRequest(command="sleep 0.5; echo seen", targets=Targets(hosts=("db-1",)))
        task = await a.tasks.create_task(request)
        # What B's SSE route reads live (engine.hub), apart from its history.
        live = b.hub.subscribe(task.id)
        streamed = [event async for event in _stream(b, task.id)]
        got: list[TaskEvent] = []
        while not live.queue.empty():
            got.append(live.queue.get_nowait())
        b.hub.unsubscribe(live)
        history = await b.tasks.events_after(task.id, 0, 1000)
        durable = {event.id: event.kind for event in history}
        # Events came to B over RabbitMQ, with the ids the database gave them on A.
        ended = [e for e in got if e.kind == "task" and e.data.get("status") == "succeeded"]
        assert ended
        assert {e.id: e.kind for e in got if e.durable}.items() <= durable.items()
        # The SSE stream on B ended with the task, every durable event once, in id order.
        ids = [int(sse.id) for sse in streamed if sse.id is not None]
        assert ids == sorted(durable)
        assert streamed[-1].event == "task"


async def _stream(engine: Engine, task_id: str) -> AsyncIterator[object]:
    async with asyncio.timeout(WAIT):
        async for event in _event_stream(engine, task_id, 0):
            yield event


async def test_an_enrollment_and_a_revocation_on_one_instance_hold_on_the_other(
    tmp_path: Path, database_url: str, vhost: PrivateVhost
) -> None:
    async with _two(tmp_path, database_url, vhost, require_enrollment=True) as (a, b, key):
        agent_key, _ = load_or_create_private_key(agent_key_path(tmp_path / "agent-app-1"))
        public = public_key_text(agent_key.public_key())
        token = await a.agents.create_token(["app"], created_by="admin")
        await a.agents.enroll(token.secret, "app-1", public)
        # B learns of it without a restart: the agent may connect there at once.
        await _until(lambda: b.agents.identity("app-1") is not None)
        async with _agent(b, tmp_path, "app-1", key):
            await _connected(b, "app-1")
            await a.revoke_agent("app-1", revoked_by="admin")
            # B drops the agent's stream and refuses it from then on.
            await _until(lambda: b.agents.refusal("app-1", public, []) == "agent app-1 was revoked")
            await _until(lambda: not _grpc(b).is_connected("app-1"))
            await asyncio.sleep(1.0)  # the agent redials (every 0.3 s at most): still refused
            assert not _grpc(b).is_connected("app-1")
