"""A task's ``run_as`` (issue 16 item 4): seed 002's ``user``, the account that runs the command.

A real control plane (API, gRPC endpoint, RabbitMQ link on a private virtual host) with real
opsplane agents on both links, and the seed-002 probe agent (tests/integration/seed_agent.py):

- run_as equal to the agent's own account runs; no run_as runs as the agent's account;
- another account the agent may not switch to is refused, with the reason, and never runs;
- as root, run_as nobody really runs as nobody; a real agent process started as nobody runs
  as nobody and refuses root;
- the seed agent sees ``"user": "<run_as>"`` and the caller in ``submitted_by``;
- an SSH host, or a name that is no user name, is refused at submit (422).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from opsplane.agent import Agent, AgentConfig
from opsplane.engine.core import Engine
from opsplane.security.signing import load_or_create_private_key, public_key_text
from opsplane.transport.grpc.server import GrpcLink
from tests.auth import ADMIN_HEADERS
from tests.conftest import unavailable
from tests.integration.apps import admin_api
from tests.integration.seed_agent import SeedAgent
from tests.rabbitmq import PrivateVhost, private_vhost

pytestmark = pytest.mark.service("rabbitmq")

# The account this test (and so the in-process agent) runs as.
OWN = pwd.getpwuid(os.geteuid()).pw_name
ROOT = os.geteuid() == 0
LINKS = ("grpc", "amqp")


@pytest.fixture
def vhost() -> Iterator[PrivateVhost]:
    with private_vhost("opsplane-runas") as the_vhost:
        yield the_vhost


@dataclass
class ControlPlane:
    engine: Engine
    client: httpx.AsyncClient
    vhost: PrivateVhost
    tmp_path: Path

    def agent_config(self, link: str, name: str, **fields: Any) -> AgentConfig:
        """An opsplane agent on ``link`` to this control plane."""
        common: dict[str, Any] = {
            "name": name,
            "state_dir": self.tmp_path / name,
            "reconnect_initial": 0.05,
            "reconnect_max": 0.5,
            **fields,
        }
        if link == "grpc":
            grpc_link = self.engine.links["grpc"]
            assert isinstance(grpc_link, GrpcLink)
            return AgentConfig(server=f"127.0.0.1:{grpc_link.bound_port}", **common)
        key, _ = load_or_create_private_key(self.engine.settings.signing_key_path)
        return AgentConfig(
            amqp_url=self.vhost.url,
            control_plane_key=public_key_text(key.public_key()),
            heartbeat_interval=1.0,
            **common,
        )

    async def run(self, host: str, command: str, **fields: Any) -> tuple[dict[str, Any], Any]:
        """Create a task on ``host`` through the API; the task's JSON and its run once ended."""
        created = await self.client.post(
            "/api/v1/tasks",
            json={"command": command, "targets": {"hosts": [host]}, "timeout": 30, **fields},
            headers=ADMIN_HEADERS,
        )
        assert created.status_code == 201, created.text
        task = created.json()
        async with asyncio.timeout(20):
            await self.engine.wait_task(task["id"])
        runs = await self.client.get(
            f"/api/v1/tasks/{task['id']}/runs",
            params={"output": "true"},
            headers=ADMIN_HEADERS,
        )
        (run,) = runs.json()["items"]
        return task, run


@asynccontextmanager
async def control_plane(tmp_path: Path, vhost: PrivateVhost) -> AsyncIterator[ControlPlane]:
    async with admin_api(
        tmp_path / "cp", amqp_url=vhost.url, require_enrollment=False, heartbeat_interval=1.0
    ) as (app, client):
        yield ControlPlane(app.state.engine, client, vhost, tmp_path)


@asynccontextmanager
async def agent_online(cp: ControlPlane, config: AgentConfig) -> AsyncIterator[str]:
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    try:
        await _until_online(cp, config.name)
        yield config.name
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 15)


async def _until_online(cp: ControlPlane, name: str, within: float = 30.0) -> None:
    for _ in range(int(within / 0.1)):
        host = await cp.client.get(f"/api/v1/hosts/{name}", headers=ADMIN_HEADERS)
        if host.status_code == 200 and host.json()["status"] == "online":
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"host {name} did not come online within {within}s")


