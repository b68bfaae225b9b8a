"""Agent enrollment end to end: a real control plane and real agents over gRPC.

A one-time token enrolls one agent for its groups; the agent pins the control plane's key;
a spent token, a group the token did not allow and another key under an enrolled name are
refused; a revoked agent is dropped and cannot come back."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.fleet import Fleet, running_fleet, wait_for


@pytest.fixture(scope="module")
def enrolling_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("enroll"), {}) as fleet:
        yield fleet


def _token(fleet: Fleet, *groups: str) -> str:
    with fleet.client() as client:
        answer = client.post("/api/v1/agents/tokens", json={"groups": list(groups)})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["token"])


def _enrolling_agent(
    fleet: Fleet, name: str, token: str, *groups: str, state: str | None = None
) -> subprocess.Popen[bytes]:
    args = ("--enroll", token, "--api-url", fleet.url)
    if state is not None:
        args += ("--state-dir", str(fleet.root / "agents" / state))
    return fleet.start_agent(name, *groups, extra_args=args)


def _exit_code(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    return process.wait(timeout=timeout)


def test_an_enrolled_agent_joins_only_its_groups_and_pins_the_key(enrolling_fleet: Fleet) -> None:
    fleet = enrolling_fleet
    token = _token(fleet, "web")
    _enrolling_agent(fleet, "enr-web-1", token)
    fleet.wait_online("enr-web-1")
    host = fleet.host("enr-web-1")
    assert host is not None and host["groups"] == ["web"]
    state = fleet.root / "agents" / "enr-web-1"
    pinned = (state / "control-plane.pub").read_text().strip()
    assert pinned == (fleet.data_dir / "keys" / "control-plane.pub").read_text().strip()
    with fleet.client() as client:
        agents = client.get("/api/v1/agents").json()["items"]
    assert [(a["name"], a["groups"], a["revoked_at"]) for a in agents] == [
        ("enr-web-1", ["web"], None)
    ]

    # The token is spent: a second agent cannot use it.
    second = _enrolling_agent(fleet, "enr-web-2", token)
    assert _exit_code(second) == 2
    assert "enrollment refused (401)" in (fleet.root / "agent-enr-web-2.log").read_text()

    # The agent restarts from its state directory, without the token, and runs commands.
    fleet.stop_agent("enr-web-1")
    fleet.start_agent("enr-web-1")
    fleet.wait_online("enr-web-1")
    task = fleet.create_task("echo enrolled", hosts=["enr-web-1"])
    assert fleet.wait_task_done(task["id"])["status"] == "succeeded"


def test_a_token_for_one_group_cannot_join_another(enrolling_fleet: Fleet) -> None:
    fleet = enrolling_fleet
    greedy = _enrolling_agent(fleet, "enr-db-1", _token(fleet, "db"), "db", "web")
    assert _exit_code(greedy) == 2
    # Enrolled (for db only), but it asked for web too: it never starts.
    log = (fleet.root / "agent-enr-db-1.log").read_text()
    assert "--group web: not allowed by the enrollment" in log
    assert fleet.host("enr-db-1") is None


def test_another_key_under_an_enrolled_name_and_a_revoked_agent_are_refused(
    enrolling_fleet: Fleet,
) -> None:
    fleet = enrolling_fleet
    _enrolling_agent(fleet, "enr-app-1", _token(fleet, "app"))
    fleet.wait_online("enr-app-1")
    # An impostor: the same name, its own fresh key, no enrollment of its own.
    genuine = fleet.agents["enr-app-1"]
    impostor = fleet.start_agent(
        "enr-app-1", extra_args=("--state-dir", str(fleet.root / "agents" / "impostor"))
    )
    fleet.agents["enr-app-1"] = genuine
    wait_for(
        lambda: "presented a key other than the one it enrolled with" in fleet.server_log(),
        20,
        "the impostor's hello to be refused",
    )
    impostor.terminate()
    impostor.wait(timeout=20)

    with fleet.client() as client:
        revoked = client.post("/api/v1/agents/enr-app-1/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    fleet.wait_offline("enr-app-1")
    wait_for(lambda: "agent enr-app-1 was revoked" in fleet.server_log(), 20, "reconnects refused")
    with fleet.client() as client:
        metrics = client.get("/metrics").text
        audit = client.get("/api/v1/audit", params={"format": "jsonl"}).text.splitlines()
    assert 'opsplane_messages_refused_total{link="grpc",reason="refused_agent"}' in metrics
    actions = {(r["action"], r["outcome"]) for r in map(json.loads, audit)
               if r["target"] == "enr-app-1" or r["action"] == "agent.token"}  # fmt: skip
    assert {("agent.token", "ok"), ("agent.enroll", "ok"), ("agent.revoke", "ok")} <= actions
