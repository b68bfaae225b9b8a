"""The real agent against a minimal in-test gRPC control plane (DESIGN §3.1)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.agent import Agent, AgentConfig, Spool, metrics
from opsplane.agent.link import Backoff
from opsplane.domain.errors import ConfigError
from opsplane.security.signing import parse_public_key, public_key_text, sign, verify
from opsplane.transport.base import CommandBatch, CommandEnvelope
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.convert import (
    BATCH_SIGNED,
    CHALLENGE_KEY,
    hello_claims,
    signed_fields,
)
from opsplane.transport.grpc.signer import CommandSigner

WAIT = 5.0


class FakeControlPlane(pb_grpc.CommandServiceServicer):  # type: ignore[misc]
    """Welcomes one agent, records everything it says, and sends what the test queues."""

    def __init__(self, *, ack_results: bool = True, welcome: pb.Welcome | None = None) -> None:
        self.ack_results = ack_results
        self.welcome = welcome or pb.Welcome(heartbeat_interval_seconds=1)
        self.hellos: list[pb.Hello] = []
        self.messages: list[pb.CommandMessage] = []
        self._outbox: asyncio.Queue[pb.CommandMessage] = asyncio.Queue()

    async def ConnectForCommands(self, request_iterator: Any, context: Any) -> None:
        # As the control plane does: a nonce first, which the agent's hello must sign.
        await context.send_initial_metadata(((CHALLENGE_KEY, f"challenge-{len(self.hellos)}"),))
        first = await context.read()
        assert first.WhichOneof("message") == "hello"
        self.hellos.append(first.hello)
        write_lock = asyncio.Lock()

        async def write(message: pb.CommandMessage) -> None:
            async with write_lock:
                await context.write(message)

        await write(pb.CommandMessage(welcome=self.welcome))

        async def forward() -> None:
            while True:
                await write(await self._outbox.get())

        sender = asyncio.create_task(forward())
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                self.messages.append(message)
                if self.ack_results and message.WhichOneof("message") == "command_result":
                    run_id = message.command_result.run_id
                    await write(pb.CommandMessage(ack=pb.Ack(run_id=run_id, kind="result")))
        finally:
            sender.cancel()
            await asyncio.wait({sender})

    def send(self, message: pb.CommandMessage) -> None:
        self._outbox.put_nowait(message)

    def of_kind(self, kind: str, run_id: str | None = None) -> list[Any]:
        found = [getattr(m, kind) for m in self.messages if m.WhichOneof("message") == kind]
        if run_id is not None:
            found = [m for m in found if m.run_id == run_id]
        return found

    async def wait_for(
        self,
        kind: str,
        run_id: str | None = None,
        where: Callable[[Any], bool] = lambda _: True,
    ) -> Any:
        """The first message of ``kind`` (for ``run_id``) that satisfies ``where``."""
        found: list[Any] = []

        def seen() -> bool:
            found[:] = [m for m in self.of_kind(kind, run_id) if where(m)]
            return bool(found)

        await wait_until(seen)
        return found[0]

    async def wait_for_hello(self, count: int = 1) -> pb.Hello:
        await wait_until(lambda: len(self.hellos) >= count)
        return self.hellos[count - 1]


async def wait_until(condition: Callable[[], bool], within: float = WAIT) -> None:
    async def poll() -> None:
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), within)


async def start_server(cp: FakeControlPlane, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_CommandServiceServicer_to_server(cp, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


@contextlib.asynccontextmanager
async def serving(cp: FakeControlPlane, port: int = 0) -> AsyncIterator[int]:
    server, bound = await start_server(cp, port)
    try:
        yield bound
    finally:
        await server.stop(None)


def make_config(tmp_path: Path, port: int) -> AgentConfig:
    return AgentConfig(
        server=f"127.0.0.1:{port}",
        name="test-host",
        groups=("web", "eu"),
        labels={"env": "test"},
        state_dir=tmp_path / "state",
        reconnect_initial=0.05,
        reconnect_max=0.5,
        kill_grace=1.0,
    )


@contextlib.asynccontextmanager
async def running(config: AgentConfig) -> AsyncIterator[tuple[Agent, asyncio.Task[None]]]:
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    try:
        yield agent, task
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 15)


def command(run_id: str, text: str, **fields: Any) -> pb.CommandMessage:
    """A command for the agent of ``make_config`` (its signed target), unless ``target``."""
    fields.setdefault("target", "test-host")
    content = pb.CommandContent(
        task_id="task-1", run_id=run_id, attempt=1, command=text, timestamp=time.time(), **fields
    )
    return pb.CommandMessage(command_content=content)


def new_run_id() -> str:
    return str(uuid.uuid4())


async def test_hello_then_heartbeats(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    async with serving(cp) as port, running(make_config(tmp_path, port)) as (agent, _):
        hello = await cp.wait_for_hello()
        assert hello.hostname == "test-host"
        assert list(hello.groups) == ["web", "eu"]
        assert dict(hello.labels) == {"env": "test"}
        assert hello.version and hello.os
        assert list(hello.running_run_ids) == list(hello.finished_run_ids) == []
        assert list(hello.abandoned_run_ids) == []
        # The agent's own signing key, created on first start.
        assert hello.public_key == agent.public_key
        assert (tmp_path / "state" / "agent.pub").read_text().strip() == agent.public_key

        beat = await cp.wait_for("heartbeat")
        assert beat.hostname == "test-host" and beat.status == "online"
        assert abs(beat.timestamp - time.time()) < 30
        assert 0 <= beat.memory_usage <= 100 and 0 <= beat.disk_usage <= 100


async def test_an_agent_told_of_stream_liveness_sends_metrics_at_the_metrics_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Figures that never move enough: only the interval sends them.
    monkeypatch.setattr(metrics, "SIGNIFICANT", dict.fromkeys(metrics.SIGNIFICANT, 1e9))
    welcome = pb.Welcome(heartbeat_interval_seconds=1, metrics_interval_seconds=3)
    cp = FakeControlPlane(welcome=welcome)
    async with serving(cp) as port, running(make_config(tmp_path, port)):
        await cp.wait_for("heartbeat")  # at once: the control plane knows the figures
        await asyncio.sleep(2.0)
        assert len(cp.of_kind("heartbeat")) == 1  # not one a second
        await wait_until(lambda: len(cp.of_kind("heartbeat")) >= 2)
        first, second = cp.of_kind("heartbeat")[:2]
        assert second.timestamp - first.timestamp >= 2.0
        assert second.signature  # still signed, for control planes that verify


async def test_an_agent_sends_metrics_early_when_they_change_significantly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every move is significant: the figures go every heartbeat interval, not every 60 s.
    monkeypatch.setattr(metrics, "SIGNIFICANT", dict.fromkeys(metrics.SIGNIFICANT, 0.0))
    welcome = pb.Welcome(heartbeat_interval_seconds=1, metrics_interval_seconds=60)
    cp = FakeControlPlane(welcome=welcome)
    async with serving(cp) as port, running(make_config(tmp_path, port)):
        await wait_until(lambda: len(cp.of_kind("heartbeat")) >= 2)


async def test_command_streams_output_and_reports_its_result(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    async with serving(cp) as port, running(make_config(tmp_path, port)):
        await cp.wait_for_hello()
        run_id = new_run_id()
        cp.send(command(run_id, "echo hi; echo err >&2; exit 3"))

        result = await cp.wait_for("command_result", run_id)
        assert (result.status, result.exit_code) == ("failed", 3)
        assert result.HasField("exit_code")
        assert (result.stdout, result.stderr) == ("hi\n", "err\n")
        assert (result.task_id, result.attempt, result.hostname) == ("task-1", 1, "test-host")
        assert result.started_at <= result.finished_at and result.duration_ms >= 0

        ack = await cp.wait_for("ack", run_id)
        assert ack.kind == "command"
        started = await cp.wait_for("started", run_id)
        assert started.pid > 0 and started.task_id == "task-1"
        chunks = cp.of_kind("output", run_id)
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"hi\n"
        assert b"".join(c.data for c in chunks if c.stream == "stderr") == b"err\n"
        assert sorted(c.seq for c in chunks) == list(range(1, len(chunks) + 1))

        kinds = [
            m.WhichOneof("message")
            for m in cp.messages
            if m.WhichOneof("message") in {"ack", "started", "output", "command_result"}
        ]
        assert kinds[:2] == ["ack", "started"] and kinds[-1] == "command_result"

        # The control plane acknowledged the result, so nothing is left to re-send.
        await wait_until(lambda: Spool(tmp_path / "state").pending_results() == [])


async def test_the_same_command_twice_runs_once(tmp_path: Path) -> None:
    cp = FakeControlPlane(ack_results=False)
    marker = tmp_path / "ran"
    async with serving(cp) as port, running(make_config(tmp_path, port)):
        await cp.wait_for_hello()
        run_id = new_run_id()
        message = command(run_id, f"echo once >> {marker}")
        cp.send(message)
        cp.send(message)
        await cp.wait_for("command_result", run_id)

        # Once more after it finished: its unacknowledged result is sent again instead.
        cp.send(message)
        await wait_until(lambda: len(cp.of_kind("command_result", run_id)) >= 2)

        assert marker.read_text() == "once\n"
        assert len(cp.of_kind("started", run_id)) == 1


async def test_unacknowledged_result_is_resent_after_reconnecting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="opsplane.agent")
    first = FakeControlPlane(ack_results=False)
    server, port = await start_server(first)
    run_id = new_run_id()
    async with running(make_config(tmp_path, port)):
        try:
            await first.wait_for_hello()
            first.send(command(run_id, "echo kept"))
            await first.wait_for("command_result", run_id)
        finally:
            # The control plane goes away before storing the result...
            await server.stop(None)
        await wait_until(lambda: "cannot reach" in caplog.text)

        # ...and comes back on the same address; the agent finds it again by itself.
        second = FakeControlPlane()
        async with serving(second, port):
            hello = await second.wait_for_hello()
            assert run_id in hello.finished_run_ids
            result = await second.wait_for("command_result", run_id)
            assert (result.status, result.stdout) == ("succeeded", "kept\n")
            await wait_until(lambda: Spool(tmp_path / "state").pending_results() == [])
            assert second.of_kind("started", run_id) == []  # not run again

    # Ordinary connection failures are one line each, without a traceback.
    failures = [r for r in caplog.records if "cannot reach" in r.getMessage()]
    assert failures and all(r.exc_info is None for r in failures)


async def test_cancel_stops_a_running_command(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    async with serving(cp) as port, running(make_config(tmp_path, port)):
        await cp.wait_for_hello()
        run_id = new_run_id()
        cp.send(command(run_id, "sleep 30"))
        started = await cp.wait_for("started", run_id)
        cp.send(pb.CommandMessage(cancel=pb.Cancel(run_id=run_id, task_id="task-1")))

        result = await cp.wait_for("command_result", run_id)
        assert result.status == "canceled"
        assert not result.HasField("exit_code")
        assert not _alive(started.pid)


async def test_timeout_stops_a_running_command(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    async with serving(cp) as port, running(make_config(tmp_path, port)):
        await cp.wait_for_hello()
        run_id = new_run_id()
        cp.send(command(run_id, "sleep 30", timeout=1))
        result = await cp.wait_for("command_result", run_id)
        assert result.status == "timed_out"
        assert 900 <= result.duration_ms < 5000


async def test_command_past_its_delivery_deadline_is_not_run(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    marker = tmp_path / "ran"
    async with serving(cp) as port, running(make_config(tmp_path, port)):
        await cp.wait_for_hello()
        run_id = new_run_id()
        cp.send(command(run_id, f"touch {marker}", deliver_by=time.time() - 1))
        result = await cp.wait_for("command_result", run_id)
        assert result.status == "undeliverable" and "delivery deadline" in result.error
        assert not marker.exists()


@pytest.mark.parametrize("how", ["request_stop", "cancel"])
async def test_stopping_the_agent_cancels_and_spools_running_commands(
    tmp_path: Path, how: str
) -> None:
    cp = FakeControlPlane(ack_results=False)
    async with serving(cp) as port:
        config = make_config(tmp_path, port)
        agent = Agent(config)
        task = asyncio.create_task(agent.run())
        try:
            await cp.wait_for_hello()
            run_id = new_run_id()
            cp.send(command(run_id, "sleep 30"))
            started = await cp.wait_for("started", run_id)
        finally:
            if how == "cancel":
                task.cancel()
            else:
                agent.request_stop()
            await asyncio.wait({task}, timeout=15)
        assert task.done()
        assert task.cancelled() == (how == "cancel")
        assert not _alive(started.pid)
        [spooled] = Spool(config.state_dir).pending_results()
        assert (spooled["run_id"], spooled["status"]) == (run_id, "canceled")


async def test_restart_kills_what_an_interrupted_run_left(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    async with serving(cp) as port:
        config = make_config(tmp_path, port)
        # What a previous agent, killed mid-run, left: a record and a live process group.
        leftover = await asyncio.create_subprocess_exec("sleep", "30", start_new_session=True)
        try:
            run_id = new_run_id()
            spool = Spool(config.state_dir)
            spool.accept(run_id, "task-1", {})
            spool.record_pid(run_id, leftover.pid, psutil.Process(leftover.pid).create_time())

            async with running(config):
                hello = await cp.wait_for_hello()
                await asyncio.wait_for(leftover.wait(), WAIT)
                assert run_id not in hello.finished_run_ids
                assert list(hello.abandoned_run_ids) == [run_id]
                assert Spool(config.state_dir).interrupted() == []
                await asyncio.sleep(0.2)
                assert cp.of_kind("command_result", run_id) == []
        finally:
            if leftover.returncode is None:
                leftover.kill()
                await leftover.wait()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_an_agent_given_several_instances_fails_over_to_the_next(tmp_path: Path) -> None:
    # The first instance of the list is down from the start, the second dies later: the
    # agent is welcomed by the second, then by the third, with the same hello each time.
    first, second, third = FakeControlPlane(), FakeControlPlane(), FakeControlPlane()
    async with serving(first) as down_port:
        pass  # its port is closed again: "A" of the list is unreachable
    async with serving(third) as third_port:
        server, second_port = await start_server(second)
        servers = f"127.0.0.1:{down_port}, 127.0.0.1:{second_port},127.0.0.1:{third_port}"
        config = dataclasses.replace(make_config(tmp_path, third_port), server=servers)
        try:
            async with running(config):
                await second.wait_for_hello()
                await server.stop(None)
                await third.wait_for_hello()
        finally:
            await server.stop(None)
    assert not first.hellos
    assert second.hellos[0].hostname == third.hellos[0].hostname == "test-host"


def test_a_server_list_is_checked_entry_by_entry() -> None:
    config = AgentConfig(server="127.0.0.1:1,[::1]:2", name="a")
    assert config.servers == ("127.0.0.1:1", "[::1]:2")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        AgentConfig(server="127.0.0.1:1,", name="a")
    with pytest.raises(ConfigError, match=r"got .127\.0\.0\.1.$"):
        AgentConfig(server="127.0.0.1:1,127.0.0.1", name="a")
    # Plaintext is refused to any non-loopback entry, not only the first.
    with pytest.raises(ConfigError, match=r"refusing plaintext to 10\.0\.0\.2:1"):
        AgentConfig(server="127.0.0.1:1,10.0.0.2:1", name="a")


def test_backoff_is_exponential_with_full_jitter() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(7))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    delays = [backoff.next_delay() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.next_delay() <= 0.5


async def test_an_agent_with_a_pinned_key_runs_only_commands_signed_with_it(
    tmp_path: Path,
) -> None:
    control_plane = Ed25519PrivateKey.generate()
    stranger = Ed25519PrivateKey.generate()
    pinned = public_key_text(control_plane.public_key())
    cp = FakeControlPlane()
    forged, stale, genuine = tmp_path / "forged", tmp_path / "stale", tmp_path / "genuine"

    def signed(key: Ed25519PrivateKey, message: pb.CommandMessage) -> pb.CommandMessage:
        content = message.command_content
        content.sign = sign(key, signed_fields(content))
        return message

    async with serving(cp) as port:
        config = dataclasses.replace(make_config(tmp_path, port), control_plane_key=pinned)
        async with running(config):
            hello = await cp.wait_for_hello()
            # The hello proves the agent holds the key it presents.
            claims = {**hello_claims(hello), "signature": hello.signature}
            agent_key = parse_public_key(hello.public_key)
            assert verify(agent_key, claims, "signature")
            cp.send(signed(stranger, command(new_run_id(), f"touch {forged}")))
            cp.send(command(new_run_id(), f"touch {forged}"))  # unsigned
            old = command(new_run_id(), f"touch {stale}")
            old.command_content.timestamp = time.time() - 3600
            cp.send(signed(control_plane, old))
            run_id = new_run_id()
            cp.send(signed(control_plane, command(run_id, f"touch {genuine}")))
            result = await cp.wait_for("command_result", run_id)
            assert result.status == "succeeded" and genuine.exists()
            # Its result is signed with its own key.
            result_claims = {**signed_fields(result), "signature": result.signature}
            assert verify(agent_key, result_claims, "signature")
    assert not forged.exists() and not stale.exists()
    assert [r.run_id for r in cp.of_kind("command_result")] == [run_id]


async def test_a_command_signed_for_another_host_is_refused_and_counted(tmp_path: Path) -> None:
    """Issue 14 §2: a rogue control plane (the project's own stubs) replays to this agent a
    command genuinely signed by the control plane for host ``web-a``: refused, counted, never
    run; a cancel cannot smuggle it either. The hello answered the server's challenge."""
    control_plane = Ed25519PrivateKey.generate()
    pinned = public_key_text(control_plane.public_key())
    cp = FakeControlPlane()
    replayed, own = tmp_path / "replayed", tmp_path / "own"

    def signed(message: pb.CommandMessage) -> pb.CommandMessage:
        content = message.command_content
        content.sign = sign(control_plane, signed_fields(content))
        return message

    async with serving(cp) as port:
        config = dataclasses.replace(make_config(tmp_path, port), control_plane_key=pinned)
        async with running(config) as (agent, _):
            hello = await cp.wait_for_hello()
            assert hello.challenge == "challenge-0"
            captured = signed(command(new_run_id(), f"touch {replayed}", target="web-a"))
            cp.send(captured)
            cp.send(signed(command(new_run_id(), f"touch {replayed}", target="")))
            run_id = new_run_id()
            cp.send(signed(command(run_id, f"touch {own}")))
            result = await cp.wait_for("command_result", run_id)
            assert result.status == "succeeded" and own.exists()
            assert agent.refusals["wrong_target"] == 2
    assert not replayed.exists()
    assert [r.run_id for r in cp.of_kind("command_result")] == [run_id]


async def test_a_batch_signed_command_captured_for_another_host_is_refused(
    tmp_path: Path,
) -> None:
    """Issue 15: one signature for a batch of hosts (transport/grpc/signer.py). The command
    for ``web-a`` of a batch that also holds this host, replayed to it as it was or with its
    target rewritten, is refused and counted; this host's own command of the batch runs, as
    does a command signed for this host alone (the per-host form stays accepted)."""
    control_plane = Ed25519PrivateKey.generate()
    pinned = public_key_text(control_plane.public_key())
    signer = CommandSigner(control_plane)
    cp = FakeControlPlane()
    replayed, alone = tmp_path / "replayed", tmp_path / "alone"
    batch = CommandBatch({"web-a": new_run_id(), "test-host": new_run_id(), "web-b": new_run_id()})

    def envelope(host: str, text: str, run_id: str | None = None) -> CommandEnvelope:
        run_id = run_id or batch.run_ids[host]
        return CommandEnvelope("task-1", run_id, 1, text, 60, batch=batch)

    async with serving(cp) as port:
        config = dataclasses.replace(make_config(tmp_path, port), control_plane_key=pinned)
        async with running(config) as (agent, _):
            hello = await cp.wait_for_hello()
            assert BATCH_SIGNED in hello.features
            now = time.time()
            captured = signer.command(
                "web-a", envelope("web-a", f"touch {replayed}"), now, batch_signed=True
            )
            cp.send(captured)
            readdressed = pb.CommandMessage()
            readdressed.CopyFrom(captured)
            readdressed.command_content.target = "test-host"
            cp.send(readdressed)
            mine = signer.command(
                "test-host", envelope("test-host", f"touch {replayed}"), now, batch_signed=True
            )
            assert mine.command_content.sign == captured.command_content.sign
            # The batch's content touches ``replayed``: sent only once the refusals are counted.
            single = CommandEnvelope("task-2", new_run_id(), 1, f"touch {alone}", 60)
            cp.send(signer.command("test-host", single, now))
            result = await cp.wait_for("command_result", single.run_id)
            assert result.status == "succeeded" and alone.exists()
            assert agent.refusals["wrong_target"] == 2 and not replayed.exists()
            cp.send(mine)
            result = await cp.wait_for("command_result", mine.command_content.run_id)
            assert result.status == "succeeded" and replayed.exists()
    assert signer.signatures == 2
