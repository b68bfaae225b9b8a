"""The real agent on the RabbitMQ link (DESIGN §3.2, §3.3; docs/amqp.md) against a real broker.

The "control plane" here is plain aio-pika in the test. It binds its own exclusive,
server-named queues to the result and monitor exchanges (never the shared durable
``cmd.result`` / ``monitor.heartbeat``), and every agent has a random name and groups, so
runs in parallel, leftovers, or a control plane running on the same broker do not collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import aio_pika
import psutil
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import PublishError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.agent import Agent, AgentConfig, Spool
from opsplane.agent.amqp_link import AmqpLink, _Session
from opsplane.agent.config import mask_url
from opsplane.domain.errors import ConfigError
from opsplane.domain.ids import run_id_for
from opsplane.security.signing import load_public_key, public_key_text, sign, verify
from opsplane.transport.amqp import messages
from opsplane.transport.base import CommandEnvelope
from opsplane.transport.grpc import opsplane_pb2 as pb

pytestmark = pytest.mark.service("rabbitmq")

BROKER = ("127.0.0.1", 5672)
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
WAIT = 8.0

RESULT_FIELDS = {
    "type", "task_id", "run_id", "attempt", "hostname", "status", "exit_code", "stdout",
    "stderr", "truncated", "error", "started_at", "finished_at", "duration_ms", "timestamp",
    "signature",
}  # fmt: skip
STARTED_FIELDS = {
    "type", "task_id", "run_id", "attempt", "hostname", "started_at", "pid", "timestamp",
    "signature",
}  # fmt: skip
OUTPUT_FIELDS = {
    "type", "task_id", "run_id", "hostname", "stream", "seq", "data", "timestamp", "signature",
}  # fmt: skip


def new_run_id() -> str:
    return str(uuid.uuid4())


def suffix() -> str:
    return uuid.uuid4().hex[:10]


async def wait_until(condition: Callable[[], bool], within: float = WAIT) -> None:
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


class ControlPlane:
    """Signs and publishes commands; collects what one agent publishes."""

    def __init__(self, host: str, key: Ed25519PrivateKey | None = None) -> None:
        self.host = host
        self.key = key or Ed25519PrivateKey.generate()
        self.public_key = public_key_text(self.key.public_key())
        self.results: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self._channel: AbstractChannel | None = None

    async def start(self, connection: aio_pika.abc.AbstractConnection) -> None:
        channel = await connection.channel()
        self._channel = channel
        exchanges = {
            name: await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
            for name in ("sys_cmd_exchange", "sys_result_exchange", "sys_monitor_exchange")
        }
        self._commands = exchanges["sys_cmd_exchange"]
        for exchange, key, into in (
            ("sys_result_exchange", f"result.node.{self.host}", self.results),
            ("sys_monitor_exchange", "heartbeat", self.heartbeats),
        ):
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await queue.bind(exchanges[exchange], key)
            await queue.consume(self._collector(into), no_ack=True)

    def _collector(self, into: list[dict[str, Any]]) -> Callable[[AbstractIncomingMessage], Any]:
        async def collect(message: AbstractIncomingMessage) -> None:
            body = json.loads(message.body)
            if body.get("hostname") == self.host:
                assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                assert message.content_type == "application/json"
                into.append(body)

        return collect

    async def publish(
        self,
        routing_key: str,
        body: dict[str, Any] | bytes,
        *,
        signer: Ed25519PrivateKey | None = None,
        signed: bool = True,
    ) -> None:
        if isinstance(body, dict):
            body = dict(body)
            if signed:
                body["sign"] = sign(signer or self.key, body)
            data = json.dumps(body, ensure_ascii=False).encode()
        else:
            data = body
        message = aio_pika.Message(
            data, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self._commands.publish(message, routing_key)

    def command(self, text: str, run_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """A command as the control plane signs it: for this host (with ``run_id``), else for
        ``all`` (a fan-out, without a run id) unless ``target`` says otherwise."""
        body: dict[str, Any] = {
            "target": self.host if run_id is not None else "all",
            "type": "command",
            "task_id": f"task-{suffix()}",
            "attempt": 1,
            "command": text,
            "timeout": 30,
            # Seed 002's user is the account to run as: empty, the agent's own.
            "user": "",
            "submitted_by": "admin",
            "env": {},
            "timestamp": time.time(),
            "deliver_by": 0,
        }
        if run_id is not None:
            body["run_id"] = run_id
        body.update(fields)
        return body

    def of(self, kind: str, run_id: str) -> list[dict[str, Any]]:
        return [m for m in self.results if m.get("type") == kind and m.get("run_id") == run_id]

    async def wait_for(self, kind: str, run_id: str, within: float = WAIT) -> dict[str, Any]:
        await wait_until(lambda: bool(self.of(kind, run_id)), within)
        return self.of(kind, run_id)[0]

    def hellos(self) -> list[dict[str, Any]]:
        return [h for h in self.heartbeats if h.get("hello") is True]

    async def wait_for_hello(self, count: int = 1) -> dict[str, Any]:
        await wait_until(lambda: len(self.hellos()) >= count)
        return self.hellos()[count - 1]


class Proxy:
    """A TCP relay to the broker that the test can cut (and refuse) at will: a broker outage
    for this agent only, without touching anybody else's connections."""

    def __init__(self) -> None:
        self.refusing = False
        self._transports: set[asyncio.WriteTransport] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*BROKER)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer.transport, up_writer.transport}
        self._transports |= pair

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._transports -= pair
            for transport in pair:
                transport.abort()

    def cut(self) -> None:
        self.refusing = True
        for transport in list(self._transports):
            transport.abort()

    def restore(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def make_config(tmp_path: Path, cp: ControlPlane, url: str = AMQP_URL, **extra: Any) -> AgentConfig:
    fields: dict[str, Any] = {
        "amqp_url": url,
        "control_plane_key": cp.public_key,
        "name": cp.host,
        "groups": (f"web-{cp.host}", f"eu-{cp.host}"),
        "labels": {"env": "test", "name": cp.host},
        "state_dir": tmp_path / "state",
        "heartbeat_interval": 1.0,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.3,
        "kill_grace": 1.0,
    }
    fields.update(extra)
    return AgentConfig(**fields)


@contextlib.asynccontextmanager
async def control_plane() -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(f"amqp-test-{suffix()}")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        await cp.start(connection)
        yield cp
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def running(config: AgentConfig) -> AsyncIterator[Agent]:
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.request_stop()
        async with asyncio.timeout(15):
            await task


def signed_by(message: dict[str, Any], public_key: str) -> bool:
    return verify(load_public_key(public_key), message, "signature")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_hello_and_heartbeats_are_signed_by_the_agent(tmp_path: Path) -> None:
    async with control_plane() as cp, running(make_config(tmp_path, cp)) as agent:
        hello = await cp.wait_for_hello()
        assert hello["hostname"] == cp.host and hello["status"] == "online"
        assert hello["groups"] == [f"web-{cp.host}", f"eu-{cp.host}"]
        assert hello["labels"] == {"env": "test", "name": cp.host}
        assert hello["public_key"] == agent.public_key
        assert agent.public_key == (tmp_path / "state" / "agent.pub").read_text().strip()
        assert hello["running_run_ids"] == hello["finished_run_ids"] == []
        assert hello["abandoned_run_ids"] == []
        assert hello["version"] and hello["os"]
        assert abs(hello["timestamp"] - time.time()) < 30
        assert signed_by(hello, agent.public_key)
        # Connected once the broker confirmed the hello, which may be just after it arrived.
        await wait_until(lambda: agent.connected)

        # Then plain heartbeats, every heartbeat_interval.
        await wait_until(lambda: len(cp.heartbeats) >= 2)
        beat = next(h for h in cp.heartbeats if "hello" not in h)
        assert {"hostname", "status", "timestamp", "cpu_usage", "memory_usage", "signature"} <= (
            beat.keys()
        )
        assert {"groups", "labels", "load", "disk_usage", "version", "os", "public_key"} <= (
            beat.keys()
        )
        assert 0 <= beat["memory_usage"] <= 100 and 0 <= beat["disk_usage"] <= 100
        assert signed_by(beat, agent.public_key)
        # A tampered heartbeat would not pass.
        assert not signed_by({**beat, "cpu_usage": 99.0}, agent.public_key)


async def test_unicast_group_and_broadcast_each_run_once(tmp_path: Path) -> None:
    async with control_plane() as cp, running(make_config(tmp_path, cp)) as agent:
        await cp.wait_for_hello()
        unicast = new_run_id()
        await cp.publish(
            f"cmd.node.{cp.host}", cp.command("echo hi 你好; echo err >&2; exit 3", unicast)
        )
        # Fan-outs name no run: the agent derives its own from task id, its name and attempt.
        group_command = cp.command("echo group", target=f"group:web-{cp.host}")
        await cp.publish(f"cmd.group.web-{cp.host}", group_command)
        group = run_id_for(group_command["task_id"], cp.host, 1)
        broadcast_command = cp.command("echo all", attempt=2)
        await cp.publish("cmd.all", broadcast_command)
        broadcast = run_id_for(broadcast_command["task_id"], cp.host, 2)
        # The same broadcast again (a redelivery): the derived id is the replay guard.
        await cp.publish("cmd.all", broadcast_command)

        result = await cp.wait_for("result", unicast)
        assert set(result) == RESULT_FIELDS
        assert (result["status"], result["exit_code"]) == ("failed", 3)
        assert (result["stdout"], result["stderr"]) == ("hi 你好\n", "err\n")
        assert (result["hostname"], result["attempt"], result["run_id"]) == (cp.host, 1, unicast)
        assert result["started_at"] <= result["finished_at"] and result["duration_ms"] >= 0
        assert result["truncated"] is False and result["error"] == "exit code 3"
        assert signed_by(result, agent.public_key)

        started = await cp.wait_for("started", unicast)
        assert set(started) == STARTED_FIELDS
        assert started["pid"] > 0 and started["task_id"] == result["task_id"]
        assert started["attempt"] == 1
        assert signed_by(started, agent.public_key)

        chunks = cp.of("output", unicast)
        assert chunks and all(set(c) == OUTPUT_FIELDS for c in chunks)
        assert all(signed_by(c, agent.public_key) for c in chunks)
        assert "".join(c["data"] for c in chunks if c["stream"] == "stdout") == "hi 你好\n"
        assert "".join(c["data"] for c in chunks if c["stream"] == "stderr") == "err\n"
        assert sorted(c["seq"] for c in chunks) == list(range(1, len(chunks) + 1))

        for run_id, text in ((group, "group\n"), (broadcast, "all\n")):
            result = await cp.wait_for("result", run_id)
            assert (result["status"], result["exit_code"], result["stdout"]) == (
                "succeeded",
                0,
                text,
            )

        # The broker confirmed every result: nothing is left to re-send.
        state = Spool(tmp_path / "state")
        await wait_until(lambda: state.pending_results() == [])
        await asyncio.sleep(0.3)
        for run_id in (unicast, group, broadcast):
            assert len(cp.of("result", run_id)) == len(cp.of("started", run_id)) == 1
        await wait_until(lambda: agent.refusals["replay"] == 1)


async def test_bad_commands_are_refused_counted_and_never_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="opsplane.agent")
    async with control_plane() as cp, running(make_config(tmp_path, cp)) as agent:
        await cp.wait_for_hello()
        node = f"cmd.node.{cp.host}"
        markers = {name: tmp_path / name for name in ("unsigned", "forged", "stale", "type")}
        runs = {name: new_run_id() for name in markers}
        secret = f"secret-{suffix()}"

        await cp.publish(
            node,
            cp.command(f"touch {markers['unsigned']} # {secret}", runs["unsigned"]),
            signed=False,
        )
        await cp.publish(
            node,
            cp.command(f"touch {markers['forged']} # {secret}", runs["forged"]),
            signer=Ed25519PrivateKey.generate(),
        )
        await cp.publish(
            node,
            cp.command(
                f"touch {markers['stale']} # {secret}",
                runs["stale"],
                timestamp=time.time() - 3600,
            ),
        )
        await cp.publish(node, cp.command(f"touch {markers['type']}", runs["type"], type="reboot"))
        await cp.publish(node, b"{not json")

        # A good command, then the very same message again: a replay.
        once = tmp_path / "once"
        replayed = cp.command(f"echo once >> {once}", new_run_id())
        await cp.publish(node, replayed)
        await cp.wait_for("result", replayed["run_id"])
        await cp.publish(node, replayed)
        # Commands are handled in order: once this one is done, so are all the above.
        sentinel = new_run_id()
        await cp.publish(node, cp.command("true", sentinel))
        await cp.wait_for("result", sentinel)

        await asyncio.sleep(0.3)
        assert not any(path.exists() for path in markers.values())
        assert once.read_text() == "once\n"
        assert len(cp.of("result", replayed["run_id"])) == 1
        refused = set(runs.values())
        assert not any(m.get("run_id") in refused for m in cp.results)

        refusals = agent.refusals
        # Other tests on this broker may broadcast commands signed by their own keys, so
        # bad_signature (and in theory others) can only be bounded from below.
        for reason in ("unsigned", "bad_signature", "stale", "replay"):
            assert refusals[reason] >= 1, refusals
        assert refusals["malformed"] >= 2  # the unknown type and the non-JSON body
        assert set(refusals) == {
            "unsigned", "bad_signature", "stale", "replay", "malformed", "wrong_target"
        }  # fmt: skip

        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        for reason, name in (("unsigned", "unsigned"), ("bad_signature", "forged")):
            assert any(f"({reason})" in w and runs[name] in w for w in warnings), warnings
        assert any("(stale)" in w and "3600s old" in w for w in warnings)
        assert any("(replay)" in w and replayed["run_id"] in w for w in warnings)
        # The text of a refused command is not logged above DEBUG.
        assert not any(secret in r.getMessage() for r in caplog.records if r.levelno > 10)


