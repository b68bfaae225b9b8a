"""Agent enrollment and message authentication: one-time tokens limited to groups, the
enrolled key checked on every heartbeat and result over RabbitMQ (forged, tampered, replayed,
impersonating and revoked messages refused and counted)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from opsplane.domain.paging import PageRequest
from opsplane.domain.states import TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.security.signing import load_or_create_private_key, public_key_text, sign
from opsplane.transport.amqp.link import AmqpLink
from opsplane.transport.base import AgentHello
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.convert import CHALLENGE_KEY, hello_claims, signed_fields
from opsplane.transport.grpc.server import GrpcLink
from tests.e2e.fleet import free_port
from tests.integration.seed_agent import AMQP_URL, SeedAgent, purge_shared_queues


def _public(key: Ed25519PrivateKey) -> str:
    return public_key_text(key.public_key())


@pytest.fixture
async def engine(tmp_path: Path, database_url: str) -> AsyncIterator[Engine]:
    the_engine = make_engine(load_settings(data_dir=tmp_path, database_url=database_url), [])
    await the_engine.start()
    try:
        yield the_engine
    finally:
        await the_engine.stop()


async def test_a_token_enrolls_one_agent_once_for_its_groups(engine: Engine) -> None:
    created = await engine.agents.create_token(["web"], created_by="admin")
    key = Ed25519PrivateKey.generate()
    agent = await engine.agents.enroll(created.secret, "web-1", _public(key))
    assert agent.groups == ["web"]
    with pytest.raises(Unauthenticated, match="unknown, spent or expired"):
        await engine.agents.enroll(created.secret, "web-9", _public(Ed25519PrivateKey.generate()))
    registry = engine.agents
    assert registry.refusal("web-1", _public(key), ["web"]) is None
    assert "not enrolled for: db" in (registry.refusal("web-1", _public(key), ["web", "db"]) or "")
    other = _public(Ed25519PrivateKey.generate())
    assert "other than the one it enrolled with" in (registry.refusal("web-1", other, []) or "")
    # A fresh registry reads the same from the database (another instance, or a restart).
    await registry.load()
    assert registry.refusal("web-1", _public(key), ["web"]) is None


async def test_expired_wrong_and_reused_names_are_refused(engine: Engine) -> None:
    key = _public(Ed25519PrivateKey.generate())
    expired = await engine.agents.create_token(
        [], created_by="admin", lifetime=timedelta(milliseconds=1)
    )
    await asyncio.sleep(0.01)
    with pytest.raises(Unauthenticated):
        await engine.agents.enroll(expired.secret, "db-1", key)
    with pytest.raises(Unauthenticated):
        await engine.agents.enroll("enr_not-a-token", "db-1", key)
    with pytest.raises(InvalidInput, match="public_key"):
        token = await engine.agents.create_token([], created_by="admin")
        await engine.agents.enroll(token.secret, "db-1", "not a key")
    first = await engine.agents.create_token([], created_by="admin")
    await engine.agents.enroll(first.secret, "db-1", key)
    second = await engine.agents.create_token([], created_by="admin")
    with pytest.raises(Conflict, match="already enrolled"):
        await engine.agents.enroll(second.secret, "db-1", key)
    await engine.revoke_agent("db-1", revoked_by="admin")
    assert engine.agents.refusal("db-1", key, []) == "agent db-1 was revoked"
    # Revoked, it may enroll again with a new token (a rebuilt server, a new key).
    new_key = _public(Ed25519PrivateKey.generate())
    await engine.agents.enroll(second.secret, "db-1", new_key)
    assert engine.agents.refusal("db-1", new_key, []) is None


async def test_a_token_takes_only_a_free_name_or_the_one_it_was_issued_for(
    engine: Engine,
) -> None:
    """Issue 14 §1: enrollment cannot take over a host of the inventory."""
    key = _public(Ed25519PrivateKey.generate())
    await engine.hosts.host_connected(AgentHello(hostname="control-plane", link="local"))
    await engine.hosts.host_connected(AgentHello(hostname="agent-1", link="grpc", groups=("a",)))
    # (An SSH host, as the store holds it; the SSH link's inventory does not matter here.)
    await engine.hosts.host_connected(AgentHello(hostname="ssh-1", link="ssh", groups=("db",)))
    token = await engine.agents.create_token(["web"], created_by="admin")
    for name, error, text in (
        ("control-plane", Conflict, "control plane's own host"),
        ("ssh-1", Conflict, "an ssh host"),
        ("agent-1", Conflict, "--name agent-1"),
    ):
        with pytest.raises(error, match=text):
            await engine.agents.enroll(token.secret, name, key)
    # None of that spent the token.
    assert (await engine.agents.enroll(token.secret, "web-1", key)).groups == ["web"]

    bound = await engine.agents.create_token(["a"], created_by="admin", name="agent-1")
    assert bound.token.name == "agent-1"
    with pytest.raises(Forbidden, match="issued for 'agent-1'"):
        await engine.agents.enroll(bound.secret, "web-2", key)
    await engine.agents.enroll(bound.secret, "agent-1", key)
    for name in ("control-plane", "ssh-1"):
        with pytest.raises(Conflict, match="no agent may enroll"):
            await engine.agents.create_token([], created_by="admin", name=name)


async def test_a_hello_never_moves_another_links_host(engine: Engine) -> None:
    """Issue 14 §1: a hello cannot make an SSH host, the control plane's host, or (unless it
    proves that name's enrolled key) another agent link's host its own."""
    key = _public(Ed25519PrivateKey.generate())
    await engine.hosts.host_connected(AgentHello(hostname="control-plane", link="local"))
    await engine.hosts.host_connected(AgentHello(hostname="ssh-1", link="ssh", groups=("db",)))
    await engine.hosts.host_connected(AgentHello(hostname="moved-1", link="grpc"))
    await engine.hosts.host_connected(AgentHello(hostname="other-1", link="grpc"))
    for name in ("control-plane", "ssh-1", "other-1"):
        with pytest.raises(Conflict, match="cannot take it over"):
            await engine.host_connected(AgentHello(hostname=name, link="amqp", public_key=key))
    assert (await engine.hosts.get_host("ssh-1")).link == "ssh"
    assert (await engine.hosts.get_host("ssh-1")).groups == ["db"]
    assert engine.agents.refusal("control-plane", key, []) is not None
    # The enrolled agent of a name, proving its key, may move to another agent link.
    token = await engine.agents.create_token([], created_by="admin", name="moved-1")
    await engine.agents.enroll(token.secret, "moved-1", key)
    await engine.host_connected(AgentHello(hostname="moved-1", link="amqp", public_key=key))
    assert (await engine.hosts.get_host("moved-1")).link == "amqp"
    # The control plane's own link always has its host back.
    await engine.hosts.host_connected(AgentHello(hostname="control-plane", link="local"))


async def test_enrollment_is_required_unless_turned_off(tmp_path: Path) -> None:
    for required in (True, False):
        settings = load_settings(data_dir=tmp_path / str(required), require_enrollment=required)
        the_engine = make_engine(settings, [])
        await the_engine.start()
        try:
            refusal = the_engine.agents.refusal("stranger", "", [])
            assert (refusal is not None and "--enroll" in refusal) is required
        finally:
            await the_engine.stop()
    assert load_settings(data_dir=tmp_path).require_enrollment  # the default


# Over RabbitMQ ---------------------------------------------------------------------------


@pytest.fixture
async def amqp_engine(tmp_path: Path) -> AsyncIterator[Engine]:
    await purge_shared_queues()
    settings = load_settings(data_dir=tmp_path, heartbeat_interval=1.0)
    key, _ = load_or_create_private_key(settings.signing_key_path)
    link = AmqpLink(AMQP_URL, signing_key=key, heartbeat_interval=1.0, offline_after_missed=3)
    the_engine = make_engine(settings, [link])
    await the_engine.start()
    try:
        yield the_engine
    finally:
        await the_engine.stop()


async def _publish(exchange: str, routing_key: str, body: dict[str, object]) -> None:
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        target = await channel.declare_exchange(exchange, "topic", durable=True)
        await target.publish(aio_pika.Message(json.dumps(body).encode()), routing_key=routing_key)


async def _until(probe: Callable[[], Awaitable[bool]], limit: float = 10) -> None:
    async with asyncio.timeout(limit):
        while True:
            if await probe():
                return
            await asyncio.sleep(0.05)


async def _eventually_refused(engine: Engine, reason: str, count: int = 1) -> None:
    async def refused() -> bool:
        return engine.refused[("amqp", reason)] >= count

    await _until(refused)


@pytest.mark.service("rabbitmq")
async def test_signed_messages_of_enrolled_agents_pass_and_forgeries_are_refused(
    amqp_engine: Engine,
) -> None:
    engine = amqp_engine
    suffix = uuid.uuid4().hex[:8]
    web, db = f"web-1-{suffix}", f"db-1-{suffix}"
    web_key, db_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    for name, key, group in ((web, web_key, "web"), (db, db_key, "db")):
        token = await engine.agents.create_token([f"{group}-{suffix}"], created_by="admin")
        await engine.agents.enroll(token.secret, name, _public(key))
    agent = SeedAgent(web, groups=(f"web-{suffix}",), key=web_key)
    await agent.start()
    try:
        await agent.heartbeat()

        async def online() -> bool:
            hosts = (await engine.hosts.list_hosts(PageRequest(100), status="online")).items
            return any(host.name == web for host in hosts)

        await _until(online)
        # A signed result of the enrolled agent is accepted.
        task = await engine.tasks.create_task(
            TaskRequest(command="echo signed", targets=Targets(hosts=(web,)), timeout=30)
        )
        async with asyncio.timeout(15):
            assert (await engine.wait_task(task.id)).status == TaskStatus.SUCCEEDED

        now = int(time.time())
        beat = {"hostname": web, "status": "online", "timestamp": now, "cpu_usage": 99.0,
                "memory_usage": 1.0, "groups": [f"web-{suffix}"]}  # fmt: skip
        # Agent db-1 speaking for host web-1: signed, but with the wrong host's key.
        await _publish(
            "sys_monitor_exchange", "heartbeat", {**beat, "signature": sign(db_key, beat)}
        )
        await _eventually_refused(engine, "bad_signature", 1)
        # Tampered after signing.
        signed = {**beat, "signature": sign(web_key, beat)}
        await _publish("sys_monitor_exchange", "heartbeat", {**signed, "cpu_usage": 1.0})
        await _eventually_refused(engine, "bad_signature", 2)
        # Unsigned.
        await _publish("sys_monitor_exchange", "heartbeat", {**beat, "signature": ""})
        await _eventually_refused(engine, "bad_signature", 3)
        # A genuine heartbeat replayed ten minutes later.
        old = {**beat, "timestamp": now - 600}
        await _publish(
            "sys_monitor_exchange", "heartbeat", {**old, "signature": sign(web_key, old)}
        )
        await _eventually_refused(engine, "stale", 1)
        # Claiming a group the token did not allow.
        greedy = {**beat, "groups": [f"web-{suffix}", f"db-{suffix}"],
                  "public_key": _public(web_key)}  # fmt: skip
        await _publish(
            "sys_monitor_exchange", "heartbeat", {**greedy, "signature": sign(web_key, greedy)}
        )
        await _eventually_refused(engine, "refused_agent", 1)
        # A forged result for a run of web-1, signed by db-1.
        forged = {"task_id": task.id, "exit_code": 0, "stdout": "pwned", "stderr": "",
                  "timestamp": now}  # fmt: skip
        await _publish(
            "sys_result_exchange",
            f"result.node.{web}",
            {**forged, "signature": sign(db_key, forged)},
        )
        await _eventually_refused(engine, "bad_signature", 4)
        host = await engine.hosts.get_host(web)
        assert host.cpu_usage != 99.0 and host.groups == [f"web-{suffix}"]
        (run,) = await engine.tasks.list_runs(task.id)
        assert run.stdout == "signed\n"

        # Revoked: even its own signed heartbeat is refused.
        await engine.revoke_agent(web, revoked_by="admin")
        await agent.heartbeat()
        await _eventually_refused(engine, "revoked", 1)
    finally:
        await agent.stop()


@pytest.mark.service("rabbitmq")
async def test_a_rabbitmq_hello_never_takes_over_an_ssh_host(tmp_path: Path) -> None:
    """Issue 14 §1 on RabbitMQ: with enrollment not required, a heartbeat naming an SSH host
    is refused (refused_agent), and the host keeps its link and groups."""
    await purge_shared_queues()
    settings = load_settings(data_dir=tmp_path, heartbeat_interval=1.0, require_enrollment=False)
    key, _ = load_or_create_private_key(settings.signing_key_path)
    link = AmqpLink(AMQP_URL, signing_key=key, heartbeat_interval=1.0, offline_after_missed=3)
    engine = make_engine(settings, [link])
    await engine.start()
    try:
        name = f"ssh-{uuid.uuid4().hex[:8]}"
        await engine.hosts.host_connected(AgentHello(hostname=name, link="ssh", groups=("db",)))
        beat = {"hostname": name, "status": "online", "timestamp": time.time(), "hello": True,
                "cpu_usage": 1.0, "memory_usage": 1.0, "groups": ["web"]}  # fmt: skip
        await _publish("sys_monitor_exchange", "heartbeat", beat)
        await _eventually_refused(engine, "refused_agent", 1)
        host = await engine.hosts.get_host(name)
        assert (host.link, host.groups) == ("ssh", ["db"])
    finally:
        await engine.stop()


# Over gRPC --------------------------------------------------------------------------------


def _hello(
    name: str, key: Ed25519PrivateKey, groups: list[str], challenge: str = "", **fields: object
) -> pb.Hello:
    hello = pb.Hello(
        hostname=name,
        groups=groups,
        public_key=_public(key),
        timestamp=time.time(),
        challenge=challenge,
        **fields,
    )
    hello.signature = sign(key, hello_claims(hello))
    return hello


HelloFor = Callable[[str], pb.Hello]


async def _say_hello(address: str, hello_for: HelloFor) -> tuple[grpc.aio.Channel, Any, Any]:
    """Open a stream, answer its challenge with ``hello_for(challenge)``: the channel, the call
    and the first answer (or the status code the call ended with)."""
    channel = grpc.aio.insecure_channel(address)
    call = pb_grpc.CommandServiceStub(channel).ConnectForCommands()
    challenge = (await call.initial_metadata()).get(CHALLENGE_KEY)
    assert isinstance(challenge, str) and len(challenge) >= 16
    await call.write(pb.CommandMessage(hello=hello_for(challenge)))
    try:
        return channel, call, await call.read()
    except grpc.aio.AioRpcError as e:
        return channel, call, e.code()


async def test_grpc_hellos_and_reports_must_be_signed_by_the_enrolled_key(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    link = GrpcLink(address, heartbeat_interval=1.0)
    engine = make_engine(load_settings(data_dir=tmp_path, heartbeat_interval=1.0), [link])
    await engine.start()
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    token = await engine.agents.create_token(["web"], created_by="admin")
    await engine.agents.enroll(token.secret, "g-1", _public(key))
    try:
        # Refused hellos: another key under the enrolled name; a signature by another key;
        # groups the token did not allow; an old one; one answering another challenge.
        refused: list[tuple[HelloFor, str]] = [
            (lambda c: _hello("g-1", other, ["web"], c), "refused_agent"),
            (lambda c: pb.Hello(**{**_fields(_hello("g-1", key, ["web"], c)),
                                   "signature": sign(other, {})}), "bad_signature"),
            (lambda c: _hello("g-1", key, ["web", "db"], c), "refused_agent"),
            (lambda c: _replayed(_hello("g-1", key, ["web"], c), key), "stale"),
            (lambda c: _hello("g-1", key, ["web"], "an-earlier-challenge"), "replay"),
            (lambda c: _hello("g-1", key, ["web"]), "replay"),
        ]  # fmt: skip
        for hello_for, reason in refused:
            before = engine.refused[("grpc", reason)]
            channel, _call, answer = await _say_hello(address, hello_for)
            assert answer == grpc.StatusCode.PERMISSION_DENIED
            assert engine.refused[("grpc", reason)] == before + 1
            await channel.close()

        channel, call, welcome = await _say_hello(address, lambda c: _hello("g-1", key, ["web"], c))
        assert welcome.HasField("welcome")
        # A result must be signed by the hello's key; a heartbeat is taken as the stream's,
        # whose hello proved the key (docs/scale.md, "Heartbeats and liveness").
        forged = pb.CommandResult(run_id=str(uuid.uuid4()), status="succeeded", exit_code=0)
        forged.signature = sign(other, signed_fields(forged))
        genuine = pb.Heartbeat(hostname="g-1", timestamp=time.time(), cpu_usage=42.0)
        genuine.signature = sign(key, signed_fields(genuine))
        await call.write(pb.CommandMessage(command_result=forged))
        await call.write(pb.CommandMessage(heartbeat=genuine))

        async def beat_recorded() -> bool:
            # The welcome does not wait for the host's row: it follows in a batch.
            try:
                return (await engine.hosts.get_host("g-1")).cpu_usage == 42.0
            except NotFound:
                return False

        await _until(beat_recorded)
        assert engine.refused[("grpc", "bad_signature")] == 2
        await channel.close()
    finally:
        await engine.stop()


def _fields(hello: pb.Hello) -> dict[str, object]:
    return {
        "hostname": hello.hostname, "groups": list(hello.groups),
        "public_key": hello.public_key, "timestamp": hello.timestamp,
        "challenge": hello.challenge,
    }  # fmt: skip


def _replayed(hello: pb.Hello, key: Ed25519PrivateKey) -> pb.Hello:
    """A genuine hello, as an eavesdropper would replay it ten minutes later."""
    hello.timestamp -= 600
    hello.signature = sign(key, hello_claims(hello))
    return hello
