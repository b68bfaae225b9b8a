"""SSH runs through the engine with real sshd: queued on the link is not undelivered (issue 13
defect 4), and runs a previous control plane was executing end after a restart (defect 5)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.inventory import SshHostRequest
from opsplane.domain.policy import Retries, TaskPolicy
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.engine.sshapi import AdhocEndpoint, AdhocRequest
from opsplane.transport.ssh import HostKeyPolicy, SshExecutor, SshLink
from tests.integration.sshd import HOST, SshLab, ssh_lab

pytestmark = pytest.mark.service("sshd")

TARGETS = ("q-1", "q-2", "q-3", "q-4")
START_TIMEOUT = 1.0
SLEEP = 1.5


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with ssh_lab() as the_lab:
        the_lab.start(list(TARGETS))
        yield the_lab


@dataclass
class Plane:
    engine: Engine
    hosts: tuple[str, ...]
    root: Path


async def _plane(lab: SshLab, root: Path, names: tuple[str, ...], *, register: bool) -> Engine:
    settings = load_settings(
        data_dir=root, heartbeat_interval=1.0, start_timeout=START_TIMEOUT, lost_grace=1.0
    )
    known = lab.known_hosts(root / "known_hosts", lab.daemons.values())
    # One slot: every run but the first waits on the control plane, far past start_timeout.
    executor = SshExecutor(HostKeyPolicy(known), max_parallel=1, kill_grace=1.0)
    engine = make_engine(settings, [SshLink(executor)])
    await engine.start()
    if register:
        for daemon, name in zip(TARGETS, names, strict=True):
            await engine.hosts.register_ssh_host(
                SshHostRequest(
                    name=name,
                    address=HOST,
                    port=lab.daemons[daemon].port,
                    user=lab.user.name,
                    key_file=str(lab.client_key_path),
                )
            )
    return engine


@pytest.fixture
async def plane(lab: SshLab, tmp_path: Path) -> AsyncIterator[Plane]:
    suffix = uuid.uuid4().hex[:8]
    names = tuple(f"{daemon}-{suffix}" for daemon in TARGETS)
    engine = await _plane(lab, tmp_path, names, register=True)
    try:
        yield Plane(engine, names, tmp_path)
    finally:
        with contextlib.suppress(Exception):
            await engine.stop()


async def test_runs_waiting_for_an_ssh_slot_are_not_undeliverable_and_run_once(
    plane: Plane, lab: SshLab
) -> None:
    effects = lab.user.home / f"effects-{uuid.uuid4().hex}"
    # Retries on undeliverable: a run wrongly declared undeliverable would also run again.
    policy = TaskPolicy(retries=Retries(max_attempts=3, on=frozenset({RunStatus.UNDELIVERABLE})))
    task = await plane.engine.tasks.create_task(
        TaskRequest(
            command=f"echo $(cat /proc/sys/kernel/random/uuid) >> {effects}; sleep {SLEEP}",
            targets=Targets(hosts=plane.hosts),
            timeout=30,
            policy=policy,
        )
    )
    # Four runs one after another behind one slot: about 4 times SLEEP, bounded generously.
    async with asyncio.timeout(60):
        done = await plane.engine.wait_task(task.id)
    runs = await plane.engine.tasks.list_runs(task.id)
    assert {r.host: r.status for r in runs} == dict.fromkeys(plane.hosts, RunStatus.SUCCEEDED)
    assert done.status == TaskStatus.SUCCEEDED
    # Each host executed the command exactly once.
    assert len(effects.read_text().split()) == len(plane.hosts)


async def test_ssh_runs_cut_short_by_a_stop_end_lost_at_the_next_start(
    lab: SshLab, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    names = tuple(f"{daemon}-{suffix}" for daemon in TARGETS)
    engine = await _plane(lab, tmp_path, names, register=True)
    try:
        task = await engine.tasks.create_task(
            TaskRequest(command="sleep 30", targets=Targets(hosts=names[:1]), timeout=60)
        )
        for _ in range(150):  # 15 s at most
            if (await engine.tasks.list_runs(task.id))[0].status == RunStatus.RUNNING:
                break
            await asyncio.sleep(0.1)
    finally:
        # The link kills the remote command and reports nothing, as if the process had died.
        await engine.stop()
    restarted = await _plane(lab, tmp_path, names, register=False)
    try:
        (run,) = await restarted.tasks.list_runs(task.id)
        assert run.status == RunStatus.LOST
        assert run.error is not None and "restarted" in run.error
        async with asyncio.timeout(10):
            done = await restarted.wait_task(task.id)
        assert done.status == TaskStatus.FAILED
    finally:
        await restarted.stop()


def _files_holding(root: Path, pattern: str, needle: bytes) -> list[Path]:
    return [path for path in root.glob(pattern) if needle in path.read_bytes()]


async def _result_when_done(engine: Engine, task_id: str) -> dict[str, Any]:
    for _ in range(300):  # 30 s at most
        answer = await engine.ssh_api.result(task_id)
        if answer["status"] != "PENDING":
            return answer
        await asyncio.sleep(0.1)
    raise AssertionError(f"seed 000 task {task_id} still PENDING")


async def _restart_mid_sequence(
    lab: SshLab, root: Path, endpoint: AdhocEndpoint, effects: Path
) -> tuple[str, Engine]:
    """Submit three commands, stop the control plane while the first runs, start it again."""
    engine = await _plane(lab, root, (), register=False)
    try:
        task_id = await engine.ssh_api.submit(
            AdhocRequest(
                targets=[endpoint],
                commands=["sleep 30", f"echo two >> {effects}", f"echo three >> {effects}"],
                timeout=60,
            )
        )
        for _ in range(150):  # 15 s at most
            if (await engine.tasks.list_runs(task_id))[0].status == RunStatus.RUNNING:
                break
            await asyncio.sleep(0.1)
    finally:
        await engine.stop()
    return task_id, await _plane(lab, root, (), register=False)


async def test_a_seed_000_sequence_goes_on_after_a_restart(lab: SshLab, tmp_path: Path) -> None:
    effects = lab.user.home / f"sequence-{uuid.uuid4().hex}"
    endpoint = AdhocEndpoint(
        HOST, lab.daemons["q-1"].port, lab.user.name, key_file=str(lab.client_key_path)
    )
    task_id, restarted = await _restart_mid_sequence(lab, tmp_path, endpoint, effects)
    try:
        answer = await _result_when_done(restarted, task_id)
    finally:
        await restarted.stop()
    by_command = {r["command"]: r for r in answer["results"]}
    assert answer["status"] == "FAILURE"  # the first command was cut short
    assert by_command["sleep 30"]["success"] is False
    assert "restarted" in by_command["sleep 30"]["error"]
    assert by_command[f"echo two >> {effects}"]["success"] is True
    assert by_command[f"echo three >> {effects}"]["success"] is True
    assert effects.read_text() == "two\nthree\n"


async def test_a_seed_000_sequence_with_an_inline_key_fails_clearly_after_a_restart(
    lab: SshLab, tmp_path: Path
) -> None:
    effects = lab.user.home / f"sequence-{uuid.uuid4().hex}"
    endpoint = AdhocEndpoint(
        HOST, lab.daemons["q-2"].port, lab.user.name,
        private_key=lab.client_key_path.read_text(),
    )  # fmt: skip
    task_id, restarted = await _restart_mid_sequence(lab, tmp_path, endpoint, effects)
    try:
        answer = await _result_when_done(restarted, task_id)
    finally:
        await restarted.stop()
    assert answer["status"] == "FAILURE"
    rest = [r for r in answer["results"] if r["command"] != "sleep 30"]
    assert len(rest) == 2
    for entry in rest:
        assert entry["success"] is False
        assert "passwords or private keys are never stored" in entry["error"]
    assert not effects.exists()
    # The key itself is nowhere in the database.
    assert not _files_holding(tmp_path, "opsplane.db*", b"PRIVATE KEY")  # the WAL too