async def test_a_command_signed_for_another_host_is_refused_in_this_hosts_queue(
    tmp_path: Path,
) -> None:
    """Issue 14 §2: a command the control plane signed for host A (its own body builder and
    key), read off the wire and published straight into host B's queue, is refused by B and
    counted; so is a group command republished to a host outside that group. B still runs
    what is addressed to it."""
    async with control_plane() as cp, running(make_config(tmp_path, cp)) as agent:
        await cp.wait_for_hello()
        node = f"cmd.node.{cp.host}"
        marker = tmp_path / "taken-over"
        envelope = CommandEnvelope(
            task_id=f"task-{suffix()}", run_id=new_run_id(), attempt=1,
            command=f"touch {marker}", timeout=30, submitted_by="admin",
        )  # fmt: skip
        for_a = messages.command_body(envelope, time.time(), target=f"a-{cp.host}")
        await cp.publish(node, for_a)
        # A fan-out for a group this host is not in.
        for_db = messages.command_body(
            replace(envelope, run_id=""), time.time(), target=f"group:db-{cp.host}", fanout=True
        )
        await cp.publish(node, for_db)
        own = new_run_id()
        await cp.publish(node, cp.command("true", own))
        await cp.wait_for("result", own)
        await wait_until(lambda: agent.refusals["wrong_target"] == 2)
        assert not marker.exists()
        assert [m["run_id"] for m in cp.results if m.get("type") == "result"] == [own]


