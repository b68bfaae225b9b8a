"""Fault scenario 9 (issue 13): message abuse on both links.

A rogue client speaks to the control plane over each link: malformed protobuf or JSON, a
message over the size limit, unknown kinds and statuses, missing fields, wrong types, times out
of range. Each message is refused and counted (``opsplane_messages_refused_total``), nothing
crashes, and ingest goes on: a real run afterwards succeeds and its result is stored.

gRPC: a real control plane process, the rogue built from the project's own stubs. RabbitMQ: the
engine in-process on a virtual host of its own (the link's queue names are fixed by seed 002, and
other tests share the broker), the rogue publishing with aio-pika.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import grpc.aio
import httpx
import pytest

from opsplane.config import load_settings
from opsplane.domain.errors import NotFound
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.security.signing import load_or_create_private_key
from opsplane.transport.amqp.link import AmqpLink
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.server import MAX_MESSAGE_BYTES
from tests.e2e.fleet import Fleet, wait_for
from tests.integration.apps import running_engine
from tests.integration.seed_agent import SeedAgent
from tests.rabbitmq import PrivateVhost

pytestmark = pytest.mark.timeout(240)
WAIT = 20.0
_SERVICE = pb.DESCRIPTOR.services_by_name["CommandService"]
_METHOD = f"/{_SERVICE.full_name}/ConnectForCommands"


def _refused(metrics: str) -> dict[tuple[str, str], float]:
    found = {}
    for m in re.finditer(
        r'^opsplane_messages_refused_total\{link="([^"]+)",reason="([^"]+)"\} (\S+)$',
        metrics,
        re.MULTILINE,
    ):
        found[(m.group(1), m.group(2))] = float(m.group(3))
    return found


def _hello(name: str) -> pb.CommandMessage:
    return pb.CommandMessage(hello=pb.Hello(hostname=name, version="rogue", timestamp=time.time()))


def _result(**fields: Any) -> pb.CommandMessage:
    return pb.CommandMessage(command_result=pb.CommandResult(**fields))


# What a rogue sends on an open stream, and how each is counted.
_GRPC_MALFORMED = [
    _result(run_id=str(uuid.uuid4()), status="exploded", exit_code=0),
    _result(status="succeeded", exit_code=0),  # no run id
    _result(run_id=str(uuid.uuid4()), status="succeeded", started_at=1e300),
    _result(run_id=str(uuid.uuid4()), status="failed", finished_at=math.nan),
    _result(run_id="x" * 5000, status="succeeded"),
    _result(run_id=str(uuid.uuid4()), status="succeeded", duration_ms=-5),
    pb.CommandMessage(output=pb.OutputChunk(run_id=str(uuid.uuid4()), stream="stdin", data=b"x")),
    pb.CommandMessage(output=pb.OutputChunk(run_id=str(uuid.uuid4()), seq=-1, data=b"x")),
    pb.CommandMessage(output=pb.OutputChunk(data=b"no run")),
    pb.CommandMessage(started=pb.Started(run_id=str(uuid.uuid4()), started_at=-math.inf)),
    pb.CommandMessage(heartbeat=pb.Heartbeat(cpu_usage=math.nan)),
    pb.CommandMessage(heartbeat=pb.Heartbeat(memory_usage=math.inf)),
]
_GRPC_UNEXPECTED = [
    pb.CommandMessage(),  # no kind at all
    pb.CommandMessage(command_content=pb.CommandContent(command="rm -rf /")),
    pb.CommandMessage(welcome=pb.Welcome()),
    _hello("rogue-again"),
]


async def _ends_with(call: Any) -> grpc.StatusCode:
    """The status a call ended with (bounded wait)."""
    async with asyncio.timeout(WAIT):
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
        return await call.code()  # type: ignore[no-any-return]


async def _abuse_grpc(target: str) -> dict[str, grpc.StatusCode]:
    ended = {}
    options = [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.CommandServiceStub(channel)
        # Well-formed messages with bad content, on one stream that stays open.
        call = stub.ConnectForCommands()
        await call.write(_hello("rogue-1"))
        assert (await asyncio.wait_for(call.read(), WAIT)).HasField("welcome")
        for message in _GRPC_MALFORMED + _GRPC_UNEXPECTED:
            await call.write(message)
        # Over the size limit: the stream ends before the message is read.
        huge = pb.OutputChunk(run_id=str(uuid.uuid4()), data=b"\0" * (MAX_MESSAGE_BYTES + 1))
        await call.write(pb.CommandMessage(output=huge))
        ended["huge"] = await _ends_with(call)

        # Not protobuf at all, first on a stream and after a hello.
        raw = channel.stream_stream(
            _METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        call = raw()  # type: ignore[call-arg]
        await call.write(b"\xff\xfe garbage \x00\x01")
        ended["garbage first"] = await _ends_with(call)
        call = raw()  # type: ignore[call-arg]
        await call.write(_hello("rogue-2").SerializeToString())
        await asyncio.wait_for(call.read(), WAIT)
        await call.write(b"\x0a\xff\xff\xff\xff\x0f truncated")
        ended["garbage later"] = await _ends_with(call)
        # Not a hello first.
        call = stub.ConnectForCommands()
        await call.write(_result(run_id=str(uuid.uuid4()), status="succeeded"))
        ended["no hello"] = await _ends_with(call)
    return ended


async def test_grpc_abuse_is_refused_and_counted_and_ingest_goes_on(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        fleet.start_server()
        ended = await _abuse_grpc(fleet.grpc)
        assert ended["huge"] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ended["no hello"] == grpc.StatusCode.INVALID_ARGUMENT
        assert ended["garbage first"] != grpc.StatusCode.OK
        assert ended["garbage later"] != grpc.StatusCode.OK
        with fleet.client() as client:
            expected = {
                # and the two streams of garbage
                ("grpc", "malformed"): len(_GRPC_MALFORMED) + 2,
                ("grpc", "unexpected"): len(_GRPC_UNEXPECTED),
            }

            def counted() -> dict[tuple[str, str], float] | None:
                found = _refused(client.get("/metrics").text)
                return found if all(found.get(k) == n for k, n in expected.items()) else None

            found = wait_for(counted, WAIT, "the refusals counted")
            assert found.get(("ingest", "unprocessable"), 0) == 0
            # Nothing crashed: alive, ready, and a real agent's run is stored.
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200, client.get("/readyz").text
        fleet.start_agent("honest-1")
        fleet.wait_online("honest-1")
        task = fleet.create_task("echo still-here", hosts=["honest-1"])
        assert fleet.wait_task_done(task["id"])["status"] == "succeeded"
        assert fleet.runs(task["id"])["honest-1"]["stdout"] == "still-here\n"
        assert fleet.server is not None and fleet.server.poll() is None
        assert "Traceback" not in fleet.server_log(), fleet.server_log()
    finally:
        fleet.stop()


# RabbitMQ ---------------------------------------------------------------------------------


_AMQP_RESULTS_MALFORMED: list[bytes] = [
    b"not json",
    b"\xff\xfe\x00 not utf-8",
    b"[1, 2, 3]",
    b'"a string"',
    b"{",
    json.dumps({"hostname": "rogue", "run_id": "r1", "status": "exploded"}).encode(),
    json.dumps({"hostname": "rogue", "type": "telepathy", "run_id": "r1"}).encode(),
    json.dumps({"hostname": "rogue", "exit_code": 0}).encode(),  # no run_id nor task_id
    json.dumps({"hostname": "rogue", "run_id": 42, "exit_code": 0}).encode(),
    json.dumps({"hostname": "rogue", "run_id": "r1", "exit_code": "zero"}).encode(),
    json.dumps({"hostname": "rogue", "run_id": "r1", "exit_code": 1e30}).encode(),
    json.dumps({"hostname": "rogue", "run_id": "r1", "exit_code": 0, "started_at": 1e300}).encode(),
    json.dumps({"hostname": "rogue", "run_id": "r1", "exit_code": 0, "stdout": ["x"]}).encode(),
    json.dumps({"hostname": "rogue", "run_id": "r1", "exit_code": 0, "truncated": "yes"}).encode(),
    json.dumps({"hostname": "bad host name!", "run_id": "r1", "exit_code": 0}).encode(),
    json.dumps({"hostname": "rogue", "type": "output", "run_id": "r1", "seq": -3}).encode(),
    json.dumps({"hostname": "rogue", "type": "output", "run_id": "r1", "stream": "x"}).encode(),
    json.dumps({"hostname": "rogue", "run_id": "r1", "duration_ms": math.nan}).encode(),
    b"{" + b'"x": "' + b"y" * (17 * 1024 * 1024) + b'"}',  # over the size limit
]
_AMQP_HEARTBEATS_MALFORMED: list[bytes] = [
    b"garbage",
    b"{}",
    json.dumps({"hostname": "rogue", "cpu_usage": "high"}).encode(),
    json.dumps({"hostname": "rogue", "memory_usage": math.inf}).encode(),
    json.dumps({"hostname": "rogue", "groups": "not-a-list"}).encode(),
    json.dumps({"hostname": "rogue", "labels": ["not", "an", "object"]}).encode(),
]


@pytest.mark.service("rabbitmq")
@pytest.mark.service("rabbitmqctl")
async def test_amqp_abuse_is_refused_and_counted_and_ingest_goes_on(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    # A virtual host of this test's own: the link's queue names are fixed.
    url = vhost.url
    settings = load_settings(data_dir=tmp_path, heartbeat_interval=1.0, require_enrollment=False)
    key, _ = load_or_create_private_key(settings.signing_key_path)
    link = AmqpLink(url, signing_key=key, heartbeat_interval=1.0, offline_after_missed=3)
    async with running_engine(settings, [link]) as engine:
        await _abuse_amqp(engine, url)


async def _abuse_amqp(engine: Engine, url: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        results = await channel.get_exchange("sys_result_exchange")
        monitor = await channel.get_exchange("sys_monitor_exchange")
        for body in _AMQP_RESULTS_MALFORMED:
            await results.publish(aio_pika.Message(body), routing_key="result.node.rogue")
        for body in _AMQP_HEARTBEATS_MALFORMED:
            await monitor.publish(aio_pika.Message(body), routing_key="heartbeat")
        expected = len(_AMQP_RESULTS_MALFORMED) + len(_AMQP_HEARTBEATS_MALFORMED)
        await _until(lambda: engine.refused[("amqp", "malformed")] >= expected)
        await asyncio.sleep(0.5)
        assert engine.refused[("amqp", "malformed")] == expected
        assert engine.refused[("ingest", "unprocessable")] == 0
        # Refused for good: nothing left in the queues to come back.
        for name in ("cmd.result", "monitor.heartbeat"):
            queue = await channel.declare_queue(name, durable=True, passive=True)
            assert queue.declaration_result.message_count == 0, name
        assert engine.loops.problems() == {}

    # A seed-002 agent's run afterwards: stored.
    agent = SeedAgent(f"honest-{uuid.uuid4().hex[:6]}", url=url)
    await agent.start()
    beating = asyncio.create_task(agent.beat_every(0.5))
    try:
        online: list[bool] = [False]

        async def check() -> None:
            online[0] = await _online(engine, agent.hostname)

        async with asyncio.timeout(WAIT):
            while True:
                await check()
                if online[0]:
                    break
                await asyncio.sleep(0.1)
        task = await engine.tasks.create_task(
            TaskRequest(command="echo still-here", targets=Targets(hosts=(agent.hostname,)))
        )
        async with asyncio.timeout(WAIT):
            done = await engine.wait_task(task.id)
        (run,) = await engine.tasks.list_runs(task.id)
        assert (done.status, run.status, run.stdout) == (
            TaskStatus.SUCCEEDED,
            RunStatus.SUCCEEDED,
            "still-here\n",
        )
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        await agent.stop()


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


async def _online(engine: Engine, name: str) -> bool:
    try:
        return (await engine.hosts.get_host(name)).status == "online"
    except NotFound:
        return False


async def test_metrics_name_the_refusals(tmp_path: Path) -> None:
    """The counter the scenario reads is the one /metrics serves (checked without a broker)."""
    from opsplane.app_factory import create_app
    from tests.e2e.fleet import free_port

    settings = load_settings(data_dir=tmp_path, grpc_listen=f"127.0.0.1:{free_port()}")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        engine: Engine = app.state.engine
        engine.message_refused("amqp", "malformed")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            metrics = (await client.get("/metrics")).text
        assert _refused(metrics)[("amqp", "malformed")] == 1.0
        assert 'opsplane_background_loop_down{loop="ingest"} 0.0' in metrics
        assert 'opsplane_background_loop_restarts_total{loop="ingest"} 0.0' in metrics
        assert "opsplane_ingest_paused 0.0" in metrics
        assert "opsplane_archive_write_failures_total 0.0" in metrics
