"""``opsplane demo``: the one-command start of the README, as a new user runs it."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.fleet import Fleet, child_env, free_port, wait_for
from tests.integration.seed_agent import SeedAgent
from tests.rabbitmq import private_vhost


def test_demo_starts_three_agents_runs_a_command_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    with (tmp_path / "demo.log").open("ab") as log:
        demo = subprocess.Popen(
            [
                sys.executable, "-m", "opsplane", "demo",
                "--listen", f"127.0.0.1:{fleet.http_port}",
                "--grpc-listen", fleet.grpc,
                "--data-dir", str(tmp_path / "data"),
            ],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(),
        )  # fmt: skip
    try:
        fleet.wait_online("demo-1", "demo-2", "demo-3", timeout=40)
        assert fleet.host("demo-3")["groups"] == ["db"]  # type: ignore[index]
        task = fleet.create_task("uname -a; echo done", all=True)
        done = fleet.wait_task_done(task["id"])
        assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 3
        children = psutil.Process(demo.pid).children(recursive=True)
        # The demo's three agents; the control plane's warden (execution/warden.py) is the rest.
        agents = [p for p in children if "agent" in p.cmdline()]
        assert len(agents) == 3 and len(children) == 4
        output = (tmp_path / "demo.log").read_text()
        assert f"http://127.0.0.1:{fleet.http_port}" in output and "opsplane run --all" in output
        _check_printed_credentials(fleet, output, tmp_path / "data")

        demo.send_signal(signal.SIGINT)
        # 130 is the conventional status of a program ended by Ctrl-C.
        assert demo.wait(timeout=30) in (0, 130)
        assert "Traceback" not in (tmp_path / "demo.log").read_text()
        wait_for(
            lambda: not any(p.is_running() and p.status() != "zombie" for p in agents),
            15,
            "agents gone",
        )
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def _check_printed_credentials(fleet: Fleet, output: str, data_dir: Path) -> None:
    """What the demo prints works: the token for the CLI, the password for the web page; both
    are kept in a file only the user can read."""
    token = re.search(r"export OPSPLANE_TOKEN=(ops_\S+)", output)
    login = re.search(r"log in as (\S+), password (\S+)\)", output)
    assert token and login, output
    env = {**child_env(), "OPSPLANE_URL": fleet.url, "OPSPLANE_TOKEN": token.group(1)}
    hosts = subprocess.run(
        [sys.executable, "-m", "opsplane", "hosts", "--json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert hosts.returncode == 0, hosts.stderr
    assert {h["name"] for h in json.loads(hosts.stdout)["items"]} == {"demo-1", "demo-2", "demo-3"}
    with fleet.client(token=None) as client:
        body = {"name": login.group(1), "password": login.group(2)}
        assert client.post("/api/v1/auth/login", json=body).status_code == 200
    credentials = data_dir / "demo-admin.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    # Printed once, in the banner; never in a log line.
    assert output.count(token.group(1)) == 1 and output.count(login.group(2)) == 1


def test_demo_refuses_a_bad_flag_with_a_clear_message(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "opsplane", "demo", "--listen", "nonsense",
         "--grpc-listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=child_env(), timeout=30, check=False,
    )  # fmt: skip
    assert (
        result.returncode == 2 and "HOST:PORT" in result.stderr and "Traceback" not in result.stderr
    )


@pytest.mark.service("rabbitmq")
@pytest.mark.default_vhost  # the demo's link consumes the default vhost's shared queues
def test_demo_seed002_lets_an_agent_written_from_the_seed_join_and_warns(tmp_path: Path) -> None:
    """Issue 16 item 5: ``opsplane demo --seed002`` turns enrollment off (saying so) and opens
    the RabbitMQ link; an unenrolled seed-002 agent joins and runs a command."""
    fleet = Fleet(tmp_path)
    with private_vhost("opsplane-demo") as vhost:
        with (tmp_path / "demo.log").open("ab") as log:
            demo = subprocess.Popen(
                [
                    sys.executable, "-m", "opsplane", "demo", "--seed002",
                    "--amqp-url", vhost.url,
                    "--listen", f"127.0.0.1:{fleet.http_port}",
                    "--grpc-listen", fleet.grpc,
                    "--data-dir", str(tmp_path / "data"),
                ],
                stdout=log, stderr=subprocess.STDOUT, env=child_env(),
            )  # fmt: skip
        try:
            # Up once the banner is out (the demo's own gRPC agents are not the point here).
            log_text = tmp_path / "demo.log"
            wait_for(lambda: "Press Ctrl-C" in log_text.read_text(), 120, "the demo's banner")
            agent = SeedAgent(f"seed-{uuid.uuid4().hex[:8]}", url=vhost.url, announce_groups=False)

            async def join_and_run() -> dict[str, Any]:
                await agent.start()
                beat = asyncio.create_task(agent.beat_every(0.5))
                try:
                    await asyncio.to_thread(fleet.wait_online, agent.hostname, timeout=30)
                    task = fleet.create_task("echo seed", hosts=[agent.hostname])
                    return await asyncio.to_thread(fleet.wait_task_done, task["id"], 60)
                finally:
                    beat.cancel()
                    await asyncio.gather(beat, return_exceptions=True)
                    await agent.stop()

            done = asyncio.run(join_and_run())
            assert done["status"] == "succeeded"
            output = (tmp_path / "demo.log").read_text()
            assert "require_enrollment is off" in output and "seed-002 agents" in output
        finally:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=30)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
