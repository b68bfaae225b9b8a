"""File push to agents over RabbitMQ (issue 19, docs/filepush.md, docs/amqp.md).

A real control plane (API, engine, RabbitMQ link on a private vhost) and real opsplane agents
in process on that broker:

- a 1 MiB file to each of 3 agents (unicast) and a 20-file directory to the 3 as one group
  task (one fan-out command carrying the manifest, chunks asked for together published once
  on the group key) land byte-exact;
- a second push of the tree writes nothing: every file is ``unchanged`` on every agent;
- a chunk altered on its way (the control plane's read, here) is refused by the agent: the
  old file stays;
- a destination outside the agent's roots is refused, nothing written.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from opsplane.agent import Agent, AgentConfig
from opsplane.engine.core import Engine
from opsplane.security.signing import load_or_create_private_key, public_key_text
from opsplane.transport.amqp.link import AmqpLink
from opsplane.transport.filepush import Manifest
from tests.auth import ADMIN_HEADERS
from tests.integration.apps import admin_api
from tests.integration.test_filepush import _lines, _tree
from tests.rabbitmq import PrivateVhost, private_vhost

pytestmark = pytest.mark.service("rabbitmq")

MIB = 1024 * 1024


@pytest.fixture
def vhost() -> Iterator[PrivateVhost]:
    with private_vhost("opsplane-push") as the_vhost:
        yield the_vhost


@dataclass
class ControlPlane:
    engine: Engine
    client: httpx.AsyncClient
    vhost: PrivateVhost
    tmp_path: Path

    @property
    def uploads(self) -> Path:
        return self.engine.settings.effective_upload_roots[0]

    @property
    def link(self) -> AmqpLink:
        link = self.engine.links["amqp"]
        assert isinstance(link, AmqpLink)
        return link

    def agent_config(self, name: str, **fields: Any) -> AgentConfig:
        key, _ = load_or_create_private_key(self.engine.settings.signing_key_path)
        return AgentConfig(
            name=name,
            state_dir=self.tmp_path / "agents" / name,
            reconnect_initial=0.05,
            reconnect_max=0.5,
            amqp_url=self.vhost.url,
            control_plane_key=public_key_text(key.public_key()),
            heartbeat_interval=1.0,
            **fields,
        )

    async def push(
        self, local: Path, remote: str, targets: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        created = await self.client.post(
            "/api/v1/tasks",
            json={
                "kind": "upload",
                "upload": {"local_path": str(local), "remote_path": remote},
                "targets": targets,
                "timeout": 60,
            },
            headers=ADMIN_HEADERS,
        )
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]
        async with asyncio.timeout(60):
            await self.engine.wait_task(task_id)
        task = (await self.client.get(f"/api/v1/tasks/{task_id}", headers=ADMIN_HEADERS)).json()
        runs = await self.client.get(
            f"/api/v1/tasks/{task_id}/runs", params={"output": "true"}, headers=ADMIN_HEADERS
        )
        return task, {run["host"]: run for run in runs.json()["items"]}


@asynccontextmanager
async def control_plane(tmp_path: Path, vhost: PrivateVhost) -> AsyncIterator[ControlPlane]:
    async with admin_api(
        tmp_path / "cp", amqp_url=vhost.url, require_enrollment=False, heartbeat_interval=1.0
    ) as (app, client):
        cp = ControlPlane(app.state.engine, client, vhost, tmp_path)
        cp.uploads.mkdir(parents=True, exist_ok=True)
        yield cp


@asynccontextmanager
async def agents_online(cp: ControlPlane, configs: list[AgentConfig]) -> AsyncIterator[list[str]]:
    async with AsyncExitStack() as stack:
        for config in configs:
            agent = Agent(config)
            task = asyncio.create_task(agent.run())

            async def stop(agent: Agent = agent, task: asyncio.Task[None] = task) -> None:
                agent.request_stop()
                await asyncio.wait_for(task, 15)

            stack.push_async_callback(stop)
        for config in configs:
            for _ in range(300):  # 30 s
                host = await cp.client.get(f"/api/v1/hosts/{config.name}", headers=ADMIN_HEADERS)
                if host.status_code == 200 and host.json()["status"] == "online":
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"{config.name} did not come online")
        yield [config.name for config in configs]


def _name() -> str:
    return f"apush-{uuid.uuid4().hex[:8]}"


async def test_file_and_tree_reach_three_rabbitmq_agents_byte_exact_then_unchanged(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    async with control_plane(tmp_path, vhost) as cp:
        group = f"push{uuid.uuid4().hex[:6]}"
        roots = [tmp_path / f"dest{i}" for i in range(3)]
        shared = tmp_path / "shared"
        configs = [
            cp.agent_config(_name(), groups=(group,), upload_roots=(root, shared)) for root in roots
        ]
        async with agents_online(cp, configs) as hosts:
            one = cp.uploads / "one.bin"
            one.write_bytes(os.urandom(MIB))
            for host, root in zip(hosts, roots, strict=True):
                _, runs = await cp.push(one, f"{root}/files/one.bin", {"hosts": [host]})
                assert runs[host]["status"] == "succeeded", runs[host]
                assert runs[host]["stdout"] == f"{root}/files/one.bin\n"
                assert (root / "files/one.bin").read_bytes() == one.read_bytes()

            tree = cp.uploads / "tree"
            files = _tree(tree)
            served, shared_before = cp.link.chunks_served, cp.link.chunks_shared
            # One group task: one fan-out command, its manifest inside.
            task, runs = await cp.push(tree, f"{shared}/tree", {"groups": [group]})
            why = {host: (run["error"], run["stderr"]) for host, run in runs.items()}
            assert task["status"] == "succeeded", why
            assert sorted(runs) == sorted(hosts)
            for host in hosts:
                assert len(_lines(runs[host]["stdout"])) == len(files)
            for relative, data in files.items():
                written = (shared / "tree" / relative).read_bytes()
                assert hashlib.sha256(written).digest() == hashlib.sha256(data).digest()
            assert (shared / "tree/big.bin").stat().st_mode & 0o777 == 0o750
            # 19 one-chunk files and big.bin's two distinct chunks, at most once per agent.
            assert 21 <= cp.link.chunks_served - served <= 3 * 21
            # Asked for by several agents at about the same time, a chunk goes out once on
            # the group key (21 publishes in all, 21 shared, on a quiet machine).
            assert cp.link.chunks_shared > shared_before

            served = cp.link.chunks_served
            _, runs = await cp.push(tree, f"{shared}/tree", {"groups": [group]})
            for host in hosts:
                assert _lines(runs[host]["stdout"]) == sorted(
                    f"unchanged {shared / 'tree' / name}" for name in files
                )
            assert cp.link.chunks_served == served


async def test_a_tampered_chunk_and_a_path_outside_the_roots_are_refused_over_rabbitmq(
    tmp_path: Path, vhost: PrivateVhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with control_plane(tmp_path, vhost) as cp:
        root = tmp_path / "dest"
        config = cp.agent_config(_name(), upload_roots=(root,))
        async with agents_online(cp, [config]) as (host,):
            source = cp.uploads / "f.bin"
            source.write_bytes(os.urandom(MIB + 10))
            root.mkdir()
            (root / "f.bin").write_bytes(b"old")

            # Something between the signed manifest and the agent alters a chunk: the
            # agent checks it against the manifest's SHA-256 and keeps the old file.
            chunks = cp.link._chunks
            read = chunks._read

            async def altered(manifest: Manifest, digest: str) -> bytes:
                data = await read(manifest, digest)
                return b"X" + data[1:]

            monkeypatch.setattr(chunks, "_read", altered)
            _, runs = await cp.push(source, f"{root}/f.bin", {"hosts": [host]})
            assert runs[host]["status"] == "failed"
            assert "does not match its hash" in runs[host]["stderr"]
            assert (root / "f.bin").read_bytes() == b"old"
            assert sorted(p.name for p in root.iterdir()) == ["f.bin"]
            monkeypatch.undo()

            outside = tmp_path / "outside"
            _, runs = await cp.push(source, f"{outside}/f.bin", {"hosts": [host]})
            assert runs[host]["status"] == "failed"
            assert "outside the allowed upload roots" in runs[host]["error"]
            assert not outside.exists()

            # A host of the inventory on RabbitMQ whose agent never said it is opsplane's (a
            # seed-002 agent would run the task's text as a shell line): refused at submit.
            seed = _name()
            added = await cp.client.post(
                "/api/v1/hosts", json={"name": seed, "link": "amqp"}, headers=ADMIN_HEADERS
            )
            assert added.status_code in (200, 201), added.text
            created = await cp.client.post(
                "/api/v1/tasks",
                json={
                    "kind": "upload",
                    "upload": {"local_path": str(source), "remote_path": "/tmp/x"},
                    "targets": {"hosts": [seed]},
                },
                headers=ADMIN_HEADERS,
            )
            assert created.status_code == 422, created.text
            assert "a seed-002 agent cannot take uploads" in created.text
