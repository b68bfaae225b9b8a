"""SshLink against real OpenSSH daemons: what the engine hears about each run.

The engine's side is a recorder of ``LinkEvents``; the engine integration has its own tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest

from opsplane.domain.errors import NotConnected
from opsplane.transport.base import (
    AgentHello,
    CommandEnvelope,
    HostReport,
    RunFinished,
    RunOutput,
    RunStarted,
    UploadSpec,
)
from opsplane.transport.ssh import HostKeyPolicy, SshEndpoint, SshExecutor, SshLink, SshTarget
from tests.integration.sshd import (
    HOST,
    SshLab,
    sleep_marker,
    ssh_lab,
    wait_no_remote_process,
    wait_remote_process,
)

pytestmark = pytest.mark.service("sshd")

HOSTS = ("web-1", "web-2", "db-1")
_BOUND = 15.0  # seconds any awaited report may take


class Recorder:
    """``LinkEvents`` that keeps every report, and lets a test wait for a run's end."""

    def __init__(self) -> None:
        self.reports: list[HostReport] = []
        self._changed = asyncio.Condition()

    async def host_connected(self, hello: AgentHello) -> None:
        raise AssertionError("an SSH link announces no hosts")

    async def host_disconnected(self, hostname: str, link: str) -> None:
        raise AssertionError("an SSH link announces no hosts")

    async def report(self, report: HostReport) -> asyncio.Future[None]:
        async with self._changed:
            self.reports.append(report)
            self._changed.notify_all()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def of(self, run_id: str) -> list[HostReport]:
        return [r for r in self.reports if getattr(r, "run_id", None) == run_id]

    async def finished(self, *run_ids: str) -> dict[str, RunFinished]:
        def ended() -> dict[str, RunFinished]:
            return {
                r.run_id: r
                for r in self.reports
                if isinstance(r, RunFinished) and r.run_id in run_ids and r.run_id is not None
            }

        async with asyncio.timeout(_BOUND), self._changed:
            await self._changed.wait_for(lambda: len(ended()) == len(run_ids))
        return ended()

    async def started(self, run_id: str) -> None:
        async with asyncio.timeout(_BOUND), self._changed:
            await self._changed.wait_for(
                lambda: any(isinstance(r, RunStarted) for r in self.of(run_id))
            )


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with ssh_lab() as the_lab:
        the_lab.start(["bastion"], forwarding=True)
        the_lab.start(["web-1", "web-2", "db-1"])
        yield the_lab


def _endpoint(lab: SshLab, name: str) -> SshEndpoint:
    return SshEndpoint(
        HOST, lab.daemons[name].port, lab.user.name, key_file=str(lab.client_key_path)
    )


def _target(lab: SshLab, name: str) -> SshTarget:
    return SshTarget(name, _endpoint(lab, name), (_endpoint(lab, "bastion"),))


@pytest.fixture
async def link(lab: SshLab, tmp_path: Path) -> AsyncIterator[tuple[SshLink, Recorder]]:
    known = lab.known_hosts(tmp_path / "known_hosts", lab.daemons.values())
    the_link = SshLink(SshExecutor(HostKeyPolicy(known), kill_grace=1.0))
    the_link.set_targets({name: _target(lab, name) for name in HOSTS})
    events = Recorder()
    await the_link.start(events)
    try:
        yield the_link, events
    finally:
        await the_link.stop()


def envelope(
    run_id: str,
    command: str = "true",
    *,
    env: Mapping[str, str] | None = None,
    upload: UploadSpec | None = None,
) -> CommandEnvelope:
    return CommandEnvelope(
        task_id="task-1",
        run_id=run_id,
        attempt=1,
        command=command,
        timeout=30,
        env=env or {},
        upload=upload,
    )


async def test_each_host_reports_started_output_and_finished(
    link: tuple[SshLink, Recorder],
) -> None:
    the_link, events = link
    command = 'echo "hello from $(hostname)"; echo warn >&2; test "$HOST_ROLE" = web'
    for name in HOSTS:
        await the_link.send_command(
            name, envelope(f"run-{name}", command, env={"HOST_ROLE": "web"})
        )
    ended = await events.finished(*(f"run-{name}" for name in HOSTS))
    for name in HOSTS:
        reports = events.of(f"run-{name}")
        assert isinstance(reports[0], RunStarted) and reports[0].hostname == name
        outputs = [r for r in reports if isinstance(r, RunOutput)]
        assert [o.seq for o in outputs] == list(range(1, len(outputs) + 1))
        assert b"".join(o.data for o in outputs if o.stream == "stdout") == (
            f"hello from {os.uname().nodename}\n".encode()
        )
        assert isinstance(reports[-1], RunFinished)
        finished = ended[f"run-{name}"]
        assert (finished.status, finished.exit_code, finished.error) == ("succeeded", 0, None)
        assert finished.stderr == "warn\n" and finished.task_id == "task-1"
        assert finished.started_at is not None and finished.duration_ms is not None


async def test_targets_come_and_go(link: tuple[SshLink, Recorder], lab: SshLab) -> None:
    the_link, _ = link
    assert the_link.is_connected("web-1") and not the_link.is_connected("nowhere")
    the_link.remove_target("web-1")
    assert not the_link.is_connected("web-1")
    with pytest.raises(NotConnected):
        await the_link.send_command("web-1", envelope("run-x"))
    the_link.upsert_target(_target(lab, "web-1"))
    assert the_link.is_connected("web-1")


