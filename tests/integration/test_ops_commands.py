"""`opsplane systemd-unit` and `opsplane db backup` (issue 18)."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opsplane.app_factory import make_engine
from opsplane.cli.main import app
from opsplane.config import load_settings
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.transport.memory import MemoryLink

# The two keys of systemd 254+ that older systemd (Debian 12: 252) reports and ignores.
NEWER_KEYS = ("RestartSteps", "RestartMaxDelaySec")


@pytest.mark.parametrize("role", ["server", "agent", "worker"])
def test_each_unit_is_valid_and_its_command_runs(role: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["systemd-unit", role, "--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output
    unit = tmp_path / f"opsplane-{role}.service"
    unit.write_text(result.stdout)
    assert "Restart=on-failure" in result.stdout and "KillMode=mixed" in result.stdout
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        verdict = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        problems = [
            line
            for line in verdict.stderr.splitlines()
            if line.strip()
            and not any(f"Unknown key '{key}'" in line for key in NEWER_KEYS)
            # verify also checks that User= exists on this machine
            and "opsplane" not in line.split("User=")[-1]
        ]
        assert not [p for p in problems if str(unit) in p], problems
    (exec_start,) = [line for line in result.stdout.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    ran = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr


def test_a_backup_of_a_live_sqlite_database_is_complete_and_private(tmp_path: Path) -> None:
    async def with_a_task() -> str:
        link = MemoryLink()
        engine = make_engine(load_settings(data_dir=tmp_path), [link])
        await engine.start()
        try:
            await link.connect("web-1", ["web"])
            request = TaskRequest(
                command="true", targets=Targets(hosts=("web-1",)), created_by="tester"
            )
            task = await engine.tasks.create_task(request)
            return task.id
        finally:
            await engine.stop()

    task_id = asyncio.run(with_a_task())
    # A writer holds an open transaction while the backup runs: the copy waits for nothing.
    writer = sqlite3.connect(tmp_path / "opsplane.db")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE tasks SET created_by = 'mid-backup'")
    try:
        target = tmp_path / "copy.db"
        result = CliRunner().invoke(app, ["db", "backup", str(target), "--data-dir", str(tmp_path)])
        assert result.exit_code == 0, result.output
    finally:
        writer.rollback()
        writer.close()
    assert target.stat().st_mode & 0o077 == 0
    copy = sqlite3.connect(target)
    try:
        assert copy.execute("SELECT id, created_by FROM tasks").fetchall() == [(task_id, "tester")]
    finally:
        copy.close()
    again = CliRunner().invoke(app, ["db", "backup", str(target), "--data-dir", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output


def test_a_server_database_is_pointed_at_its_own_tools(tmp_path: Path) -> None:
    url = "postgresql+asyncpg://ops:pw@db:5432/opsplane"
    args = ["db", "backup", str(tmp_path / "x"), "--database-url", url]
    result = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "pg_dump" in result.output and "pw@" not in result.output
