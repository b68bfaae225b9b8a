"""SshExecutor against real OpenSSH daemons on loopback: a bastion, a second hop, targets.

What the servers saw is read from their own logs: a forwarded connection on a bastion
(``server_request_direct_tcpip``), a login on a target (``Accepted publickey``). Remote
processes are looked for with ``pgrep`` — the targets are this machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest

from opsplane.domain.errors import InvalidInput
from opsplane.execution import Outcome
from opsplane.transport.ssh import HostKeyPolicy, SshEndpoint, SshExecutor, SshTarget
from opsplane.transport.ssh.sessions import remote_command, start_command
from tests.integration.sshd import (
    HOST,
    SshLab,
    sleep_marker,
    ssh_lab,
    wait_no_remote_process,
    wait_remote_process,
)

pytestmark = pytest.mark.service("sshd")

TARGETS = ("t1", "t2", "t3")
FORWARDED = "server_request_direct_tcpip"
LOGIN = "Accepted publickey"


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with ssh_lab() as the_lab:
        the_lab.start(["bastion", "inner"], forwarding=True)
        the_lab.start(TARGETS)
        the_lab.start(["narrow"], max_sessions=1)
        yield the_lab


@pytest.fixture
def known_hosts(lab: SshLab, tmp_path: Path) -> Path:
    return lab.known_hosts(tmp_path / "known_hosts", lab.daemons.values())


@pytest.fixture
async def executor(known_hosts: Path) -> AsyncIterator[SshExecutor]:
    the_executor = SshExecutor(HostKeyPolicy(known_hosts), kill_grace=1.0, connect_timeout=5.0)
    try:
        yield the_executor
    finally:
        await the_executor.close()


LAB_KEY = "<the lab's authorized key>"


def endpoint(
    lab: SshLab, name: str, *, key_file: str | None = LAB_KEY, password: str | None = None
) -> SshEndpoint:
    if key_file == LAB_KEY:
        key_file = str(lab.client_key_path)
    port = lab.daemons[name].port
    return SshEndpoint(HOST, port, lab.user.name, key_file=key_file, password=password)


def target(
    lab: SshLab,
    name: str,
    via: tuple[str, ...] = ("bastion",),
    *,
    key_file: str | None = LAB_KEY,
    password: str | None = None,
) -> SshTarget:
    """The target ``name`` reached through the daemons ``via``, with the lab's key."""
    login = endpoint(lab, name, key_file=key_file, password=password)
    return SshTarget(name, login, tuple(endpoint(lab, hop) for hop in via))


# -- endpoints ---------------------------------------------------------------------------


def test_endpoint_parses_addresses_and_bastion_chains() -> None:
    assert SshEndpoint.parse("ops@edge:2222") == SshEndpoint("edge", 2222, "ops")
    assert SshEndpoint.parse("web-7", username="deploy") == SshEndpoint("web-7", 22, "deploy")
    assert SshEndpoint.parse("ssh://root@[::1]:22").host == "::1"
    chain = SshEndpoint.parse_chain("ops@edge:22, ops@inner", key_file="/keys/ops")
    assert [str(hop) for hop in chain] == ["ops@edge:22", "ops@inner:22"]
    assert all(hop.key_file == "/keys/ops" for hop in chain)
    assert SshEndpoint.parse_chain("") == ()
    for bad in ("", "a b", "ops@edge:99999", "ops@edge:x", "edge,,inner"):
        with pytest.raises(InvalidInput):
            SshEndpoint.parse_chain(bad) if "," in bad else SshEndpoint.parse(bad)


def test_endpoint_text_never_shows_secrets() -> None:
    secret = SshEndpoint(
        "10.0.0.7",
        username="ops",
        password="pw-SECRET-1",
        private_key="-----BEGIN OPENSSH PRIVATE KEY-----KEY-SECRET-2",
        passphrase="pp-SECRET-3",
    )
    chained = SshTarget("web-7", dataclasses.replace(secret, private_key=None), (secret,))
    for text in (repr(secret), str(secret), repr(chained), str(chained), secret.auth_methods):
        assert "SECRET" not in text
    assert "password" in repr(secret)  # says a secret is set, not what it is


