"""Templates of kind ``script`` (issue 20): a seed-003 script of the script directory, run as
argv on the control plane's own host with the parameters as ``PARAM_*`` variables, never as
shell text; who may launch one; the kinds still refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from opsplane.engine.core import Engine
from tests.auth import ADMIN_HEADERS
from tests.integration.apps import admin_api

INJECTIONS = ["; touch {sentinel}", "$(touch {sentinel})", "`touch {sentinel}`"]


def _scripts(tmp_path: Path) -> tuple[Path, Path]:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    out = tmp_path / "out"
    script = scripts / "greet.sh"
    # The script writes what it received, byte for byte, where the test reads it.
    script.write_text(f'#!/bin/sh\nprintf \'%s|%s\' "$PARAM_WHO" "$PARAM_MODE" > {out}\n')
    script.chmod(0o755)
    return scripts, out


def _template(**extra: Any) -> dict[str, Any]:
    return {
        "name": "greet",
        "kind": "script",
        "command": "greet.sh",
        "parameters": [
            {"name": "who", "type": "string", "default": "world"},
            {"name": "mode", "type": "choice", "choices": ["soft", "hard"], "default": "soft"},
        ],
        "timeout": 30,
        **extra,
    }


async def _token(client: httpx.AsyncClient, user: str, role: str) -> dict[str, str]:
    groups = ["web"] if role == "operator" else None
    created = await client.post(
        "/api/v1/users", json={"name": user, "role": role, "groups": groups}, headers=ADMIN_HEADERS
    )
    assert created.status_code == 201, created.text
    token = await client.post(
        "/api/v1/tokens",
        json={"name": f"{user}-t", "role": role, "groups": groups, "user": user},
        headers=ADMIN_HEADERS,
    )
    assert token.status_code == 201, token.text
    return {"Authorization": f"Bearer {token.json()['token']}"}


async def test_a_script_template_runs_its_script_with_params_never_as_shell_text(
    tmp_path: Path,
) -> None:
    scripts, out = _scripts(tmp_path)
    async with admin_api(tmp_path, script_dirs=[scripts]) as (app, client):
        engine: Engine = app.state.engine
        created = await client.post("/api/v1/templates", json=_template(), headers=ADMIN_HEADERS)
        assert created.status_code == 201, created.text
        assert created.json()["kind"] == "script"
        for i, shape in enumerate(INJECTIONS):
            sentinel = tmp_path / f"sentinel-{i}"
            value = shape.format(sentinel=sentinel)
            launched = await client.post(
                "/api/v1/templates/greet/launch",
                json={"params": {"who": value, "mode": "hard"}},
                headers=ADMIN_HEADERS,
            )
            assert launched.status_code == 201, launched.text
            task = launched.json()
            assert task["template"] == {"name": "greet", "version": 1}
            async with asyncio.timeout(30):
                await engine.wait_task(task["id"])
            done = (await client.get(f"/api/v1/tasks/{task['id']}", headers=ADMIN_HEADERS)).json()
            assert done["status"] == "succeeded", done
            assert out.read_text() == f"{value}|hard"
            assert not sentinel.exists(), value


async def test_script_templates_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    scripts, _out = _scripts(tmp_path)
    async with admin_api(tmp_path, script_dirs=[scripts]) as (_app, client):
        on_hosts = await client.post(
            "/api/v1/templates", json=_template(targets={"groups": ["web"]}), headers=ADMIN_HEADERS
        )
        assert on_hosts.status_code == 422
        assert "leave targets out" in on_hosts.text
        missing = await client.post(
            "/api/v1/templates", json=_template(command="nope.sh"), headers=ADMIN_HEADERS
        )
        assert missing.status_code == 422 and "nope.sh" in missing.text, missing.text
        escaping = await client.post(
            "/api/v1/templates", json=_template(command="../out"), headers=ADMIN_HEADERS
        )
        assert escaping.status_code == 422, escaping.text
        upload = await client.post(
            "/api/v1/templates", json=_template(kind="upload"), headers=ADMIN_HEADERS
        )
        assert upload.status_code == 422 and "kind" in upload.text, upload.text

        assert (
            await client.post("/api/v1/templates", json=_template(), headers=ADMIN_HEADERS)
        ).status_code == 201
        override = await client.post(
            "/api/v1/templates/greet/launch",
            json={"targets": {"groups": ["web"]}},
            headers=ADMIN_HEADERS,
        )
        assert override.status_code == 422 and "takes no targets" in override.text
        # A grant names groups of hosts; a script runs on none of them: the operator role.
        viewer = await _token(client, "v", "viewer")
        grant = {"template": "greet", "groups": ["web"]}
        given = await client.post(
            "/api/v1/users/v/template-grants", json=grant, headers=ADMIN_HEADERS
        )
        assert given.status_code == 200
        refused = await client.post("/api/v1/templates/greet/launch", json={}, headers=viewer)
        assert refused.status_code == 403 and "operator role" in refused.text
        operator = await _token(client, "op", "operator")
        allowed = await client.post("/api/v1/templates/greet/launch", json={}, headers=operator)
        assert allowed.status_code == 201, allowed.text
        # An operator schedules command templates only (its grants are groups of hosts).
        schedule = {"template": "greet", "interval_seconds": 60}
        await client.post("/api/v1/users/op/template-grants", json=grant, headers=ADMIN_HEADERS)
        scheduled = await client.post("/api/v1/schedules", json=schedule, headers=operator)
        assert scheduled.status_code == 403 and "only an admin" in scheduled.text


async def test_without_a_script_directory_kind_script_is_refused(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (_app, client):
        answer = await client.post("/api/v1/templates", json=_template(), headers=ADMIN_HEADERS)
        assert answer.status_code == 422
        assert "needs a script directory" in answer.text
