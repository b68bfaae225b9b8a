"""Issue 15: the gRPC endpoint sheds a connect storm politely. Past ``grpc_max_handshakes``
hellos in flight a new stream is refused at once with RESOURCE_EXHAUSTED and a retry hint
(trailing metadata), and the agent waits at least that long before it dials again."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from opsplane.agent import Agent, AgentConfig
from opsplane.agent.grpc_link import retry_after
from opsplane.config import load_settings
from opsplane.engine.core import Engine
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.server import RETRY_AFTER_KEY, GrpcLink
from tests.e2e.fleet import free_port
from tests.integration.apps import running_engine

HINT_MS = 3000


@pytest.fixture
async def busy_engine(tmp_path: Path) -> AsyncIterator[Engine]:
    """A control plane that verifies one hello at a time."""
    link = GrpcLink(
        f"127.0.0.1:{free_port()}",
        heartbeat_interval=10.0,
        max_handshakes=1,
        retry_after_ms=HINT_MS,
    )
    settings = load_settings(data_dir=tmp_path / "cp", require_enrollment=False)
    async with running_engine(settings, [link]) as engine:
        yield engine


def _address(engine: Engine) -> str:
    link = engine.links["grpc"]
    assert isinstance(link, GrpcLink)
    return f"127.0.0.1:{link.bound_port}"


async def _hold_a_handshake(
    address: str,
) -> tuple[grpc.aio.Channel, grpc.aio.StreamStreamCall[pb.CommandMessage, pb.CommandMessage]]:
    """A stream that got its challenge and never says hello: it holds the only slot."""
    channel = grpc.aio.insecure_channel(address)
    call = pb_grpc.CommandServiceStub(channel).ConnectForCommands()
    await asyncio.wait_for(call.initial_metadata(), 10)
    return channel, call


async def test_a_stream_past_the_bound_is_refused_at_once_with_a_retry_hint(
    busy_engine: Engine,
) -> None:
    address = _address(busy_engine)
    holder, _held = await _hold_a_handshake(address)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.CommandServiceStub(channel).ConnectForCommands()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(call.read(), 10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(refused.value.trailing_metadata() or ())[RETRY_AFTER_KEY] == str(HINT_MS)
        assert retry_after(refused.value) == HINT_MS / 1000
    finally:
        await holder.close()
    # The slot is free again once the holder is gone: a stream gets its challenge.
    again, _call = await _hold_a_handshake(address)
    await again.close()


async def test_an_agent_refused_as_busy_waits_the_hint_then_connects(
    busy_engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = _address(busy_engine)
    config = AgentConfig(
        server=address,
        name="patient-1",
        groups=("web",),
        state_dir=tmp_path / "agent",
        reconnect_initial=0.05,
        reconnect_max=0.5,
        kill_grace=1.0,
    )
    holder, _held = await _hold_a_handshake(address)
    agent = Agent(config)
    caplog.set_level(logging.WARNING, logger="opsplane.agent.grpc_link")
    task = asyncio.create_task(agent.run())
    try:

        def delays() -> list[float]:
            return [
                float(m[1])
                for r in caplog.records
                if "RESOURCE_EXHAUSTED" in r.getMessage()
                and (m := re.search(r"reconnecting in ([0-9.]+)s", r.getMessage()))
            ]

        async with asyncio.timeout(10):
            while not delays():  # noqa: ASYNC110 (log records have no event)
                await asyncio.sleep(0.05)
        # Without the hint its backoff would be at most 0.5 s.
        assert all(d >= HINT_MS / 1000 for d in delays()), delays()
        await holder.close()

        async def online() -> bool:
            return busy_engine.links["grpc"].is_connected("patient-1")

        async with asyncio.timeout(20):
            while not await online():  # noqa: ASYNC110 (polled, bounded)
                await asyncio.sleep(0.1)
    finally:
        await holder.close()
        agent.request_stop()
        await asyncio.wait_for(task, 15)