# -- commands ----------------------------------------------------------------------------


async def test_commands_run_on_several_targets_through_one_bastion_connection(
    lab: SshLab, executor: SshExecutor
) -> None:
    bastion = lab.daemons["bastion"]
    forwarded_before, logins_before = bastion.count(FORWARDED), bastion.count(LOGIN)
    command = 'echo "out $(hostname)"; echo "err" >&2; exit $CODE'
    results = await asyncio.gather(
        *(
            executor.run(target(lab, name), command, env={"CODE": str(code)}, timeout=10)
            for code, name in enumerate(TARGETS)
        )
    )
    hostname = os.uname().nodename
    for code, result in enumerate(results):
        assert result.stdout == f"out {hostname}\n"
        assert result.stderr == "err\n"
        assert result.exit_code == code
        assert result.started_at is not None and result.duration_ms is not None
    assert [r.status for r in results] == [Outcome.SUCCEEDED, Outcome.FAILED, Outcome.FAILED]
    assert [r.error for r in results] == [None, "exit code 1", "exit code 2"]
    # One bastion login, one forwarded channel per target, each to that target's port.
    assert bastion.wait_for_log(FORWARDED, forwarded_before + 3) == forwarded_before + 3
    assert bastion.count(LOGIN) == logins_before + 1
    for name in TARGETS:
        assert f"target {HOST} port {lab.daemons[name].port}" in bastion.log()
    assert executor.pool.opened == 4


async def test_output_is_streamed_while_the_command_runs(
    lab: SshLab, executor: SshExecutor
) -> None:
    chunks: list[tuple[float, str, bytes]] = []
    starts: list[float] = []

    async def on_output(stream: str, data: bytes) -> None:
        chunks.append((time.monotonic(), stream, data))

    async def on_started(_at: object) -> None:
        starts.append(time.monotonic())

    result = await executor.run(
        target(lab, "t1"),
        "echo first; sleep 0.6; echo second >&2",
        on_output=on_output,
        on_started=on_started,
        timeout=10,
    )
    finished = time.monotonic()
    assert result.status is Outcome.SUCCEEDED
    assert [(s, d) for _, s, d in chunks] == [("stdout", b"first\n"), ("stderr", b"second\n")]
    assert len(starts) == 1 and starts[0] <= chunks[0][0]
    assert finished - chunks[0][0] > 0.4  # the first line came long before the end


async def test_large_output_is_capped_head_and_tail(lab: SshLab, known_hosts: Path) -> None:
    executor = SshExecutor(HostKeyPolicy(known_hosts), output_cap=1024)
    try:
        result = await executor.run(target(lab, "t2"), "seq 1 100000", timeout=10)
    finally:
        await executor.close()
    assert result.status is Outcome.SUCCEEDED and result.truncated
    assert result.stdout.startswith("1\n2\n3\n")
    assert result.stdout.endswith("99999\n100000\n")
    assert "bytes truncated" in result.stdout


async def test_timeout_kills_the_remote_command_and_its_children(
    lab: SshLab, executor: SshExecutor
) -> None:
    child, leader = sleep_marker(), sleep_marker()
    began = time.monotonic()
    result = await executor.run(
        target(lab, "t1"), f"sleep {child} & sleep {leader}; echo never", timeout=0.5
    )
    assert result.status is Outcome.TIMED_OUT
    assert result.exit_code is None and result.error == "timed out after 0.5s"
    assert "never" not in result.stdout
    assert time.monotonic() - began < 5
    assert wait_no_remote_process(f"sleep {child}") == []
    assert wait_no_remote_process(f"sleep {leader}") == []


