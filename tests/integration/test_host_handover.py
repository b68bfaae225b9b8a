"""An SSH host handed to its deployed agent (``opsplane agents deploy``): its runs go to the
agent, an enrollment token may name it, and it keeps its SSH access — across a restart too,
so that a later upgrade still reaches it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from opsplane.agentdeploy.service import AgentDeployer, DeployRequest
from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.errors import Conflict
from opsplane.domain.inventory import SshHostRequest
from opsplane.engine.core import Engine
from opsplane.security.agents import AgentRegistry
from opsplane.transport.ssh import HostKeyPolicy, SshExecutor, SshLink


def _engine(root: Path) -> tuple[Engine, SshLink]:
    link = SshLink(SshExecutor(HostKeyPolicy(None)))
    return make_engine(load_settings(data_dir=root), [link]), link


def _registry(engine: Engine) -> AgentRegistry:
    assert isinstance(engine.agents, AgentRegistry)  # as make_engine wires it
    return engine.agents


def _deployer(engine: Engine, link: SshLink, root: Path) -> AgentDeployer:
    return AgentDeployer(engine.hosts, _registry(engine), link, root / "agent-bundles")


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


async def test_a_host_being_deployed_is_refused_to_a_second_deploy(tmp_path: Path) -> None:
    # A server that accepts and never speaks SSH: the first deploy waits in its probe.
    writers: list[asyncio.StreamWriter] = []

    async def mute(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    (bundle / "opsplane.pyz").write_bytes(b"")
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
        assert [(r.outcome, r.detail) for r in second.results] == [
            ("failed", "another deploy or upgrade of it is in progress")
        ]
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()
        await engine.stop()
