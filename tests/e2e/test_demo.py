"""``opsplane demo``: the one-command start of the README, as a new user runs it."""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil

from tests.e2e.fleet import Fleet, child_env, free_port, wait_for


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