async def test_cancel_stops_a_running_command(tmp_path: Path) -> None:
    async with control_plane() as cp, running(make_config(tmp_path, cp)):
        await cp.wait_for_hello()
        run_id = new_run_id()
        body = cp.command("sleep 30", run_id)
        await cp.publish(f"cmd.node.{cp.host}", body)
        started = await cp.wait_for("started", run_id)
        cancel = {
            "type": "cancel",
            "target": cp.host,
            "task_id": body["task_id"],
            "run_id": run_id,
            "reason": "operator",
            "timestamp": time.time(),
        }
        await cp.publish(f"cmd.node.{cp.host}", cancel)

        result = await cp.wait_for("result", run_id)
        assert result["status"] == "canceled" and result["exit_code"] is None
        assert result["duration_ms"] < 10_000
        assert not alive(started["pid"])


async def test_a_result_finished_during_an_outage_is_delivered_once_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="opsplane.agent")
    proxy = Proxy()
    await proxy.start()
    try:
        async with control_plane() as cp:
            url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
            async with running(make_config(tmp_path, cp, url)) as agent:
                await cp.wait_for_hello()
                run_id = new_run_id()
                ran = tmp_path / "ran"
                await cp.publish(
                    f"cmd.node.{cp.host}",
                    cp.command(f"echo x >> {ran}; sleep 1; echo kept", run_id),
                )
                await cp.wait_for("started", run_id)

                # The broker is gone for this agent while the command finishes.
                proxy.cut()
                await wait_until(lambda: not agent.connected)
                state = Spool(tmp_path / "state")
                await wait_until(lambda: [r["run_id"] for r in state.pending_results()] == [run_id])
                assert cp.of("result", run_id) == []
                await wait_until(lambda: "cannot reach" in caplog.text)

                proxy.restore()
                hello = await cp.wait_for_hello(2)
                assert run_id in hello["finished_run_ids"]
                result = await cp.wait_for("result", run_id)
                assert (result["status"], result["stdout"]) == ("succeeded", "kept\n")
                await wait_until(lambda: state.pending_results() == [])

                # Still listed as finished for a while: the confirm is the broker's, and the
                # control plane may not have consumed the result yet.
                assert run_id in agent.hello().finished_run_ids
                await asyncio.sleep(0.5)
                assert len(cp.of("result", run_id)) == 1
                assert len(cp.of("started", run_id)) == 1
                assert ran.read_text() == "x\n"  # not run again

                # And the new queue works.
                after = new_run_id()
                await cp.publish(f"cmd.node.{cp.host}", cp.command("echo after", after))
                assert (await cp.wait_for("result", after))["stdout"] == "after\n"
    finally:
        await proxy.close()

    # One WARNING line per failed attempt, without a traceback, without the password.
    failures = [r for r in caplog.records if "reconnecting in" in r.getMessage()]
    assert failures and all(r.exc_info is None for r in failures)
    assert all(r.levelno == logging.WARNING for r in failures)
    assert "guest:guest" not in caplog.text and "guest:******" in caplog.text


