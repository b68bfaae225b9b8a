"""An SSH host handed to its deployed agent (``opsplane agents deploy``): its runs go to the
agent, an enrollment token may name it, and it keeps its SSH access — across a restart too,
so that a later upgrade still reaches it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from opsplane.agentdeploy.service import AgentDeployer, DeployRequest, lease_name
from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.errors import Conflict
from opsplane.domain.inventory import SshHostRequest
from opsplane.engine.core import Engine
from opsplane.security.agents import AgentRegistry
from opsplane.store.tables import LeaseRow
from opsplane.transport.ssh import HostKeyPolicy, SshExecutor, SshLink
from tests.auth import ADMIN_HEADERS
from tests.e2e.fleet import free_port
from tests.integration.apps import admin_api


def _engine(root: Path, database_url: str | None = None) -> tuple[Engine, SshLink]:
    link = SshLink(SshExecutor(HostKeyPolicy(None)))
    extra = {"database_url": database_url} if database_url else {}
    settings = load_settings(data_dir=root, **extra)
    return make_engine(settings, [link]), link


def _registry(engine: Engine) -> AgentRegistry:
    assert isinstance(engine.agents, AgentRegistry)  # as make_engine wires it
    return engine.agents


def _deployer(engine: Engine, link: SshLink, root: Path) -> AgentDeployer:
    return AgentDeployer(
        engine.hosts, _registry(engine), link, root / "agent-bundles",
        write=engine.write, instance=engine.instance,
    )  # fmt: skip


async def test_a_host_handed_to_its_agent_keeps_its_ssh_access_across_a_restart(
    tmp_path: Path,
) -> None:
    engine, link = _engine(tmp_path)
    await engine.start()
    try:
        request = SshHostRequest(name="web-1", address="127.0.0.1", port=2222, groups=("web",))
        await engine.hosts.register_ssh_host(request)
        with pytest.raises(Conflict):  # an SSH host's name is no agent's
            await _registry(engine).create_token(["web"], created_by="admin", name="web-1")
        await engine.hosts.hand_to_agent("web-1", "grpc")
        host = await engine.hosts.get_host("web-1")
        assert (host.link, host.status, host.groups) == ("grpc", "offline", ["web"])
        created = await _registry(engine).create_token(["web"], created_by="admin", name="web-1")
        assert created.token.name == "web-1"
        assert "web-1" in link.targets
        await engine.hosts.hand_to_agent("web-1", "grpc")  # again: nothing to do
    finally:
        await engine.stop()
    restarted, new_link = _engine(tmp_path)
    await restarted.start()
    try:
        assert new_link.targets["web-1"].endpoint.port == 2222
        reachable = await restarted.hosts.hosts_reachable_by_ssh()
        assert [h.name for h in reachable] == ["web-1"]
    finally:
        await restarted.stop()


@contextlib.asynccontextmanager
async def _mute_sshd() -> AsyncIterator[int]:
    """A server that accepts and never speaks SSH: a deploy to it waits in its probe."""
    writers: list[asyncio.StreamWriter] = []

    async def mute(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


def _bundle(root: Path) -> Path:
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    (bundle / "opsplane.pyz").write_bytes(b"")
    return bundle


async def test_two_instances_on_one_database_never_deploy_to_one_host_at_once(
    tmp_path: Path, database_url: str
) -> None:
    bundle = _bundle(tmp_path)
    engine_a, ssh_a = _engine(tmp_path / "a", database_url)
    engine_b, ssh_b = _engine(tmp_path / "b", database_url)
    a, b = _deployer(engine_a, ssh_a, tmp_path / "a"), _deployer(engine_b, ssh_b, tmp_path / "b")
    await engine_a.start()
    await engine_b.start()
    try:
        async with _mute_sshd() as port:
            request = SshHostRequest(name="web-1", address="127.0.0.1", port=port)
            await engine_a.hosts.register_ssh_host(request)
            wanted = DeployRequest(
                server="127.0.0.1:1", api_url="http://127.0.0.1:1", hosts=("web-1",),
                bundle=str(bundle),
            )  # fmt: skip
            first = asyncio.create_task(a.deploy(wanted))
            deadline = asyncio.get_running_loop().time() + 10
            while lease_name("web-1") not in await _leases(engine_b):
                assert asyncio.get_running_loop().time() < deadline, "a took no lease"
                await asyncio.sleep(0.05)
            second = await b.deploy(wanted)
            (refused,) = second.results
            assert refused.outcome == "failed"
            assert "another deploy or upgrade of it is in progress" in refused.detail
            assert "another one sharing its database" in refused.detail
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            # Released when a's deploy ended: b goes ahead at once (and fails later, for want
            # of SSH access in this instance, which only knows the host from the database).
            assert lease_name("web-1") not in await _leases(engine_b)
            third = await b.deploy(wanted)
            assert "in progress" not in third.results[0].detail
    finally:
        await engine_b.stop()
        await engine_a.stop()


async def _leases(engine: Engine) -> dict[str, str]:
    async with engine.sessions() as session:
        rows = (await session.execute(select(LeaseRow.name, LeaseRow.holder))).all()
    return {name: holder for name, holder in rows}


def test_a_long_host_name_gets_a_lease_name_that_fits() -> None:
    long = "h" * 255
    assert len(lease_name(long)) == 64 and lease_name(long) != lease_name(long[:-1] + "i")
    assert lease_name("web-1") == "agent-deploy:web-1"


async def test_a_host_being_deployed_is_refused_to_a_second_deploy(tmp_path: Path) -> None:
    async with _mute_sshd() as port:
        await _refused_while_deploying(tmp_path, port, _bundle(tmp_path))


async def _refused_while_deploying(tmp_path: Path, port: int, bundle: Path) -> None:
    engine, ssh = _engine(tmp_path / "data")
    deployer = _deployer(engine, ssh, tmp_path / "data")
    await engine.start()
    try:
        request = SshHostRequest(name="web-1", address="127.0.0.1", port=port, groups=("web",))
        await engine.hosts.register_ssh_host(request)
        wanted = DeployRequest(
            server="127.0.0.1:1", api_url="http://127.0.0.1:1", hosts=("web-1",),
            bundle=str(bundle),
        )  # fmt: skip
        first = asyncio.create_task(deployer.deploy(wanted))
        await asyncio.sleep(0.5)
        second = await deployer.deploy(wanted)
        assert [(r.outcome, r.detail[:46]) for r in second.results] == [
            ("failed", "another deploy or upgrade of it is in progress")
        ]
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
    finally:
        await engine.stop()


async def test_a_streamed_deploy_answers_each_host_as_it_ends_then_the_report(
    tmp_path: Path,
) -> None:
    bundle = _bundle(tmp_path)
    async with admin_api(tmp_path / "data") as (app, client):
        engine: Engine = app.state.engine
        for name in ("gone-1", "gone-2"):  # nothing listens there: each fails at its probe
            request = SshHostRequest(
                name=name, address="127.0.0.1", port=free_port(), groups=("web",)
            )
            await engine.hosts.register_ssh_host(request)
        body = {"group": "db", "stream": True, "bundle": str(bundle), "server": "127.0.0.1:1"}
        refused = await client.post("/api/v1/agents/deploy", json=body, headers=ADMIN_HEADERS)
        # A request that deploys nowhere is refused before any stream begins.
        assert refused.status_code in (400, 422), refused.text
        assert "no host with SSH access in group db" in refused.json()["detail"]
        answer = await client.post(
            "/api/v1/agents/deploy", json={**body, "group": "web"}, headers=ADMIN_HEADERS
        )
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in answer.text.splitlines()]
        assert [line["type"] for line in lines] == ["host", "host", "report"]
        assert {line["host"] for line in lines[:2]} == {"gone-1", "gone-2"}
        assert all(line["outcome"] == "failed" for line in lines[:2])
        assert all("probe failed" in line["detail"] for line in lines[:2])
        assert [r["host"] for r in lines[2]["results"]] == ["gone-1", "gone-2"]
