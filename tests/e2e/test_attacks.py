"""Issue 14's attacks, each against a real control plane and real agents on loopback, each
refused and counted: taking over a host name by enrollment (items 1) or by a hello, and
replaying a captured gRPC hello (item 3) through a logging TCP proxy. (Item 2, a command signed
for one host replayed to another, is in tests/integration/test_agent_protocol.py for gRPC and
tests/integration/test_amqp_agent.py for RabbitMQ.)

The fleet keeps the e2e default ``require_enrollment: false``: the weakest setting, where a
hello alone decides who a host is, so the hello-level guards are what is tested."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.security.signing import public_key_text
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.convert import CHALLENGE_KEY
from tests.e2e.fleet import Fleet, running_fleet, wait_for
from tests.e2e.test_cli import opsplane
from tests.e2e.wiretap import WireTap, grpc_messages, replay_raw

SSH_HOST = "ssh-db-9"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("attacks"), {}) as the_fleet:
        with the_fleet.client() as client:
            # An agentless host, never reachable: only its name and link matter here.
            added = client.post(
                "/api/v1/hosts", json={"name": SSH_HOST, "ssh": "ops@127.0.0.1:1", "groups": ["db"]}
            )
        assert added.status_code == 201, added.text
        yield the_fleet


def _token(fleet: Fleet, *groups: str, name: str | None = None) -> str:
    body: dict[str, Any] = {"groups": list(groups)}
    if name is not None:
        body["name"] = name
    with fleet.client() as client:
        answer = client.post("/api/v1/agents/tokens", json=body)
    assert answer.status_code == 201, answer.text
    assert answer.json()["name"] == name
    return str(answer.json()["token"])


def _enroll(fleet: Fleet, token: str, name: str) -> tuple[int, str]:
    key = public_key_text(Ed25519PrivateKey.generate().public_key())
    with fleet.client(token=None) as client:
        answer = client.post(
            "/api/v1/agents/enroll", json={"token": token, "name": name, "public_key": key}
        )
    return answer.status_code, str(answer.json().get("detail", ""))


def _refused(fleet: Fleet, reason: str) -> float:
    with fleet.client() as client:
        metrics = client.get("/metrics").text
    pattern = rf'opsplane_messages_refused_total\{{link="grpc",reason="{reason}"\}} (\S+)'
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else 0.0


def test_an_enrollment_token_cannot_take_the_control_plane_or_an_ssh_host(fleet: Fleet) -> None:
    token = _token(fleet, "web")
    status, detail = _enroll(fleet, token, "control-plane")
    assert status == 409 and "control plane" in detail, detail
    status, detail = _enroll(fleet, token, SSH_HOST)
    assert status == 409 and "ssh host" in detail, detail
    # Refused enrollments leave the token unspent: it still enrolls a free name.
    assert _enroll(fleet, token, "atk-web-1")[0] == 201
    # A host already in the inventory (an agent's) needs a token issued for its name.
    fleet.start_agent("atk-web-2", "web")
    fleet.wait_online("atk-web-2")
    status, detail = _enroll(fleet, _token(fleet, "web"), "atk-web-2")
    assert status == 409 and "--name atk-web-2" in detail, detail
    assert _enroll(fleet, _token(fleet, "web", name="atk-web-2"), "atk-web-2")[0] == 201
    # Nor can an admin issue a token for those names.
    with fleet.client() as client:
        for name in ("control-plane", SSH_HOST):
            answer = client.post("/api/v1/agents/tokens", json={"groups": [], "name": name})
            assert answer.status_code == 409, answer.text
    host = fleet.host(SSH_HOST)
    assert host is not None and host["link"] == "ssh" and host["groups"] == ["db"]


def test_a_token_bound_to_a_name_enrolls_that_name_only(fleet: Fleet) -> None:
    made = opsplane(fleet, "agents", "token", "--group", "web", "--name", "atk-web-7")
    assert made.returncode == 0 and "named atk-web-7" in made.stderr, made.stderr
    token = made.stdout.strip()
    status, detail = _enroll(fleet, token, "atk-web-8")
    assert status == 403 and "atk-web-7" in detail, detail
    assert _enroll(fleet, token, "atk-web-7")[0] == 201
    assert _enroll(fleet, token, "atk-web-7")[0] == 401  # spent


def test_an_agent_hello_never_takes_over_another_links_host(fleet: Fleet) -> None:
    before = _refused(fleet, "refused_agent")
    # Not enrolled (the fleet does not require it), so only the hello guards these names.
    for name in ("control-plane", SSH_HOST):
        fleet.start_agent(name, "web")
    wait_for(lambda: _refused(fleet, "refused_agent") >= before + 2, 30, "both hellos refused")
    for name in ("control-plane", SSH_HOST):
        fleet.stop_agent(name)
    host = fleet.host(SSH_HOST)
    assert host is not None and host["link"] == "ssh" and host["groups"] == ["db"]
    # The control plane's own host still runs catalog scripts; it is not in the fleet list.
    with fleet.client() as client:
        names = [h["name"] for h in client.get("/api/v1/hosts").json()["items"]]
    assert "control-plane" not in names


def test_a_captured_hello_replayed_is_refused_and_the_agent_stays(fleet: Fleet) -> None:
    """A logging TCP proxy sits between a real enrolled agent and the control plane; a rogue
    replays the captured hello, byte for byte on a fresh connection and through the
    project's own stubs: both refused and counted, and the real agent keeps its stream (a
    task with a secret reaches it, not the rogue)."""
    name = "atk-tapped-1"
    tap = WireTap(("127.0.0.1", fleet.grpc_port)).start()
    try:
        fleet.start_agent(
            name,
            "web",
            server=tap.address,
            extra_args=("--enroll", _token(fleet, "web"), "--api-url", fleet.url),
        )
        fleet.wait_online(name)
        connected_at = (fleet.host(name) or {})["connected_at"]
        wait_for(lambda: bool(tap.captured() and grpc_messages(tap.captured()[0])), 10, "hello")
        captured = tap.captured()[0]
        first = grpc_messages(captured)[0]
        hello = pb.CommandMessage.FromString(first.body)
        assert hello.WhichOneof("message") == "hello" and hello.hello.hostname == name
        assert hello.hello.challenge and hello.hello.signature

        before = _refused(fleet, "replay")
        # 1. The raw bytes, as they went over the wire, on a new connection.
        replay_raw(("127.0.0.1", fleet.grpc_port), captured[: first.end], listen_for=2.0)
        wait_for(lambda: _refused(fleet, "replay") >= before + 1, 10, "the raw replay refused")
        # 2. The captured hello through the project's stubs, on a fresh stream.
        assert _stub_replay(fleet.grpc, hello) == grpc.StatusCode.PERMISSION_DENIED
        assert _refused(fleet, "replay") >= before + 2

        # The real agent was not displaced: same connection, and it runs what is sent to it.
        host = fleet.host(name)
        assert host is not None and host["status"] == "online"
        assert host["connected_at"] == connected_at
        with fleet.client() as client:
            created = client.post(
                "/api/v1/tasks",
                json={
                    "command": '[ "$TOKEN" = hush-1 ] && echo real',
                    "targets": {"hosts": [name]},
                    "secret_env": {"TOKEN": "hush-1"},
                },
            )
        assert created.status_code == 201, created.text
        task = fleet.wait_task_done(created.json()["id"])
        assert task["status"] == "succeeded"
        assert fleet.runs(task["id"])[name]["stdout"] == "real\n"
        assert len(tap.captured()) == 1  # the agent never had to reconnect
    finally:
        if name in fleet.agents:
            fleet.stop_agent(name)
        tap.stop()


def _stub_replay(address: str, hello: pb.CommandMessage) -> grpc.StatusCode | None:
    """Open a stream with the stubs, ignore its challenge, send ``hello``: how it ended."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CommandServiceStub(channel)
        call = stub.ConnectForCommands(iter([hello]), timeout=10)
        try:
            for message in call:
                if message.HasField("welcome"):
                    return None  # accepted: the attack worked
        except grpc.RpcError as e:
            challenge = dict(call.initial_metadata() or ()).get(CHALLENGE_KEY)
            assert challenge and challenge != hello.hello.challenge
            return e.code()  # type: ignore[no-any-return]
    return None
