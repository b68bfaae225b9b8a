"""``opsplane templates``, ``opsplane schedules`` and ``opsplane users grant-template`` against
a control plane served on a port in this process (the CLI runs in a thread: it is sync)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from opsplane.app_factory import create_app, make_engine
from opsplane.config import load_settings
from opsplane.transport.memory import MemoryLink
from tests.auth import ADMIN_TOKEN
from tests.e2e.fleet import free_port, serving


async def test_the_cli_creates_grants_launches_and_schedules_a_template(tmp_path: Path) -> None:
    from opsplane.cli.main import app as cli

    settings = load_settings(data_dir=tmp_path, bootstrap_admin_token=ADMIN_TOKEN)
    link = MemoryLink()
    app = create_app(settings, make_engine(settings, [link]))
    port = free_port()
    runner = CliRunner()
    base = ["--url", f"http://127.0.0.1:{port}", "--token", ADMIN_TOKEN]

    async def opsplane(*args: str, code: int = 0) -> str:
        # Wide enough that no table cell (an id) is cut, whatever COLUMNS says.
        result = await asyncio.to_thread(runner.invoke, cli, [*base, *args], env={"COLUMNS": "300"})
        assert result.exit_code == code, (args, result.output)
        return result.output

    async with serving(app, port):
        await link.connect("web-1", ["web"])
        await opsplane(
            "templates", "create", "restart-web", "--command", 'echo "$PARAM_UNIT"',
            "-p", "unit=nginx", "-p", "mode:choice(soft|hard)=soft", "--group", "web",
        )  # fmt: skip
        assert "restart-web" in await opsplane("templates", "list")
        definition = tmp_path / "t.yaml"
        definition.write_text(
            'command: echo "$PARAM_N"\nparameters:\n  - {name: n, type: int, default: 3}\n'
            "targets: {groups: [web]}\n"
        )
        assert "version 1" in await opsplane(
            "templates", "create", "count", "--file", str(definition)
        )
        assert "version 2" in await opsplane(
            "templates", "create", "count", "--file", str(definition), "--update"
        )
        assert json.loads(await opsplane("templates", "show", "count"))["parameters"] == [
            {"name": "n", "type": "int", "default": 3}
        ]
        shown = json.loads(await opsplane("templates", "show", "restart-web"))
        assert shown["parameters"][1] == {
            "name": "mode", "type": "choice", "default": "soft", "choices": ["soft", "hard"],
        }  # fmt: skip
        await opsplane("users", "add", "ann", "--role", "viewer", "--no-password")
        granted = await opsplane("users", "grant-template", "ann", "restart-web", "--group", "web")
        assert "web" in granted
        task_id = (
            await opsplane("templates", "launch", "restart-web", "-p", "unit=; touch x")
        ).strip()
        (command,) = link.hosts["web-1"].commands
        assert command.task_id == task_id and command.env["PARAM_UNIT"] == "; touch x"
        refused = await opsplane("templates", "launch", "restart-web", "-p", "mode=x", code=2)
        assert "mode" in refused
        created = await opsplane(
            "schedules", "create", "restart-web", "--cron", "0 3 * * *", "--tz", "Europe/Berlin"
        )
        schedule_id = created.split()[0]
        assert "next:" in created
        assert schedule_id in await opsplane("schedules", "list")
        assert "paused" in await opsplane("schedules", "pause", schedule_id)
        assert "resumed" in await opsplane("schedules", "resume", schedule_id)
        history = json.loads(await opsplane("schedules", "history", schedule_id, "--json"))
        assert history["items"] == []
        await opsplane("schedules", "delete", schedule_id)
        assert "none" in await opsplane("users", "revoke-template", "ann", "restart-web")
