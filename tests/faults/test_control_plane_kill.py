"""Fault scenario 2 (issue 13): the control plane is killed with SIGKILL in the middle of a
fan-out — gRPC agents, RabbitMQ agents, SSH hosts and a seed-003 script running on the control
plane itself — and restarted on the same data directory and ports.

The RabbitMQ side uses a virtual host of its own (tests/rabbitmq.py).

What must hold: the control plane's own script dies with it (no orphan, ``setsid`` children
included: the warden, ``execution/warden.py``); after the restart every run reaches a terminal
state within a bounded time (agents' spooled results arrive; runs the control plane executed
itself end ``lost``); and nothing ran twice (each command appends its tag to a side-effect file).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import processes_with
from tests.e2e.fleet import Fleet, wait_for
from tests.e2e.test_cli import opsplane
from tests.integration.sshd import SshLab, sleep_marker, ssh_lab, wait_no_remote_process
from tests.rabbitmq import private_vhost

pytestmark = [pytest.mark.service("sshd"), pytest.mark.service("rabbitmq")]

AGENTS = ("kill-a1", "kill-a2")
MQ_AGENTS = ("kill-m1", "kill-m2")
SSH_TARGETS = ("kill-s1", "kill-s2")
# The warden's grace (LocalLink kill_grace, 5 s) plus room for a loaded machine.
ORPHAN_BOUND = 15.0
RECOVERY_BOUND = 60.0
TERMINAL = {"succeeded", "failed", "canceled", "timed_out", "undeliverable", "lost"}


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with ssh_lab() as the_lab:
        the_lab.start(list(SSH_TARGETS))
        yield the_lab


@dataclass
class Plane:
    fleet: Fleet
    server_args: tuple[str, ...]


@pytest.fixture
def amqp_url() -> Iterator[str]:
    with private_vhost() as vhost:
        yield vhost.url


@pytest.fixture
def plane(lab: SshLab, tmp_path: Path, amqp_url: str) -> Iterator[Plane]:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    # Records its execution, then leaves a child in its group and one that escaped it.
    sleeper = scripts / "sleeper.sh"
    sleeper.write_text(
        '#!/bin/sh\necho "$PARAM_TAG" >> "$PARAM_EFFECTS"\n'
        'sleep "$PARAM_A" &\nsetsid sleep "$PARAM_B" &\nwait\n'
    )
    sleeper.chmod(0o755)
    known = lab.known_hosts(tmp_path / "known_hosts", lab.daemons.values())
    config = tmp_path / "opsplane.yaml"
    config.write_text(
        f"ssh_known_hosts: {known}\nssh_user: {lab.user.name}\n"
        f"ssh_key_file: {lab.client_key_path}\n"
    )
    the_fleet = Fleet(tmp_path / "fleet", server_env={"OPSPLANE_LOST_GRACE": "120"})
    the_fleet.root.mkdir()
    args = ("--config", str(config), "--script-dir", str(scripts), "--amqp-url", amqp_url)
    the_fleet.start_server(*args)
    try:
        for name in AGENTS:
            the_fleet.start_agent(name, "kill")
        for name in MQ_AGENTS:
            the_fleet.start_amqp_agent(name, amqp_url, "kill")
        the_fleet.wait_online(*AGENTS, *MQ_AGENTS, timeout=30)
        for name in SSH_TARGETS:
            result = opsplane(
                the_fleet, "hosts", "add", name,
                "--ssh", f"{lab.user.name}@{lab.daemons[name].address}",
                "--key-file", str(lab.client_key_path), "--group", "kill-ssh",
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
        yield Plane(the_fleet, args)
    finally:
        the_fleet.stop()


def _seed_task(fleet: Fleet, task_id: str) -> dict[str, Any]:
    with fleet.client() as client:
        response = client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_control_plane_kill_mid_fan_out_leaves_no_orphan_and_nothing_forever_or_twice(
    plane: Plane, lab: SshLab
) -> None:
    fleet = plane.fleet
    tag = uuid.uuid4().hex[:12]
    local_effects = fleet.root / f"local-{tag}"
    remote_effects = lab.user.home / f"ssh-{tag}"
    in_group, escaped, remote = sleep_marker(), sleep_marker(), sleep_marker()

    with fleet.client() as client:
        response = client.post(
            "/tasks",
            json={
                "script_path": "sleeper.sh",
                "params": {"tag": tag, "effects": str(local_effects), "a": in_group, "b": escaped},
                "timeout": 600,
            },
        )
    assert response.status_code == 201, response.text
    script_task = str(response.json()["id"])
    ssh_task = fleet.create_task(
        f"echo {tag} >> {remote_effects}; sleep {remote}", timeout=600, groups=["kill-ssh"]
    )["id"]
    # Ends while the control plane is down: the agents spool their results.
    agent_task = fleet.create_task(
        f"sleep 2; echo {tag} >> executions-{tag}; echo ok", timeout=60, groups=["kill"]
    )["id"]

    def everything_running() -> bool:
        runs = [*fleet.runs(ssh_task).values(), *fleet.runs(agent_task).values()]
        return (
            len(runs) == len(SSH_TARGETS) + len(AGENTS) + len(MQ_AGENTS)
            and all(r["status"] == "running" for r in runs)
            and len(processes_with(escaped)) == 1
            and len(processes_with(in_group)) == 1
        )

    wait_for(everything_running, 20, "every run to be running")

    assert fleet.server is not None
    killed_at = time.monotonic()
    fleet.server.send_signal(signal.SIGKILL)
    assert fleet.server.wait(timeout=20) == -signal.SIGKILL

    # The control plane's script died with it, the child that escaped its group too; and the
    # SSH hosts' commands ended with their connections (the remote guard).
    wait_for(
        lambda: not processes_with(in_group) and not processes_with(escaped),
        ORPHAN_BOUND,
        "the control plane's script processes to be gone",
    )
    assert wait_no_remote_process(remote, ORPHAN_BOUND) == []
    orphans_gone_after = time.monotonic() - killed_at

    # The agents' commands end while nobody listens: their results are spooled.
    agents = (*AGENTS, *MQ_AGENTS)
    wait_for(
        lambda: all(_lines(fleet.root / "work" / n / f"executions-{tag}") for n in agents),
        15,
        "the agents' commands to end while the control plane is down",
    )
    restarted_at = time.monotonic()
    fleet.start_server(*plane.server_args)

    def all_terminal() -> bool:
        runs = [
            *fleet.runs(ssh_task).values(),
            *fleet.runs(agent_task).values(),
            *fleet.runs(script_task).values(),
        ]
        return all(r["status"] in TERMINAL for r in runs)

    wait_for(all_terminal, RECOVERY_BOUND, "every run to be terminal after the restart")
    recovered_after = time.monotonic() - restarted_at
    for task_id in (ssh_task, agent_task, script_task):
        fleet.wait_task_done(task_id, timeout=RECOVERY_BOUND)

    agent_runs = fleet.runs(agent_task)
    assert {h: r["status"] for h, r in agent_runs.items()} == dict.fromkeys(agents, "succeeded")
    ssh_runs = fleet.runs(ssh_task)
    assert {h: r["status"] for h, r in ssh_runs.items()} == dict.fromkeys(SSH_TARGETS, "lost")
    (script_run,) = fleet.runs(script_task).values()
    assert script_run["status"] == "lost", script_run
    assert _seed_task(fleet, script_task)["status"] not in ("pending", "running")

    time.sleep(2)  # a scheduler pass or two: nothing is sent again
    assert _lines(local_effects) == [tag]
    assert _lines(remote_effects) == [tag] * len(SSH_TARGETS)
    for name in agents:
        assert _lines(fleet.root / "work" / name / f"executions-{tag}") == [tag], name
    print(
        f"\ncontrol plane kill: results lost 0, duplicated 0, orphans 0 (local and remote,"
        f" {orphans_gone_after:.1f}s after the kill), every run terminal"
        f" {recovered_after:.1f}s after the restart"
    )
