"""What commands inherit (issue 14, hole 4): a real ``opsplane agent`` process started with
``OPSPLANE_TOKEN`` in its environment, as the README shows, runs ``env`` for the control
plane; the token and other variables of the agent's own environment stay out of the command's,
and only what the allow-list and ``--env-passthrough`` name passes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from tests.integration.test_agent_protocol import FakeControlPlane, command, new_run_id, serving

# A real agent process takes a moment to import and dial in.
PROCESS_WAIT = 30.0
TOKEN = "ops_" + "t0ken" * 8


async def test_an_agent_started_with_opsplane_token_never_passes_it_to_commands(
    tmp_path: Path,
) -> None:
    cp = FakeControlPlane()
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPLANE_")}
    env.update(
        OPSPLANE_TOKEN=TOKEN,
        OPSPLANE_AGENT_ENROLL_TOKEN_NOT_USED="enr_secret",
        CORP_PROXY="http://proxy.corp:3128",
        DB_PASSWORD="hunter2-not-allowed",
        LC_TIME="C",
    )
    async with serving(cp) as port:
        argv = [
            sys.executable, "-m", "opsplane", "agent",
            "--server", f"127.0.0.1:{port}", "--name", "env-host",
            "--state-dir", str(tmp_path / "state"), "--env-passthrough", "CORP_*",
        ]  # fmt: skip
        with log.open("wb") as out:
            agent = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out, env=env)
        try:
            await asyncio.wait_for(cp.wait_for_hello(), PROCESS_WAIT)
            run_id = new_run_id()
            cp.send(command(run_id, "env", env={"TASK_VAR": "from-the-task"}))
            result = await cp.wait_for("command_result", run_id)
        finally:
            if agent.returncode is None:
                agent.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(agent.wait(), PROCESS_WAIT) == 0, log.read_text()
    assert result.status == "succeeded", (result.error, result.stderr)
    lines = set(result.stdout.splitlines())
    assert TOKEN not in result.stdout
    assert "enr_secret" not in result.stdout
    assert "hunter2-not-allowed" not in result.stdout
    assert not any(line.startswith("OPSPLANE_") for line in lines)
    assert {
        "TASK_VAR=from-the-task",
        "CORP_PROXY=http://proxy.corp:3128",
        "LC_TIME=C",
        f"PATH={env['PATH']}",
    } <= lines