async def test_cancel_kills_the_remote_command(lab: SshLab, executor: SshExecutor) -> None:
    marker = sleep_marker()
    cancel = asyncio.Event()

    async def on_started(_at: object) -> None:
        asyncio.get_running_loop().call_later(0.3, cancel.set)

    result = await executor.run(
        target(lab, "t2"), f"sleep {marker}", on_started=on_started, cancel=cancel, timeout=30
    )
    assert result.status is Outcome.CANCELED and result.error == "canceled"
    assert result.started_at is not None
    assert wait_no_remote_process(f"sleep {marker}") == []


async def test_cancel_before_the_connection_is_up_runs_nothing(
    lab: SshLab, executor: SshExecutor
) -> None:
    cancel = asyncio.Event()
    cancel.set()
    result = await executor.run(target(lab, "t3"), "true", cancel=cancel)
    assert result.status is Outcome.CANCELED and result.started_at is None
    assert executor.pool.opened == 0


async def test_a_cancelled_caller_takes_its_remote_command_down(
    lab: SshLab, executor: SshExecutor
) -> None:
    marker = sleep_marker()
    running = asyncio.Event()

    async def on_started(_at: object) -> None:
        running.set()

    task = asyncio.create_task(
        executor.run(target(lab, "t3"), f"sleep {marker}", on_started=on_started)
    )
    await asyncio.wait_for(running.wait(), 10)
    assert wait_remote_process(f"sleep {marker}")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wait_no_remote_process(f"sleep {marker}") == []


async def test_a_remote_command_ends_when_its_connection_drops(
    lab: SshLab, known_hosts: Path
) -> None:
    # Issue 13 defect 5: sshd leaves a command without a terminal running when the client
    # vanishes (a control plane killed with kill -9); the remote guard ends it.
    marker = sleep_marker()
    daemon = lab.daemons["t3"]
    conn = await asyncssh.connect(
        HOST,
        port=daemon.port,
        username=lab.user.name,
        client_keys=[str(lab.client_key_path)],
        known_hosts=str(known_hosts),
    )
    try:
        await start_command(remote_command(f"sleep {marker}; echo done"))(conn)
        assert wait_remote_process(f"sleep {marker}")
    finally:
        conn.abort()  # the TCP connection closes, nothing more is said
    # In a thread: the loop must run for the aborted socket to be closed.
    assert await asyncio.to_thread(wait_no_remote_process, f"sleep {marker}") == []


# -- failures stay per host --------------------------------------------------------------


async def test_a_target_refusing_the_key_fails_alone(lab: SshLab, executor: SshExecutor) -> None:
    stranger = target(lab, "t1", key_file=str(lab.stranger_key_path))
    results = await asyncio.gather(
        executor.run(stranger, "true"),
        executor.run(target(lab, "t2"), "true"),
        executor.run(target(lab, "t3"), "true"),
    )
    assert [r.status for r in results] == [Outcome.FAILED, Outcome.SUCCEEDED, Outcome.SUCCEEDED]
    error = results[0].error or ""
    assert error.startswith(f"target {stranger.endpoint} via ")
    assert "authentication failed for user opsplane-sshtest" in error
    assert results[0].started_at is None


async def test_password_login(lab: SshLab, executor: SshExecutor) -> None:
    good = target(lab, "t2", key_file=None, password=lab.user.password)
    bad = target(lab, "t3", key_file=None, password="not-the-password")
    ok, refused = await asyncio.gather(
        executor.run(good, "echo via-password"), executor.run(bad, "true")
    )
    assert ok.status is Outcome.SUCCEEDED and ok.stdout == "via-password\n"
    assert refused.status is Outcome.FAILED
    assert "authentication failed" in (refused.error or "")
    assert "(offered: password)" in (refused.error or "")