@pytest.mark.service("rabbitmqctl")
async def test_reconnects_after_the_broker_closes_the_connection(tmp_path: Path) -> None:
    rabbitmqctl = shutil.which("rabbitmqctl")
    assert rabbitmqctl is not None
    async with control_plane() as cp, running(make_config(tmp_path, cp)) as agent:
        await cp.wait_for_hello()
        done = new_run_id()
        await cp.publish(f"cmd.node.{cp.host}", cp.command("echo before", done))
        await cp.wait_for("result", done)

        # Close exactly this agent's connection, by its name, from the broker's side.
        listing = await _run(rabbitmqctl, "list_connections", "-q", "--no-table-headers",
                             "pid", "client_properties")  # fmt: skip
        assert listing is not None, "rabbitmqctl list_connections failed"
        pids = [
            line.split("\t", 1)[0]
            for line in listing.splitlines()
            if f'"opsplane-agent {cp.host}"' in line
        ]
        assert len(pids) == 1, listing
        assert await _run(rabbitmqctl, "close_connection", pids[0], "test") is not None

        hello = await cp.wait_for_hello(2)
        # Acknowledged by the broker's confirm moments ago: still reported as finished.
        assert done in hello["finished_run_ids"]
        await wait_until(lambda: agent.connected)
        after = new_run_id()
        await cp.publish(f"cmd.node.{cp.host}", cp.command("echo after", after))
        assert (await cp.wait_for("result", after))["stdout"] == "after\n"
        assert len(cp.of("result", done)) == 1


