"""The real control plane's gRPC endpoint and the real agent over TLS with the CA that
``opsplane keys init`` creates, with and without mutual TLS (docs/tls.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from opsplane.agent import Agent, AgentConfig
from opsplane.app_factory import build_engine
from opsplane.config import load_settings
from opsplane.domain.states import TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.security.tls import TlsFiles, init_tls, issue_client_cert
from opsplane.transport.grpc.server import GrpcLink

AGENT = "tls-agent"
WAIT = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    files = TlsFiles.of(tmp_path / "cp")
    init_tls(files, extra_names=["cp.example.com"])
    return files


@contextlib.asynccontextmanager
async def control_plane(tmp_path: Path, *, client_ca: Path | None = None) -> AsyncIterator[Engine]:
    """The control plane's engine as `opsplane server` builds it: grpc_tls_cert/key unset, so
    the gRPC endpoint serves <data_dir>/tls/server.pem."""
    settings = load_settings(
        data_dir=tmp_path / "cp",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'cp.db'}",
        grpc_listen=f"127.0.0.1:{_free_port()}",
        heartbeat_interval=1.0,
        grpc_tls_client_ca=client_ca,
        require_enrollment=False,  # TLS is the subject here (test_enrollment.py: enrollment)
    )
    engine = build_engine(settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@contextlib.asynccontextmanager
async def agent_of(engine: Engine, tmp_path: Path, **tls: Any) -> AsyncIterator[Agent]:
    config = AgentConfig(
        server=engine.settings.grpc_listen,
        name=tls.pop("name", AGENT),
        state_dir=tmp_path / "agent-state",
        reconnect_initial=0.05,
        reconnect_max=0.3,
        **tls,
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


async def _runs_a_command(engine: Engine) -> None:
    await _until(lambda: _grpc(engine).is_connected(AGENT))
    request = TaskRequest(command="echo over tls", targets=Targets(hosts=(AGENT,)))
    task = await engine.tasks.create_task(request)
    async with asyncio.timeout(WAIT):
        done = await engine.wait_task(task.id)
    assert done.status == TaskStatus.SUCCEEDED
    [run] = await engine.tasks.list_runs(task.id)
    assert run.stdout == "over tls\n"


async def _is_refused(
    engine: Engine, caplog: pytest.LogCaptureFixture, reason: str = "UNAVAILABLE"
) -> str:
    """Waits (bounded) for two failed attempts of the agent; returns the logged reason."""

    def failures() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "opsplane.agent.grpc_link" and "cannot reach" in r.getMessage()
        ]

    await _until(lambda: len(failures()) >= 2)
    assert not _grpc(engine).is_connected(AGENT)
    message = failures()[-1]
    assert reason in message, message
    return message


@pytest.mark.parametrize("server_name", [None, "cp.example.com"])
async def test_agent_pinning_the_generated_ca_connects_and_runs_a_command(
    tmp_path: Path, tls: TlsFiles, server_name: str | None
) -> None:
    async with (
        control_plane(tmp_path) as engine,
        agent_of(engine, tmp_path, tls_ca=tls.ca_cert, tls_server_name=server_name),
    ):
        await _runs_a_command(engine)


@pytest.mark.parametrize("case", ["plaintext", "another CA", "a name not in the certificate"])
async def test_agent_that_cannot_verify_the_server_never_connects(
    tmp_path: Path, tls: TlsFiles, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    other = TlsFiles(tmp_path / "other-ca")
    init_tls(other)
    settings: dict[str, Any] = {
        "plaintext": {},
        "another CA": {"tls_ca": other.ca_cert},
        "a name not in the certificate": {
            "tls_ca": tls.ca_cert,
            "tls_server_name": "elsewhere.example.com",
        },
    }[case]
    caplog.set_level(logging.WARNING, logger="opsplane.agent.grpc_link")
    async with control_plane(tmp_path) as engine, agent_of(engine, tmp_path, **settings):
        await _is_refused(engine, caplog)


async def test_with_a_client_ca_only_agents_with_their_own_certificate_get_in(
    tmp_path: Path, tls: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="opsplane.agent.grpc_link")
    cert, key = issue_client_cert(tls, AGENT)
    other_cert, other_key = issue_client_cert(tls, "someone-else")
    async with control_plane(tmp_path, client_ca=tls.ca_cert) as engine:
        # No client certificate: the TLS handshake fails.
        async with agent_of(engine, tmp_path, tls_ca=tls.ca_cert):
            await _is_refused(engine, caplog)
        caplog.clear()
        # A certificate of the same CA issued to another agent: refused by name.
        async with agent_of(
            engine, tmp_path, tls_ca=tls.ca_cert, tls_cert=other_cert, tls_key=other_key
        ):
            message = await _is_refused(engine, caplog, reason="PERMISSION_DENIED")
            assert repr(AGENT) in message
        # Its own certificate from `opsplane keys client-cert`: in, and it runs commands.
        async with agent_of(engine, tmp_path, tls_ca=tls.ca_cert, tls_cert=cert, tls_key=key):
            await _runs_a_command(engine)