async def test_secrets_are_never_logged(
    lab: SshLab, executor: SshExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bad = target(lab, "t3", key_file=None, password="pw-never-logged")
    result = await executor.run(bad, "true")
    assert result.status is Outcome.FAILED
    assert "pw-never-logged" not in caplog.text
    assert "pw-never-logged" not in (result.error or "")


async def test_bastion_unreachable_names_the_hop(lab: SshLab, executor: SshExecutor) -> None:
    dead_bastion = SshTarget(
        "t1", endpoint(lab, "t1"), (SshEndpoint(HOST, _closed_port(), lab.user.name),)
    )
    dead_target = SshTarget(
        "gone", SshEndpoint(HOST, _closed_port(), lab.user.name), (endpoint(lab, "bastion"),)
    )
    via_dead, to_dead = await asyncio.gather(
        executor.run(dead_bastion, "true"), executor.run(dead_target, "true")
    )
    assert via_dead.status is Outcome.FAILED
    assert (via_dead.error or "").startswith(f"bastion 1 of 1 ({dead_bastion.bastions[0]}) failed:")
    assert "refused" in (via_dead.error or "")
    assert to_dead.status is Outcome.FAILED
    assert (to_dead.error or "").startswith(f"target {dead_target.endpoint} via ")
    assert "the bastion could not connect" in (to_dead.error or "")


async def test_chained_bastions_forward_hop_by_hop(lab: SshLab, executor: SshExecutor) -> None:
    edge, inner, t3 = lab.daemons["bastion"], lab.daemons["inner"], lab.daemons["t3"]
    edge_before, inner_before = edge.count(FORWARDED), inner.count(FORWARDED)
    result = await executor.run(target(lab, "t3", via=("bastion", "inner")), "echo deep")
    assert result.status is Outcome.SUCCEEDED and result.stdout == "deep\n"
    assert edge.wait_for_log(FORWARDED, edge_before + 1) == edge_before + 1
    assert inner.wait_for_log(FORWARDED, inner_before + 1) == inner_before + 1
    assert f"target {HOST} port {inner.port}" in edge.log()
    assert f"target {HOST} port {t3.port}" in inner.log()


async def test_runs_on_one_target_reuse_its_connection(lab: SshLab, executor: SshExecutor) -> None:
    t2 = lab.daemons["t2"]
    logins_before = t2.count(LOGIN)
    for _ in range(3):
        result = await executor.run(target(lab, "t2"), "true")
        assert result.status is Outcome.SUCCEEDED
    assert t2.wait_for_log(LOGIN, logins_before + 1) == logins_before + 1
    await asyncio.sleep(0.2)  # a second login would have been logged by now
    assert t2.count(LOGIN) == logins_before + 1
    assert executor.pool.opened == 2  # bastion + t2


async def test_idle_connections_are_closed(lab: SshLab, known_hosts: Path) -> None:
    executor = SshExecutor(HostKeyPolicy(known_hosts), idle_timeout=0.2)
    try:
        result = await executor.run(target(lab, "t1"), "true")
        assert result.status is Outcome.SUCCEEDED
        assert executor.pool.connections() == 2
        for _ in range(100):  # up to 5 s; the reaper wakes every 0.1 s here
            if not executor.pool.connections():
                break
            await asyncio.sleep(0.05)
        assert executor.pool.connections() == 0
        again = await executor.run(target(lab, "t1"), "true")
        assert again.status is Outcome.SUCCEEDED and executor.pool.opened == 4
    finally:
        await executor.close()


async def test_a_server_refusing_more_sessions_gets_more_connections(
    lab: SshLab, executor: SshExecutor
) -> None:
    narrow = target(lab, "narrow", via=())  # its sshd allows one session per connection
    results = await asyncio.gather(
        *(executor.run(narrow, f"sleep 0.3; echo {i}") for i in range(3))
    )
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n"]
    assert executor.pool.opened >= 2


# -- host keys ---------------------------------------------------------------------------


async def test_a_wrong_host_key_is_refused(lab: SshLab, tmp_path: Path) -> None:
    t1 = lab.daemons["t1"]
    known = lab.known_hosts(tmp_path / "known_hosts", [lab.daemons["bastion"]])
    with known.open("a") as f:
        f.write(t1.known_hosts_line(lab.stranger_key))  # t1 listed with another key
    for tofu in (False, True):  # a changed key is refused even with trust on first use
        executor = SshExecutor(HostKeyPolicy(known, trust_on_first_use=tofu))
        try:
            result = await executor.run(target(lab, "t1"), "true")
        finally:
            await executor.close()
        assert result.status is Outcome.FAILED
        assert "host key mismatch" in (result.error or ""), result.error
        assert result.error is not None and result.error.startswith("target ")
    assert known.read_text().count(f"[{HOST}]:{t1.port}") == 1  # nothing was added


async def test_an_unknown_host_key_is_refused_without_trust_on_first_use(
    lab: SshLab, tmp_path: Path
) -> None:
    known = lab.known_hosts(tmp_path / "known_hosts", [lab.daemons["t1"]])
    executor = SshExecutor(HostKeyPolicy(known))
    try:
        via_unknown_bastion = await executor.run(target(lab, "t1"), "true")
        unknown_target = await executor.run(target(lab, "t2", via=()), "true")
    finally:
        await executor.close()
    # The bastion's key is checked like any target's.
    assert via_unknown_bastion.status is Outcome.FAILED
    assert (via_unknown_bastion.error or "").startswith("bastion 1 of 1 (")
    assert "unknown host key" in (via_unknown_bastion.error or "")
    assert unknown_target.status is Outcome.FAILED
    assert "unknown host key" in (unknown_target.error or "")
    assert known.read_text() == lab.daemons["t1"].known_hosts_line()


async def test_trust_on_first_use_records_unknown_keys(lab: SshLab, tmp_path: Path) -> None:
    known = tmp_path / "ssh" / "known_hosts"  # not there yet: created
    policy = HostKeyPolicy(known, trust_on_first_use=True)
    executor = SshExecutor(policy)
    try:
        first = await asyncio.gather(*(executor.run(target(lab, n), "true") for n in TARGETS))
    finally:
        await executor.close()
    assert [r.status for r in first] == [Outcome.SUCCEEDED] * 3
    recorded = known.read_text()
    for name in ("bastion", *TARGETS):
        assert recorded.count(lab.daemons[name].known_hosts_line()) == 1
    # The recorded keys are now what is checked, with trust on first use off.
    strict = SshExecutor(HostKeyPolicy(known))
    try:
        again = await strict.run(target(lab, "t1"), "true")
    finally:
        await strict.close()
    assert again.status is Outcome.SUCCEEDED


# -- uploads -----------------------------------------------------------------------------


async def test_directory_upload_reports_each_file(
    lab: SshLab, executor: SshExecutor, tmp_path: Path
) -> None:
    source = tmp_path / "site"
    (source / "conf").mkdir(parents=True)
    (source / "locked").mkdir()
    (source / "index.html").write_text("<h1>hi</h1>")
    (source / "conf" / "app.ini").write_text("[app]\n")
    (source / "locked" / "secret.txt").write_text("nope")
    run_sh = source / "run.sh"
    run_sh.write_text("#!/bin/sh\necho run\n")
    run_sh.chmod(0o755)
    destination = lab.user_dir("upload-dir") / "site"
    destination.mkdir()
    (destination / "locked").mkdir(mode=0o555)
    for path in (destination, destination / "locked"):
        os.chown(path, lab.user.uid, lab.user.gid)
    (destination / "locked").chmod(0o555)  # the test user may not write there

    files: list[tuple[str, str | None]] = []

    async def on_file(path: str, error: str | None) -> None:
        files.append((path, error))

    result = await executor.upload(target(lab, "t1"), source, str(destination), on_file=on_file)
    root = str(destination)
    assert sorted(result.uploaded) == [
        f"{root}/conf/app.ini",
        f"{root}/index.html",
        f"{root}/run.sh",
    ]
    assert [(path, "permission denied" in why.lower()) for path, why in result.failed] == [
        (f"{root}/locked/secret.txt", True)
    ]
    assert result.status is Outcome.FAILED and result.error is None
    assert len(files) == 4
    assert (destination / "conf" / "app.ini").read_text() == "[app]\n"
    assert (destination / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (destination / "index.html").stat().st_uid == lab.user.uid


async def test_single_file_upload_into_a_directory_and_to_a_path(
    lab: SshLab, executor: SshExecutor, tmp_path: Path
) -> None:
    source = tmp_path / "motd"
    source.write_text("welcome\n")
    remote = lab.user_dir("upload-file")
    into_dir = await executor.upload(target(lab, "t2"), source, str(remote))
    to_path = await executor.upload(target(lab, "t2"), source, f"{remote}/new/dir/motd.txt")
    assert into_dir.status is Outcome.SUCCEEDED and into_dir.uploaded == [f"{remote}/motd"]
    assert to_path.status is Outcome.SUCCEEDED
    assert (remote / "new" / "dir" / "motd.txt").read_text() == "welcome\n"
    missing = await executor.upload(target(lab, "t2"), tmp_path / "absent", str(remote))
    assert missing.status is Outcome.FAILED and "cannot read" in (missing.error or "")


async def test_uploads_never_create_or_follow_a_symbolic_link_on_the_target(
    lab: SshLab, executor: SshExecutor, tmp_path: Path
) -> None:
    # Issue 14: links were recreated on the target, then chmod-ed through.
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    source = tmp_path / "tree"
    source.mkdir()
    (source / "inside.txt").write_text("inside\n")
    (source / "alias").symlink_to(source / "inside.txt")  # stays inside: copied as a file
    (source / "escape").symlink_to(outside)  # leads outside: refused
    planted = source / "planted"
    planted.write_text("new\n")
    planted.chmod(0o777)
    remote = lab.user_dir("upload-links")
    victim = lab.user_dir("upload-victim") / "victim.txt"
    victim.write_text("precious\n")
    os.chown(victim, lab.user.uid, lab.user.gid)
    victim.chmod(0o600)
    (remote / "planted").symlink_to(victim)  # a link waiting on the target
    os.lchown(remote / "planted", lab.user.uid, lab.user.gid)

    result = await executor.upload(target(lab, "t3"), source, str(remote))

    assert sorted(result.uploaded) == [
        f"{remote}/alias",
        f"{remote}/inside.txt",
        f"{remote}/planted",
    ]
    assert [path for path, _ in result.failed] == [f"{remote}/escape"]
    assert "outside the uploaded directory" in result.failed[0][1]
    for name in ("alias", "planted"):
        assert not (remote / name).is_symlink(), name
    assert (remote / "alias").read_text() == "inside\n"
    assert (remote / "planted").read_text() == "new\n"
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o600
    assert not (remote / "escape").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


async def test_uploads_give_files_an_owner_and_group_looked_up_on_the_target(
    lab: SshLab, executor: SshExecutor, tmp_path: Path
) -> None:
    """Issue 19: owner and group by name (looked up on the target) or by id. The lab's login
    is not root: it may give files to itself only, and a file it may not give away fails
    with a sentence saying why; an unknown name fails every file before any is copied."""
    source = tmp_path / "owned.txt"
    source.write_text("mine\n")
    remote = lab.user_dir("upload-owner")
    group_name = grp.getgrgid(lab.user.gid).gr_name
    mine = await executor.upload(
        target(lab, "t1"), source, f"{remote}/a.txt", owner=lab.user.name, group=group_name
    )
    assert mine.status is Outcome.SUCCEEDED, mine.failed
    info = (remote / "a.txt").stat()
    assert (info.st_uid, info.st_gid) == (lab.user.uid, lab.user.gid)
    by_id = await executor.upload(target(lab, "t1"), source, f"{remote}/b.txt", group="0")
    assert by_id.status is Outcome.FAILED
    assert "the SSH login is not root" in by_id.failed[0][1]
    unknown = await executor.upload(
        target(lab, "t1"), source, f"{remote}/c.txt", owner="no-such-user-19"
    )
    assert unknown.status is Outcome.FAILED
    assert unknown.failed == [(f"{remote}/c.txt", "no user 'no-such-user-19' on the host")]
    assert not (remote / "c.txt").exists()
