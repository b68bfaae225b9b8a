"""File push to agents over gRPC (issue 19, docs/filepush.md).

A real control plane (API, gRPC endpoint) and real opsplane agents in process:

- a 1 MiB file and a 20-file directory (one file of several chunks) reach 3 agents byte-exact,
  with mode, each run listing its files;
- a second push of the same files writes nothing: every file is ``unchanged``;
- a destination outside the agent's ``upload_roots``, or any upload to an agent without them,
  is refused by the agent and nothing is written;
- an upload over the control plane's ``upload_max_bytes`` is refused at submit (422).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from opsplane.agent import Agent, AgentConfig
from opsplane.agent.files import WINDOW
from opsplane.engine.core import Engine
from opsplane.transport.grpc.server import GrpcLink
from tests.auth import ADMIN_HEADERS
from tests.integration.apps import admin_api

MIB = 1024 * 1024


@dataclass
class ControlPlane:
    engine: Engine
    client: httpx.AsyncClient
    tmp_path: Path

    @property
    def uploads(self) -> Path:
        return self.engine.settings.effective_upload_roots[0]

    def agent_config(self, name: str, **fields: Any) -> AgentConfig:
        grpc_link = self.engine.links["grpc"]
        assert isinstance(grpc_link, GrpcLink)
        return AgentConfig(
            server=f"127.0.0.1:{grpc_link.bound_port}",
            name=name,
            state_dir=self.tmp_path / "agents" / name,
            reconnect_initial=0.05,
            reconnect_max=0.5,
            **fields,
        )

    async def push(
        self, local: Path, remote: str, hosts: list[str], **fields: Any
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """An upload task through the API; the task and its runs by host, once ended.
        ``fields``: more of the body (``owner``/``group`` go in ``upload``)."""
        upload = {"local_path": str(local), "remote_path": remote}
        for key in ("owner", "group"):
            if key in fields:
                upload[key] = fields.pop(key)
        created = await self.client.post(
            "/api/v1/tasks",
            json={
                "kind": "upload",
                "upload": upload,
                "targets": {"hosts": hosts},
                "timeout": 60,
                **fields,
            },
            headers=ADMIN_HEADERS,
        )
        assert created.status_code == 201, created.text
        return await self.ended(created.json()["id"])

    async def ended(self, task_id: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        async with asyncio.timeout(60):
            await self.engine.wait_task(task_id)
        task = (await self.client.get(f"/api/v1/tasks/{task_id}", headers=ADMIN_HEADERS)).json()
        runs = await self.client.get(
            f"/api/v1/tasks/{task_id}/runs",
            params={"output": "true"},
            headers=ADMIN_HEADERS,
        )
        return task, {run["host"]: run for run in runs.json()["items"]}


@asynccontextmanager
async def control_plane(tmp_path: Path, **settings: Any) -> AsyncIterator[ControlPlane]:
    async with admin_api(tmp_path / "cp", require_enrollment=False, **settings) as (app, client):
        cp = ControlPlane(app.state.engine, client, tmp_path)
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
            await _until_online(cp, config.name)
        yield [config.name for config in configs]


async def _until_online(cp: ControlPlane, name: str, within: float = 30.0) -> None:
    for _ in range(int(within / 0.1)):
        host = await cp.client.get(f"/api/v1/hosts/{name}", headers=ADMIN_HEADERS)
        if host.status_code == 200 and host.json()["status"] == "online":
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"host {name} did not come online within {within}s")


def _name() -> str:
    return f"push-{uuid.uuid4().hex[:8]}"


def _tree(base: Path) -> dict[str, bytes]:
    """20 files in nested directories, one of them 2.5 MiB (three chunks, one repeated)."""
    files: dict[str, bytes] = {}
    for i in range(19):
        files[f"d{i % 3}/sub{i % 2}/f{i}.txt"] = os.urandom(100 + i * 1000)
    files["big.bin"] = os.urandom(MIB) * 2 + os.urandom(MIB // 2)
    for relative, data in files.items():
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (base / "big.bin").chmod(0o750)
    return files


def _lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line)


async def test_file_and_tree_reach_three_agents_byte_exact_then_unchanged(
    tmp_path: Path,
) -> None:
    async with control_plane(tmp_path) as cp:
        roots = [tmp_path / f"dest{i}" for i in range(3)]
        configs = [cp.agent_config(_name(), upload_roots=(root,)) for root in roots]
        async with agents_online(cp, configs) as hosts:
            one = cp.uploads / "one.bin"
            one.write_bytes(os.urandom(MIB))
            tree = cp.uploads / "tree"
            files = _tree(tree)
            for host, root in zip(hosts, roots, strict=True):
                # Each agent its own destination: a task per agent for the byte-exact check.
                _, runs = await cp.push(one, f"{root}/files/one.bin", [host])
                assert runs[host]["status"] == "succeeded", runs[host]
                assert runs[host]["stdout"] == f"{root}/files/one.bin\n"
                assert (root / "files/one.bin").read_bytes() == one.read_bytes()

            shared = roots[0] / "tree"
            _, runs = await cp.push(tree, str(shared), [hosts[0]])
            run = runs[hosts[0]]
            assert run["status"] == "succeeded", run
            assert _lines(run["stdout"]) == sorted(str(shared / name) for name in files)
            for relative, data in files.items():
                assert (shared / relative).read_bytes() == data, relative
            assert (shared / "big.bin").stat().st_mode & 0o777 == 0o750

            again, runs = await cp.push(tree, str(shared), [hosts[0]])
            assert again["status"] == "succeeded"
            assert _lines(runs[hosts[0]]["stdout"]) == sorted(
                f"unchanged {shared / name}" for name in files
            )
            # A changed file is written again, the others stay unchanged.
            (tree / "d0/sub0/f0.txt").write_bytes(b"changed\n")
            _, runs = await cp.push(tree, str(shared), [hosts[0]])
            written = [line for line in _lines(runs[hosts[0]]["stdout"]) if line.startswith("/")]
            assert written == [str(shared / "d0/sub0/f0.txt")]
            assert (shared / "d0/sub0/f0.txt").read_bytes() == b"changed\n"


async def test_one_task_to_three_agents(tmp_path: Path) -> None:
    """One task, three agents, one destination each may write (a root they all allow)."""
    async with control_plane(tmp_path) as cp:
        root = tmp_path / "dest"
        configs = [cp.agent_config(_name(), upload_roots=(root,)) for _ in range(3)]
        async with agents_online(cp, configs) as hosts:
            source = cp.uploads / "tree"
            files = _tree(source)
            # The three agents share this machine's disk: one tree under the root all three
            # allow, each agent replacing the files atomically (another agent's rename may
            # come first: written or unchanged, never failed).
            task, runs = await cp.push(source, f"{root}/all", hosts)
            why = {host: (run["error"], run["stderr"]) for host, run in runs.items()}
            assert task["status"] == "succeeded", why
            for host in hosts:
                shown = _lines(runs[host]["stdout"])
                assert len(shown) == len(files), shown
                assert runs[host]["stderr"] == ""
            for relative, data in files.items():
                assert hashlib.sha256((root / "all" / relative).read_bytes()).digest() == (
                    hashlib.sha256(data).digest()
                )
            _, runs = await cp.push(source, f"{root}/all", hosts)
            for host in hosts:
                assert all(line.startswith("unchanged ") for line in _lines(runs[host]["stdout"]))


async def test_a_transfer_resumes_after_the_stream_breaks(tmp_path: Path) -> None:
    """The control plane drops the agent's stream mid-transfer; the agent reconnects and asks
    again only for the chunks it did not have: the file lands whole, and no more than a
    window of chunks is sent twice."""
    async with control_plane(tmp_path) as cp:
        root = tmp_path / "dest"
        config = cp.agent_config(_name(), upload_roots=(root,))
        async with agents_online(cp, [config]) as (host,):
            source = cp.uploads / "big.bin"
            chunks = 48
            source.write_bytes(os.urandom(chunks * MIB))
            grpc_link = cp.engine.links["grpc"]
            assert isinstance(grpc_link, GrpcLink)
            pushing = asyncio.ensure_future(cp.push(source, f"{root}/big.bin", [host]))
            for _ in range(6000):  # 30 s
                if grpc_link.chunks_served >= chunks // 3:
                    break
                await asyncio.sleep(0.005)
            first_stream = grpc_link._streams[host]
            await grpc_link.drop(host, "test: break the stream mid-transfer")
            _, runs = await pushing
            assert runs[host]["status"] == "succeeded", runs[host]
            assert (root / "big.bin").read_bytes() == source.read_bytes()
            # A new stream carried the rest; chunks written before the break were not sent
            # again (a chunk lost with the old stream is not counted as served).
            assert grpc_link._streams[host] is not first_stream
            assert grpc_link.chunks_served < chunks + WINDOW


async def test_destinations_outside_the_roots_are_refused(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as cp:
        root = tmp_path / "allowed"
        outside = tmp_path / "outside"
        allowed, closed = cp.agent_config(_name(), upload_roots=(root,)), cp.agent_config(_name())
        async with agents_online(cp, [allowed, closed]) as (host, closed_host):
            source = cp.uploads / "f.txt"
            source.write_bytes(b"data\n")
            _, runs = await cp.push(source, f"{outside}/f.txt", [host])
            assert runs[host]["status"] == "failed"
            assert "outside the allowed upload roots" in runs[host]["error"]
            _, runs = await cp.push(source, f"{root}/../outside/f.txt", [host])
            assert runs[host]["status"] == "failed"
            assert "'..'" in runs[host]["error"]
            # A symlink inside the root that leads out of it is not written through.
            root.mkdir(parents=True, exist_ok=True)
            outside.mkdir()
            (root / "escape").symlink_to(outside)
            _, runs = await cp.push(source, f"{root}/escape/f.txt", [host])
            assert runs[host]["status"] == "failed"
            assert "outside the upload root" in runs[host]["stderr"]
            _, runs = await cp.push(source, f"{root}/f.txt", [closed_host])
            assert runs[closed_host]["status"] == "failed"
            assert "accepts no uploads" in runs[closed_host]["error"]
            assert not (outside / "f.txt").exists()


async def test_an_upload_over_the_size_limit_is_refused_at_submit(tmp_path: Path) -> None:
    async with control_plane(tmp_path, upload_max_bytes=1000) as cp:
        config = cp.agent_config(_name(), upload_roots=(tmp_path / "dest",))
        async with agents_online(cp, [config]) as (host,):
            source = cp.uploads / "big.bin"
            source.write_bytes(b"x" * 1001)
            created = await cp.client.post(
                "/api/v1/tasks",
                json={
                    "kind": "upload",
                    "upload": {"local_path": str(source), "remote_path": "/tmp/x"},
                    "targets": {"hosts": [host]},
                },
                headers=ADMIN_HEADERS,
            )
            assert created.status_code == 422, created.text
            assert "over the limit of 1000 bytes" in created.text


async def test_owner_and_group_from_the_api_and_bad_values_refused(tmp_path: Path) -> None:
    """Issue 19: ``owner``/``group`` of an upload reach the agent inside the signed manifest
    (by name or id); a value that is no user name nor id is refused at submit (422), and a
    user the host does not know fails the run with a sentence."""
    async with control_plane(tmp_path) as cp:
        root = tmp_path / "dest"
        config = cp.agent_config(_name(), upload_roots=(root,))
        async with agents_online(cp, [config]) as (host,):
            tree = cp.uploads / "tree"
            (tree / "sub").mkdir(parents=True)
            (tree / "sub/a.txt").write_bytes(b"a\n")
            (tree / "b.txt").write_bytes(b"b\n")
            _, runs = await cp.push(tree, f"{root}/t", [host], owner="nobody", group="65534")
            assert runs[host]["status"] == "succeeded", runs[host]
            for relative in ("sub/a.txt", "b.txt"):
                info = (root / "t" / relative).stat()
                assert (info.st_uid, info.st_gid) == (65534, 65534)
            # Unchanged files still get the owner asked for.
            _, runs = await cp.push(tree, f"{root}/t", [host], owner="0", group="root")
            assert runs[host]["stdout"].count("unchanged ") == 2
            assert (root / "t/b.txt").stat().st_uid == 0
            _, runs = await cp.push(tree, f"{root}/t", [host], group="no-such-group-19")
            assert runs[host]["status"] == "failed"
            assert runs[host]["error"] == "no group 'no-such-group-19' on this host"
            for bad in ("www data", "-rf", "$(id)", "99999999999"):
                created = await cp.client.post(
                    "/api/v1/tasks",
                    json={
                        "kind": "upload",
                        "upload": {
                            "local_path": str(tree),
                            "remote_path": f"{root}/t",
                            "owner": bad,
                        },
                        "targets": {"hosts": [host]},
                    },
                    headers=ADMIN_HEADERS,
                )
                assert created.status_code == 422, (bad, created.text)
                assert "owner" in created.text and "numeric id" in created.text


async def test_an_agent_killed_mid_transfer_resumes_after_its_restart(tmp_path: Path) -> None:
    """Issue 19: ``kill -9`` the agent (a process) a third into a 48 MiB push; the run is
    lost, the task's retry goes to the restarted agent, which finds the chunks it had
    written in the ``.part`` file (checked against the signed manifest) and asks only for
    the others: the file lands byte-exact and fewer than a window of chunks is sent twice."""
    async with control_plane(tmp_path) as cp:
        root = tmp_path / "dest"
        name = _name()
        grpc_link = cp.engine.links["grpc"]
        assert isinstance(grpc_link, GrpcLink)
        log = tmp_path / "agent.log"
        argv = [
            sys.executable, "-m", "opsplane", "agent",
            "--server", f"127.0.0.1:{grpc_link.bound_port}", "--name", name,
            "--state-dir", str(tmp_path / "agent-state"), "--upload-root", str(root),
        ]  # fmt: skip

        async def start() -> asyncio.subprocess.Process:
            with log.open("ab") as out:
                return await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)

        agent = await start()
        try:
            await _until_online(cp, name)
            source = cp.uploads / "big.bin"
            chunks = 48
            source.write_bytes(os.urandom(chunks * MIB))
            created = await cp.client.post(
                "/api/v1/tasks",
                json={
                    "kind": "upload",
                    "upload": {"local_path": str(source), "remote_path": f"{root}/big.bin"},
                    "targets": {"hosts": [name]},
                    "timeout": 120,
                    "retries": {"max_attempts": 2, "on": ["lost"]},
                },
                headers=ADMIN_HEADERS,
            )
            assert created.status_code == 201, created.text
            for _ in range(6000):  # 30 s
                if grpc_link.chunks_served >= chunks // 3:
                    break
                await asyncio.sleep(0.005)
            agent.send_signal(signal.SIGKILL)
            await asyncio.wait_for(agent.wait(), 15)
            before = grpc_link.chunks_served
            assert chunks // 3 <= before < chunks
            (part,) = [p for p in root.iterdir() if p.name.endswith(".part")]
            agent = await start()
            task, runs = await cp.ended(created.json()["id"])
            assert task["status"] == "succeeded", (runs, log.read_text()[-3000:])
            assert (root / "big.bin").read_bytes() == source.read_bytes()
            assert not part.exists()
            # The chunks served before the kill were written (all but those in flight):
            # the retry asked for the rest only.
            assert grpc_link.chunks_served - before <= chunks - before + WINDOW
            assert grpc_link.chunks_served < chunks + WINDOW
        finally:
            if agent.returncode is None:
                agent.send_signal(signal.SIGTERM)
                await asyncio.wait_for(agent.wait(), 15)