def _name(link: str) -> str:
    return f"runas-{link}-{uuid.uuid4().hex[:8]}"


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        unavailable("no user 'nobody' on this host")


@pytest.mark.parametrize("link", LINKS)
async def test_the_agents_own_account_runs_with_or_without_run_as(
    link: str, tmp_path: Path, vhost: PrivateVhost
) -> None:
    async with (
        control_plane(tmp_path, vhost) as cp,
        agent_online(cp, cp.agent_config(link, _name(link))) as host,
    ):
        task, run = await cp.run(host, "id -un", run_as=OWN)
        assert task["run_as"] == OWN
        assert (run["status"], run["stdout"]) == ("succeeded", f"{OWN}\n"), run
        shown = await cp.client.get(f"/api/v1/tasks/{task['id']}", headers=ADMIN_HEADERS)
        assert shown.json()["run_as"] == OWN
        again = await cp.client.post(
            f"/api/v1/tasks/{task['id']}/rerun", json={"only": "all"}, headers=ADMIN_HEADERS
        )
        assert again.status_code == 201 and again.json()["run_as"] == OWN, again.text
        async with asyncio.timeout(20):
            await cp.engine.wait_task(again.json()["id"])

        task, run = await cp.run(host, "id -un")
        assert task["run_as"] is None
        assert (run["status"], run["stdout"]) == ("succeeded", f"{OWN}\n"), run


@pytest.mark.parametrize("link", LINKS)
async def test_another_account_the_agent_may_not_use_is_refused_and_never_runs(
    link: str, tmp_path: Path, vhost: PrivateVhost
) -> None:
    _nobody()
    marker = tmp_path / "ran"
    # Not root: the agent cannot switch at all. Root: its run_as is the only account it has.
    fields: dict[str, Any] = {"run_as": OWN} if ROOT else {}
    reason = (
        f"the agent runs commands as {OWN} only (its run_as); list other accounts in allowed_run_as"
        if ROOT
        else f"the agent is not root (uid {os.geteuid()}) and runs commands only as its own account"
    )
    async with (
        control_plane(tmp_path, vhost) as cp,
        agent_online(cp, cp.agent_config(link, _name(link), **fields)) as host,
    ):
        _, run = await cp.run(host, f"touch {marker}", run_as="nobody")
        assert run["status"] == "failed" and run["exit_code"] is None, run
        assert run["error"] == f"run-as nobody refused: {reason}; not executed"
        assert not marker.exists()

        _, run = await cp.run(host, "id -un", run_as="no-such-user-here")
        assert run["status"] == "failed"
        assert run["error"] == (
            "run-as no-such-user-here refused: no such user on this host; not executed"
        )
        # The agent goes on running what it may.
        _, run = await cp.run(host, f"touch {marker}")
        assert run["status"] == "succeeded" and marker.exists()


@pytest.mark.skipif(not ROOT, reason="switching to another user needs root")
@pytest.mark.parametrize("link", LINKS)
async def test_a_root_agent_runs_run_as_nobody_as_nobody(
    link: str, tmp_path: Path, vhost: PrivateVhost
) -> None:
    nobody = _nobody()
    async with control_plane(tmp_path, vhost) as cp:
        async with agent_online(cp, cp.agent_config(link, _name(link))) as host:
            _, run = await cp.run(host, 'id -un; id -u; echo "$HOME $USER"', run_as="nobody")
            assert run["status"] == "succeeded", run
            assert run["stdout"] == f"nobody\n{nobody.pw_uid}\n{nobody.pw_dir} nobody\n"
        # allowed_run_as narrows a root agent to the accounts listed.
        config = cp.agent_config(link, _name(link), allowed_run_as=("daemon",))
        async with agent_online(cp, config) as host:
            _, run = await cp.run(host, "id -un", run_as="nobody")
            assert run["status"] == "failed"
            assert run["error"] == (
                "run-as nobody refused: not in the agent's allowed_run_as (daemon); not executed"
            )
            _, run = await cp.run(host, "id -un", run_as="root")
            assert (run["status"], run["stdout"]) == ("succeeded", "root\n")


