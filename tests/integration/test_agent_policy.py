"""The agent's own policy with real commands: refused ones never start, the rest run as run_as.

The agent runs in-process against the fake control plane of ``test_agent_protocol``, and once
as a real ``opsplane agent`` process, to show that the flags reach it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from opsplane.agent import AgentConfig
from opsplane.execution import Identity, Outcome, ProcessRun
from tests.conftest import unavailable
from tests.integration.test_agent_protocol import (
    FakeControlPlane,
    command,
    make_config,
    new_run_id,
    running,
    serving,
)

RM_ROOT = r"rm\s+-rf\s+/"
# A real agent process takes a moment to import and dial in.
PROCESS_WAIT = 30.0


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        unavailable("no user 'nobody' on this host")


needs_root = pytest.mark.service("root")


def _config(tmp_path: Path, port: int, **fields: object) -> AgentConfig:
    return dataclasses.replace(make_config(tmp_path, port), **fields)  # type: ignore[arg-type]


async def test_a_denied_command_fails_with_the_rule_and_never_runs(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    marker = tmp_path / "ran"
    async with serving(cp) as port, running(_config(tmp_path, port, deny=(RM_ROOT,))):
        await cp.wait_for_hello()
        run_id = new_run_id()
        # Harmless even if it ran: the directory does not exist. The marker tells.
        cp.send(command(run_id, f"touch {marker} && rm -rf /tmp/opsplane-no-such-dir"))

        result = await cp.wait_for("command_result", run_id)
        assert result.status == "failed"
        assert result.error == r"refused by the agent's deny rule 'rm\s+-rf\s+/'"
        assert not result.HasField("exit_code")
        assert (result.stdout, result.stderr) == ("", "")
        assert (await cp.wait_for("ack", run_id)).kind == "command"
        assert cp.of_kind("started", run_id) == []
        assert not marker.exists()

        # The agent goes on running what its policy lets through.
        other = new_run_id()
        cp.send(command(other, "echo fine"))
        result = await cp.wait_for("command_result", other)
        assert (result.status, result.stdout) == ("succeeded", "fine\n")


async def test_an_allow_list_runs_matching_commands_and_refuses_others(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    marker = tmp_path / "ran"
    allow = ("echo [a-z]+", r"touch \S+")
    async with serving(cp) as port, running(_config(tmp_path, port, allow=allow)):
        await cp.wait_for_hello()
        allowed, chained, touched = new_run_id(), new_run_id(), new_run_id()
        cp.send(command(allowed, "echo hello"))
        cp.send(command(chained, f"echo hello; touch {marker}"))

        result = await cp.wait_for("command_result", allowed)
        assert (result.status, result.stdout) == ("succeeded", "hello\n")
        refused = await cp.wait_for("command_result", chained)
        assert refused.status == "failed"
        assert refused.error == (
            "refused by the agent's allow list: the command matches none of "
            r"'echo [a-z]+', 'touch \S+'"
        )
        assert cp.of_kind("started", chained) == []
        assert not marker.exists()

        cp.send(command(touched, f"touch {marker}"))
        assert (await cp.wait_for("command_result", touched)).status == "succeeded"
        assert marker.exists()


@needs_root
async def test_run_as_nobody_runs_commands_as_nobody(tmp_path: Path) -> None:
    nobody = _nobody()
    cp = FakeControlPlane()
    async with serving(cp) as port, running(_config(tmp_path, port, run_as="nobody")):
        await cp.wait_for_hello()
        run_id = new_run_id()
        cp.send(command(run_id, 'id -u; id -un; id -G; echo "$HOME $USER $LOGNAME"; pwd'))

        result = await cp.wait_for("command_result", run_id)
        assert result.status == "succeeded", result.error or result.stderr
        uid, name, groups, env, cwd = result.stdout.splitlines()
        assert uid == str(nobody.pw_uid) != "0"
        assert name == "nobody"
        assert "0" not in groups.split()  # root's groups are not kept
        assert env == f"{nobody.pw_dir} nobody nobody"
        assert cwd == (nobody.pw_dir if Path(nobody.pw_dir).is_dir() else "/")  # noqa: ASYNC240


@needs_root
async def test_many_commands_switch_user_reliably_beside_grpc(tmp_path: Path) -> None:
    # Switching user inside a forked child of a gRPC process crashed about one child in a
    # hundred (gRPC's atfork handlers): the switch happens in an exec'd helper instead.
    nobody = _nobody()
    cp = FakeControlPlane()
    async with serving(cp) as port, running(_config(tmp_path, port, run_as="nobody")):
        await cp.wait_for_hello()
        run_ids = [new_run_id() for _ in range(60)]
        for run_id in run_ids:
            cp.send(command(run_id, "id -u"))
        for run_id in run_ids:
            result = await cp.wait_for("command_result", run_id)
            assert (result.status, result.stdout) == ("succeeded", f"{nobody.pw_uid}\n"), (
                result.error,
                result.stderr,
            )


@needs_root
async def test_run_as_restores_the_signals_python_ignores() -> None:
    # Otherwise "yes" would outlive "head" and complain of a broken pipe.
    run = ProcessRun("yes | head -n 1", timeout=10, run_as=Identity.lookup(_nobody().pw_name))
    result = await run.run()
    assert (result.outcome, result.stdout, result.stderr) == (Outcome.SUCCEEDED, "y\n", "")


@needs_root
async def test_run_as_keeps_timeouts_reaching_the_whole_process_group(tmp_path: Path) -> None:
    _nobody()
    cp = FakeControlPlane()
    async with serving(cp) as port, running(_config(tmp_path, port, run_as="nobody")):
        await cp.wait_for_hello()
        run_id = new_run_id()
        cp.send(command(run_id, "sleep 60 & sleep 60; wait", timeout=1))

        result = await cp.wait_for("command_result", run_id)
        assert result.status == "timed_out", result.error
        started = await cp.wait_for("started", run_id)
        left = [
            p.info
            for p in psutil.process_iter(["pid", "status", "cmdline"])
            if _group_of(p.pid) == started.pid and p.info["status"] != psutil.STATUS_ZOMBIE
        ]
        assert left == []  # nothing of the group outlived the run


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _agent_argv(port: int, state_dir: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "opsplane", "agent",
        "--server", f"127.0.0.1:{port}",
        "--name", "policy-host",
        "--state-dir", str(state_dir),
        *flags,
    ]  # fmt: skip


@needs_root
async def test_an_agent_process_enforces_its_flags(tmp_path: Path) -> None:
    nobody = _nobody()
    cp = FakeControlPlane()
    marker = tmp_path / "ran"
    log = tmp_path / "agent.log"
    async with serving(cp) as port:
        argv = _agent_argv(port, tmp_path / "state", "--deny", "touch", "--run-as", "nobody")
        with log.open("wb") as out:
            agent = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)
        try:
            await asyncio.wait_for(cp.wait_for_hello(), PROCESS_WAIT)
            denied, allowed = new_run_id(), new_run_id()
            cp.send(command(denied, f"touch {marker}"))
            cp.send(command(allowed, "id -u"))
            result = await cp.wait_for("command_result", denied)
            assert result.error == "refused by the agent's deny rule 'touch'"
            result = await cp.wait_for("command_result", allowed)
            assert (result.status, result.stdout) == ("succeeded", f"{nobody.pw_uid}\n")
            assert not marker.exists()
        finally:
            if agent.returncode is None:
                agent.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(agent.wait(), PROCESS_WAIT) == 0, log.read_text()
    text = log.read_text()
    assert "refusing commands by 1 deny and 0 allow patterns" in text
    assert "running commands as nobody" in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--deny", "rm ("], "error: deny pattern 'rm (' is not a valid regular expression"),
        (["--allow", "*"], "error: allow pattern '*' is not a valid regular expression"),
        (["--run-as", "no-such-user-x9"], "error: run_as: no user 'no-such-user-x9'"),
        (
            ["--allow-run-as", "no-such-user-x9"],
            "error: allowed_run_as: no user 'no-such-user-x9'",
        ),
    ],
)
def test_an_agent_with_a_bad_policy_refuses_to_start(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    # Port 9 (discard): never dialed, because the agent stops before connecting.
    argv = _agent_argv(9, tmp_path / "state", *flags)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=PROCESS_WAIT)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "state").exists()