async def _run(*argv: str) -> str | None:
    """Run a command line, bounded; its stdout, or None when it failed."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(15):
            out, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return None
    return out.decode() if process.returncode == 0 else None


async def test_an_abandoned_run_is_reported_in_the_hello(tmp_path: Path) -> None:
    async with control_plane() as cp:
        config = make_config(tmp_path, cp)
        # What a previous agent, killed mid-run, left: an accepted run without a result.
        run_id = new_run_id()
        Spool(config.state_dir).accept(run_id, "task-1", {})
        async with running(config):
            hello = await cp.wait_for_hello()
            assert hello["abandoned_run_ids"] == [run_id]
            assert run_id not in hello["finished_run_ids"]
            assert signed_by(hello, hello["public_key"])


def test_the_rabbitmq_link_needs_a_pinned_control_plane_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="control_plane_key"):
        AgentConfig(amqp_url=AMQP_URL, name="x", state_dir=tmp_path)
    with pytest.raises(ConfigError, match="Ed25519"):
        AgentConfig(amqp_url=AMQP_URL, control_plane_key="not-a-key", state_dir=tmp_path)
    key = public_key_text(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(ConfigError, match="plaintext"):
        AgentConfig(amqp_url="amqp://u:p@10.0.0.1/", control_plane_key=key, state_dir=tmp_path)
    with pytest.raises(ConfigError, match="amqp"):
        AgentConfig(amqp_url="http://127.0.0.1/", control_plane_key=key, state_dir=tmp_path)
    with pytest.raises(ConfigError, match="'#'"):
        AgentConfig(amqp_url=AMQP_URL, control_plane_key=key, groups=("a#",), state_dir=tmp_path)
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        AgentConfig(
            amqp_url=AMQP_URL, control_plane_key=key, heartbeat_interval=0, state_dir=tmp_path
        )
    # The key may be a file; the server setting is not used (nor checked) with amqp_url.
    key_file = tmp_path / "cp.pub"
    key_file.write_text(key + "\n")
    config = AgentConfig(
        amqp_url="amqps://u:p@10.0.0.1/", control_plane_key=str(key_file), server="10.0.0.2:1"
    )
    assert config.link == "amqp" and config.endpoint == "amqps://u:******@10.0.0.1/"
    assert mask_url("amqp://agent:s3cr%40t@mq:5672/vh") == "amqp://agent:******@mq:5672/vh"
    assert mask_url("amqp://mq/") == "amqp://mq/"


async def test_an_unroutable_result_stays_spooled_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # On this broker a control plane's cmd.result may well be bound to result.#, so "no
    # queue for results" is played by a fake exchange behind the real link.
    caplog.set_level(logging.WARNING, logger="opsplane.agent")
    run_id = new_run_id()
    result = pb.CommandMessage(
        command_result=pb.CommandResult(
            run_id=run_id, task_id="t-1", attempt=1, status="succeeded", exit_code=0
        )
    )

    class Exchange:
        name = "sys_result_exchange"

        def __init__(self) -> None:
            self.routable = False
            self.published: list[dict[str, Any]] = []

        async def publish(self, message: aio_pika.Message, routing_key: str, **kw: Any) -> None:
            if kw.get("mandatory") and not self.routable:
                raise PublishError.__new__(PublishError)  # what a basic.return raises
            self.published.append(json.loads(message.body))

    class Handler:
        def __init__(self) -> None:
            self.acks: list[str] = []
            self.resends = 0

        def hello(self) -> pb.Hello:
            return pb.Hello()

        async def on_connected(self) -> None:
            self.resends += 1
            await link.send(result)  # what the daemon does with each spooled result

        async def on_message(self, message: pb.CommandMessage) -> None:
            self.acks.append(message.ack.run_id)

        def already_seen(self, run_id: str) -> bool:
            return False

    cp = ControlPlane(f"amqp-test-{suffix()}")
    config = make_config(tmp_path, cp, heartbeat_interval=0.05)
    handler, exchange = Handler(), Exchange()
    link = AmqpLink(config, handler, signing_key=Ed25519PrivateKey.generate())
    fake: Any = exchange
    session = _Session(
        connection=cast(Any, None),
        channel=cast(Any, None),
        results=fake,
        monitor=fake,
        inbox=asyncio.Queue(),
    )
    link._session = session

    assert not await link.send(result)
    assert not await link.send(result)
    assert handler.acks == [] and session.resend_due
    unroutable = [r for r in caplog.records if "unroutable" in r.getMessage()]
    assert len(unroutable) == 1  # once per connection, not once per retry

    exchange.routable = True
    beats = asyncio.create_task(link._heartbeats(session))
    try:
        await wait_until(lambda: handler.acks == [run_id])
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
    assert handler.resends == 1 and not session.resend_due
    [sent] = [m for m in exchange.published if m.get("type") == "result"]
    assert sent["run_id"] == run_id and sent["exit_code"] == 0