@pytest.mark.skipif(not ROOT, reason="starts the agent as nobody, which needs root")
@pytest.mark.parametrize("link", LINKS)
async def test_an_agent_process_that_is_not_root_runs_only_as_itself(
    link: str, tmp_path: Path, vhost: PrivateVhost
) -> None:
    """A real ``opsplane agent`` process started as nobody: asked for nobody it runs, asked
    for root it refuses without running. (Not as root, the tests above cover this already.)"""
    nobody = _nobody()
    # Somewhere nobody may write: pytest's own directories are root's alone.
    base = Path(tempfile.mkdtemp(prefix="opsplane-runas-"))
    os.chmod(base, 0o777)
    marker, log = base / "ran", tmp_path / "agent.log"
    name = _name(link)
    try:
        async with control_plane(tmp_path, vhost) as cp:
            config = cp.agent_config(link, name)
            where = (
                ["--amqp-url", vhost.url, "--control-plane-key", config.control_plane_key or ""]
                if link == "amqp"
                else ["--server", config.server]
            )
            argv = [
                "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                "--clear-groups", "--",
                sys.executable, "-m", "opsplane", "agent", "--name", name,
                "--state-dir", str(base / "state"), "--heartbeat-interval", "1", *where,
            ]  # fmt: skip
            with log.open("wb") as out:
                agent = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)
            try:
                await _until_online(cp, name)
                _, run = await cp.run(name, "id -un", run_as="nobody")
                assert (run["status"], run["stdout"]) == ("succeeded", "nobody\n"), run
                _, run = await cp.run(name, f"touch {marker}", run_as="root")
                assert run["status"] == "failed"
                assert run["error"] == (
                    f"run-as root refused: the agent is not root (uid {nobody.pw_uid}) and "
                    "runs commands only as its own account; not executed"
                )
                assert not marker.exists()
            finally:
                if agent.returncode is None:
                    agent.send_signal(signal.SIGTERM)
                await asyncio.wait_for(agent.wait(), 30)
    except BaseException:
        sys.stderr.write(log.read_text() if log.exists() else "(no agent log)\n")
        raise
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_the_seed_agent_sees_run_as_in_user_and_the_caller_in_submitted_by(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    seed = SeedAgent(_name("seed"), url=vhost.url, announce_groups=False)
    async with control_plane(tmp_path, vhost) as cp:
        await seed.start()
        beats = asyncio.create_task(seed.beat_every(0.5))
        try:
            await _until_online(cp, seed.hostname)
            task, _ = await cp.run(seed.hostname, "echo hi", run_as="deploy")
            await cp.run(seed.hostname, "echo hi")
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            await seed.stop()
    asked, default = seed.received
    # The seed's example: "user": "root", the account that runs the command.
    assert asked["user"] == "deploy"
    assert asked["submitted_by"] == default["submitted_by"] == task["created_by"] != ""
    assert default["user"] == ""


async def test_ssh_hosts_and_names_that_are_no_user_names_are_refused_at_submit(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    async with control_plane(tmp_path, vhost) as cp:
        added = await cp.client.post(
            "/api/v1/hosts",
            json={"name": "ssh-1", "link": "ssh", "ssh": "ops@127.0.0.1:1"},
            headers=ADMIN_HEADERS,
        )
        assert added.status_code == 201, added.text
        refused = await cp.client.post(
            "/api/v1/tasks",
            json={"command": "id", "targets": {"hosts": ["ssh-1"]}, "run_as": "deploy"},
            headers=ADMIN_HEADERS,
        )
        assert refused.status_code == 422, refused.text
        assert "run_as 'deploy' needs hosts with an opsplane or seed-002 agent" in refused.text
        assert "ssh-1" in refused.text
        for bad in ("root; id", "-u", "1000", "", "a" * 33, "deploy\n", "$(id)"):
            refused = await cp.client.post(
                "/api/v1/tasks",
                json={"command": "id", "targets": {"hosts": ["ssh-1"]}, "run_as": bad},
                headers=ADMIN_HEADERS,
            )
            assert refused.status_code == 422, (bad, refused.text)
            assert "is not a user name" in refused.text, refused.text
        # Nothing was created by any of them.
        tasks = await cp.client.get("/api/v1/tasks", headers=ADMIN_HEADERS)
        assert tasks.json()["items"] == []