async def test_a_host_that_cannot_be_reached_ends_its_run_failed(
    link: tuple[SshLink, Recorder], lab: SshLab
) -> None:
    the_link, events = link
    unreachable = SshTarget(
        "ghost", SshEndpoint(HOST, 1, lab.user.name), (_endpoint(lab, "bastion"),)
    )
    the_link.upsert_target(unreachable)
    await the_link.send_command("ghost", envelope("run-ghost"))
    await the_link.send_command("web-2", envelope("run-web-2", "exit 4"))
    ended = await events.finished("run-ghost", "run-web-2")
    ghost = ended["run-ghost"]
    assert ghost.status == "failed" and ghost.started_at is None
    assert "the bastion could not connect to 127.0.0.1:1" in (ghost.error or "")
    assert [type(r) for r in events.of("run-ghost")] == [RunFinished]
    web = ended["run-web-2"]
    assert (web.status, web.exit_code, web.error) == ("failed", 4, "exit code 4")


async def test_a_run_past_its_delivery_deadline_is_not_started(
    link: tuple[SshLink, Recorder],
) -> None:
    the_link, events = link
    late = dataclasses.replace(envelope("run-late", "echo never"), deliver_by=time.time() - 1)
    await the_link.send_command("web-1", late)
    ended = await events.finished("run-late")
    assert ended["run-late"].status == "undeliverable"
    assert "delivery deadline passed" in (ended["run-late"].error or "")
    assert [type(r) for r in events.of("run-late")] == [RunFinished]


async def test_a_run_asking_for_an_account_fails_without_running(
    link: tuple[SshLink, Recorder], tmp_path: Path
) -> None:
    """The engine refuses run_as for SSH hosts at submit; a run that gets here anyway must
    not run as the login user instead."""
    the_link, events = link
    marker = tmp_path / "ran"
    asked = dataclasses.replace(envelope("run-as", f"touch {marker}"), user="deploy")
    await the_link.send_command("web-1", asked)
    ended = await events.finished("run-as")
    assert (ended["run-as"].status, ended["run-as"].error) == (
        "failed",
        "run-as deploy refused: SSH hosts run commands as their login user only; not executed",
    )
    assert [type(r) for r in events.of("run-as")] == [RunFinished]
    assert not marker.exists()


async def test_timeout_and_cancel_stop_the_remote_commands(link: tuple[SshLink, Recorder]) -> None:
    the_link, events = link
    slow, canceled = sleep_marker(), sleep_marker()
    await the_link.send_command(
        "web-1", dataclasses.replace(envelope("run-slow", f"sleep {slow}"), timeout=1)
    )
    await the_link.send_command("web-2", envelope("run-cancel", f"sleep {canceled}"))
    await events.started("run-cancel")
    assert wait_remote_process(f"sleep {canceled}")
    await the_link.send_cancel("web-2", "task-1", "run-cancel", "operator asked")
    ended = await events.finished("run-slow", "run-cancel")
    assert (ended["run-slow"].status, ended["run-slow"].error) == (
        "timed_out",
        "timed out after 1s",
    )
    assert (ended["run-cancel"].status, ended["run-cancel"].exit_code) == ("canceled", None)
    assert wait_no_remote_process(f"sleep {slow}") == []
    assert wait_no_remote_process(f"sleep {canceled}") == []


async def test_stop_kills_what_still_runs(lab: SshLab, tmp_path: Path) -> None:
    known = lab.known_hosts(tmp_path / "known_hosts", lab.daemons.values())
    the_link = SshLink(SshExecutor(HostKeyPolicy(known)), {"db-1": _target(lab, "db-1")})
    events = Recorder()
    await the_link.start(events)
    marker = sleep_marker()
    await the_link.send_command("db-1", envelope("run-long", f"sleep {marker}"))
    await events.started("run-long")
    began = time.monotonic()
    await the_link.stop()
    assert time.monotonic() - began < 5
    assert wait_no_remote_process(f"sleep {marker}") == []
    assert not the_link.is_connected("db-1")


async def test_upload_reports_uploaded_and_failed_files(
    link: tuple[SshLink, Recorder], lab: SshLab, tmp_path: Path
) -> None:
    the_link, events = link
    source = tmp_path / "bundle"
    (source / "ro").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "ro" / "b.txt").write_text("b")
    destination = lab.user_dir("link-upload")
    (destination / "ro").mkdir()
    os.chown(destination / "ro", lab.user.uid, lab.user.gid)
    (destination / "ro").chmod(0o555)
    spec = UploadSpec(str(source), str(destination))
    await the_link.send_command("db-1", envelope("run-push", "", upload=spec))
    await the_link.send_command(
        "web-1",
        envelope(
            "run-push-ok",
            "",
            upload=UploadSpec(str(source / "a.txt"), str(lab.user_dir("link-upload-ok")) + "/"),
        ),
    )
    ended = await events.finished("run-push", "run-push-ok")
    push = ended["run-push"]
    assert push.status == "failed" and push.exit_code is None
    assert push.stdout == f"{destination}/a.txt\n"
    assert push.stderr.startswith(f"{destination}/ro/b.txt: ")
    assert "denied" in push.stderr.lower()
    assert push.error == "1 of 2 files failed"
    assert isinstance(events.of("run-push")[0], RunStarted)
    ok = ended["run-push-ok"]
    assert (ok.status, ok.exit_code, ok.stderr) == ("succeeded", 0, "")
    assert ok.stdout.endswith("link-upload-ok/a.txt\n")
