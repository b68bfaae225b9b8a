"""One signature per dispatch batch on the gRPC link (issue 15, docs/security.md).

A real control plane (API, gRPC endpoint, its signing key) and real opsplane agents in process
that pinned its public key: a group command reaches every member signed once (the link counts
its signatures), each agent checks the signature, its name and its leaf's path to the signed
root, and runs it; a command to one host keeps the per-host signature, and runs too.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx

from opsplane.agent import Agent, AgentConfig
from opsplane.engine.core import Engine
from opsplane.transport.grpc.server import GrpcLink
from tests.auth import ADMIN_HEADERS
from tests.integration.apps import admin_api


async def _run(client: httpx.AsyncClient, engine: Engine, targets: dict[str, Any]) -> list[Any]:
    created = await client.post(
        "/api/v1/tasks",
        json={"command": "echo signed-once", "targets": targets, "timeout": 60},
        headers=ADMIN_HEADERS,
    )
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    async with asyncio.timeout(60):
        await engine.wait_task(task_id)
    runs = await client.get(
        f"/api/v1/tasks/{task_id}/runs", params={"output": "true"}, headers=ADMIN_HEADERS
    )
    items: list[Any] = runs.json()["items"]
    return items


async def _online(client: httpx.AsyncClient, name: str, within: float = 30.0) -> None:
    for _ in range(int(within / 0.1)):
        host = await client.get(f"/api/v1/hosts/{name}", headers=ADMIN_HEADERS)
        if host.status_code == 200 and host.json()["status"] == "online":
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"host {name} did not come online within {within}s")


async def _agents(stack: AsyncExitStack, configs: list[AgentConfig]) -> list[Agent]:
    agents = []
    for config in configs:
        agent = Agent(config)
        task = asyncio.create_task(agent.run())

        async def stop(agent: Agent = agent, task: asyncio.Task[None] = task) -> None:
            agent.request_stop()
            await asyncio.wait_for(task, 15)

        stack.push_async_callback(stop)
        agents.append(agent)
    return agents


async def test_a_group_command_is_signed_once_and_every_agent_verifies_and_runs_it(
    tmp_path: Path,
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    async with admin_api(tmp_path / "cp", require_enrollment=False) as (app, client):
        engine: Engine = app.state.engine
        link = engine.links["grpc"]
        assert isinstance(link, GrpcLink)
        pinned = str(engine.settings.signing_key_path.with_suffix(".pub"))
        names = [f"{group}-{i}" for i in range(4)]
        configs = [
            AgentConfig(
                server=f"127.0.0.1:{link.bound_port}",
                name=name,
                groups=(group,),
                state_dir=tmp_path / "agents" / name,
                control_plane_key=pinned,
                reconnect_initial=0.05,
                reconnect_max=0.5,
            )
            for name in names
        ]
        async with AsyncExitStack() as stack:
            agents = await _agents(stack, configs)
            for name in names:
                await _online(client, name)
            before = link.command_signatures
            runs = await _run(client, engine, {"groups": [group]})
            assert sorted(run["host"] for run in runs) == names
            assert all(run["status"] == "succeeded" for run in runs), runs
            assert all("signed-once" in run["stdout"] for run in runs)
            # One dispatch batch: one signature for the four hosts.
            assert link.command_signatures == before + 1
            # One host: the per-host signature, as before; accepted as well.
            (single,) = await _run(client, engine, {"hosts": [names[0]]})
            assert single["status"] == "succeeded"
            assert link.command_signatures == before + 2
            assert all(sum(agent.refusals.values()) == 0 for agent in agents)
