"""SSH workers: the control plane publishes SSH runs to ``ssh.work``, an ``opsplane worker``
executes them through a bastion and reports over RabbitMQ. Real broker, real sshd."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.inventory import SshHostRequest
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.security.signing import load_or_create_private_key
from opsplane.transport.amqp.link import AmqpLink
from opsplane.transport.ssh import HostKeyPolicy, SshExecutor, SshLink
from opsplane.transport.ssh.link import worker_start_window
from opsplane.transport.ssh.worker import WORK_QUEUE, SshWorker, WorkQueue
from tests.integration.seed_agent import AMQP_URL, purge_shared_queues
from tests.integration.sshd import (
    HOST,
    SshLab,
    remote_pids,
    sleep_marker,
    ssh_lab,
    wait_no_remote_process,
)
from tests.rabbitmq import private_vhost

pytestmark = [pytest.mark.service("rabbitmq"), pytest.mark.service("sshd")]

TARGETS = ("target-1", "target-2")


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with ssh_lab() as the_lab:
        the_lab.start(["bastion"], forwarding=True)
        the_lab.start(list(TARGETS))
        yield the_lab


async def _purge_work() -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(WORK_QUEUE, durable=True)
        await queue.purge()


@dataclass
class Plane:
    engine: Engine
    link: SshLink
    hosts: dict[str, str]  # lab daemon → this test's host name


@pytest.fixture
async def plane(lab: SshLab, tmp_path: Path) -> AsyncIterator[Plane]:
    await purge_shared_queues()
    await _purge_work()
    settings = load_settings(data_dir=tmp_path, heartbeat_interval=1.0, ssh_workers=True)
    assert settings.require_enrollment  # SSH hosts have no agent to enroll: never refused
    key, _ = load_or_create_private_key(settings.signing_key_path)
    amqp = AmqpLink(AMQP_URL, signing_key=key, heartbeat_interval=1.0, offline_after_missed=3)
    known = lab.known_hosts(tmp_path / "known_hosts", lab.daemons.values())
    # The control plane's executor is never used in worker mode; the worker's is.
    ssh = SshLink(SshExecutor(HostKeyPolicy(known)), work_queue=WorkQueue(AMQP_URL))
    worker = SshWorker(AMQP_URL, SshExecutor(HostKeyPolicy(known), kill_grace=1.0), concurrency=4)
    engine = make_engine(settings, [amqp, ssh])
    await engine.start()
    await worker.start()
    suffix = uuid.uuid4().hex[:8]
    names = {daemon: f"{daemon}-{suffix}" for daemon in TARGETS}
    key_file = str(lab.client_key_path)
    bastion = lab.daemons["bastion"]
    try:
        for daemon, name in names.items():
            await engine.hosts.register_ssh_host(
                SshHostRequest(
                    name=name,
                    address=HOST,
                    port=lab.daemons[daemon].port,
                    user=lab.user.name,
                    key_file=key_file,
                    bastions=f"{lab.user.name}@{bastion.address}",
                    bastion_key_file=key_file,
                )
            )
        yield Plane(engine, ssh, names)
    finally:
        with contextlib.suppress(Exception):
            await worker.stop()
        await engine.stop()


async def test_a_command_on_two_targets_runs_on_the_worker_through_the_bastion(
    plane: Plane, lab: SshLab
) -> None:
    before = lab.daemons["bastion"].count("direct-tcpip")
    hosts = tuple(plane.hosts.values())
    task = await plane.engine.tasks.create_task(
        TaskRequest(command="echo via-$(id -un)", targets=Targets(hosts=hosts), timeout=30)
    )
    async with asyncio.timeout(20):
        done = await plane.engine.wait_task(task.id)
    runs = await plane.engine.tasks.list_runs(task.id)
    assert done.status == TaskStatus.SUCCEEDED
    assert {r.host: (r.status, r.exit_code, r.stdout) for r in runs} == {
        name: (RunStatus.SUCCEEDED, 0, f"via-{lab.user.name}\n") for name in hosts
    }
    # Executed by the worker (the control plane's own executor opened nothing), via the bastion.
    assert not plane.link._tasks
    assert lab.daemons["bastion"].count("direct-tcpip") >= before + len(hosts)


async def test_a_cancel_reaches_the_worker_running_the_run(plane: Plane) -> None:
    name = plane.hosts["target-1"]
    marker = sleep_marker()
    task = await plane.engine.tasks.create_task(
        TaskRequest(command=f"sleep {marker}", targets=Targets(hosts=(name,)), timeout=60)
    )
    async with asyncio.timeout(10):
        while True:
            (run,) = await plane.engine.tasks.list_runs(task.id)
            if run.status == RunStatus.RUNNING and remote_pids(marker):
                break
            await asyncio.sleep(0.1)
    await plane.engine.tasks.cancel_task(task.id)
    async with asyncio.timeout(15):
        done = await plane.engine.wait_task(task.id)
    (run,) = await plane.engine.tasks.list_runs(task.id)
    assert done.status == TaskStatus.CANCELED and run.status == RunStatus.CANCELED
    # The worker killed the remote command.
    assert wait_no_remote_process(marker) == []


async def test_a_run_waiting_in_the_broker_past_start_timeout_is_never_started(
    lab: SshLab, tmp_path: Path
) -> None:
    # Issue 13 defect 4 with workers: runs waiting in ssh.work are ended undeliverable by the
    # engine's start_timeout; the worker must then refuse them, not run them late.
    start_timeout = 1.0
    effects = lab.user.home / f"effects-{uuid.uuid4().hex}"
    with private_vhost() as vhost:
        url = vhost.url
        settings = load_settings(
            data_dir=tmp_path, heartbeat_interval=1.0, ssh_workers=True,
            start_timeout=start_timeout,
        )  # fmt: skip
        key, _ = load_or_create_private_key(settings.signing_key_path)
        amqp = AmqpLink(url, signing_key=key, heartbeat_interval=1.0, offline_after_missed=3)
        known = lab.known_hosts(tmp_path / "known_hosts", lab.daemons.values())
        ssh = SshLink(
            SshExecutor(HostKeyPolicy(known)),
            work_queue=WorkQueue(url),
            worker_start_within=worker_start_window(start_timeout),
        )
        # One run at a time: the others wait in the broker far past start_timeout.
        worker = SshWorker(url, SshExecutor(HostKeyPolicy(known)), concurrency=1)
        engine = make_engine(settings, [amqp, ssh])
        await engine.start()
        await worker.start()
        try:
            name = f"target-1-{uuid.uuid4().hex[:8]}"
            await engine.hosts.register_ssh_host(
                SshHostRequest(
                    name=name, address=HOST, port=lab.daemons["target-1"].port,
                    user=lab.user.name, key_file=str(lab.client_key_path),
                )
            )  # fmt: skip
            tasks = [
                await engine.tasks.create_task(
                    TaskRequest(
                        command=f"echo x >> {effects}; sleep 2",
                        targets=Targets(hosts=(name,)),
                        timeout=30,
                    )
                )
                for _ in range(3)
            ]
            async with asyncio.timeout(30):
                for task in tasks:
                    await engine.wait_task(task.id)
            # The queued runs' refusals come back after the engine's verdict: let them land.
            await asyncio.sleep(3)
            statuses = sorted(
                [(await engine.tasks.list_runs(t.id))[0].status for t in tasks], reverse=True
            )
        finally:
            with contextlib.suppress(Exception):
                await worker.stop()
            await engine.stop()
    assert statuses == [RunStatus.UNDELIVERABLE, RunStatus.UNDELIVERABLE, RunStatus.SUCCEEDED]
    # Only the run that started executed.
    assert effects.read_text() == "x\n"
