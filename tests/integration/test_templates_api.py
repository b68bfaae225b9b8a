"""Job templates over the API (issue 20): the pinned routes, versions, typed parameters that
reach the command only as environment variables, and who may launch what."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from opsplane.app_factory import create_app, make_engine
from opsplane.config import load_settings
from opsplane.engine.core import Engine
from opsplane.execution.process import run_command
from opsplane.store.tables import TaskRow
from opsplane.transport.memory import MemoryLink
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN

RESTART_WEB = {
    "name": "restart-web",
    "description": "restart a unit",
    "command": 'echo "unit=$PARAM_UNIT mode=$PARAM_MODE"',
    "parameters": [
        {"name": "unit", "type": "string", "default": "nginx"},
        {"name": "mode", "type": "choice", "choices": ["soft", "hard"]},
    ],
    "targets": {"groups": ["web"]},
    "timeout": 60,
}


@asynccontextmanager
async def api(tmp_path: Path) -> AsyncIterator[tuple[FastAPI, MemoryLink, httpx.AsyncClient]]:
    settings = load_settings(data_dir=tmp_path, bootstrap_admin_token=ADMIN_TOKEN)
    link = MemoryLink()
    app = create_app(settings, make_engine(settings, [link]))
    async with app.router.lifespan_context(app):
        await link.connect("web-1", ["web"])
        await link.connect("db-1", ["db"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=ADMIN_HEADERS
        ) as client:
            yield app, link, client


async def test_a_template_is_created_versioned_launched_and_deleted(tmp_path: Path) -> None:
    async with api(tmp_path) as (app, link, client):
        created = await client.post("/api/v1/templates", json=RESTART_WEB)
        assert created.status_code == 201, created.text
        assert created.json()["version"] == 1
        again = await client.post("/api/v1/templates", json=RESTART_WEB)
        assert again.status_code == 409
        edited = {**RESTART_WEB, "command": 'echo "v2 $PARAM_UNIT $PARAM_MODE"'}
        del edited["name"]
        put = await client.put("/api/v1/templates/restart-web", json=edited)
        assert put.status_code == 200, put.text
        assert put.json()["version"] == 2
        listed = (await client.get("/api/v1/templates")).json()["items"]
        assert [(t["name"], t["version"]) for t in listed] == [("restart-web", 2)]
        old = (await client.get("/api/v1/templates/restart-web", params={"version": 1})).json()
        assert old["command"] == RESTART_WEB["command"]

        launched = await client.post(
            "/api/v1/templates/restart-web/launch", json={"params": {"mode": "hard"}}
        )
        assert launched.status_code == 201, launched.text
        task = launched.json()
        assert task["id"] and task["template"] == {"name": "restart-web", "version": 2}
        (command,) = link.hosts["web-1"].commands
        assert command.command == 'echo "v2 $PARAM_UNIT $PARAM_MODE"'
        assert command.env["PARAM_UNIT"] == "nginx" and command.env["PARAM_MODE"] == "hard"
        assert not link.hosts["db-1"].commands
        engine: Engine = app.state.engine
        async with engine.sessions() as session:
            row = await session.get(TaskRow, task["id"])
            assert row is not None and (row.template, row.template_version) == ("restart-web", 2)

        key = {"Idempotency-Key": "launch-once"}
        first = await client.post(
            "/api/v1/templates/restart-web/launch", json={"params": {"mode": "soft"}}, headers=key
        )
        second = await client.post(
            "/api/v1/templates/restart-web/launch", json={"params": {"mode": "soft"}}, headers=key
        )
        assert first.status_code == second.status_code == 201
        assert first.json()["id"] == second.json()["id"]
        assert len(link.hosts["web-1"].commands) == 2

        override = await client.post(
            "/api/v1/templates/restart-web/launch",
            json={"params": {"mode": "soft"}, "targets": {"hosts": ["db-1"]}},
        )
        assert override.status_code == 201, override.text
        assert len(link.hosts["db-1"].commands) == 1

        assert (await client.delete("/api/v1/templates/restart-web")).status_code == 204
        assert (await client.get("/api/v1/templates/restart-web")).status_code == 404
        gone = await client.post("/api/v1/templates/restart-web/launch", json={})
        assert gone.status_code == 404
        assert "restart-web" in gone.json()["detail"]


async def test_bad_parameters_are_refused_naming_the_parameter(tmp_path: Path) -> None:
    async with api(tmp_path) as (_app, link, client):
        body = {
            **RESTART_WEB,
            "parameters": [
                *RESTART_WEB["parameters"],
                {"name": "count", "type": "int", "default": 1},
            ],
        }
        assert (await client.post("/api/v1/templates", json=body)).status_code == 201
        cases: list[tuple[dict[str, Any], str]] = [
            ({"mode": "brutal"}, "mode"),
            ({}, "mode"),
            ({"mode": "soft", "count": "three"}, "count"),
            ({"mode": "soft", "count": True}, "count"),
            ({"mode": "soft", "colour": "red"}, "colour"),
            ({"mode": "soft", "unit": {"a": 1}}, "unit"),
        ]
        for params, named in cases:
            answer = await client.post(
                "/api/v1/templates/restart-web/launch", json={"params": params}
            )
            assert answer.status_code == 422, (params, answer.text)
            assert named in answer.json()["detail"], (params, answer.text)
        assert not link.hosts["web-1"].commands
        bad_defs = [
            {**RESTART_WEB, "name": "x y"},
            {**RESTART_WEB, "name": "c1", "parameters": [{"name": "a-b"}]},
            {**RESTART_WEB, "name": "c2", "parameters": [{"name": "m", "type": "choice"}]},
            {**RESTART_WEB, "name": "c3", "parameters": [{"name": "a"}, {"name": "A"}]},
            {**RESTART_WEB, "name": "c4", "parameters": [{"name": "s", "type": "secret",
                                                          "default": "x"}]},
            {**RESTART_WEB, "name": "c5", "parameters": [{"name": "n", "type": "int",
                                                          "default": "ten"}]},
        ]  # fmt: skip
        for definition in bad_defs:
            answer = await client.post("/api/v1/templates", json=definition)
            assert answer.status_code == 422, (definition, answer.text)


async def test_a_parameter_value_is_never_shell_text(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    payloads = [
        f"; touch {sentinel}",
        f"$(touch {sentinel})",
        f"`touch {sentinel}`",
        f'"; touch {sentinel}; echo "',
        f"x' ; touch {sentinel} ; '",
        f"a\ntouch {sentinel}",
    ]
    async with api(tmp_path) as (_app, link, client):
        assert (await client.post("/api/v1/templates", json=RESTART_WEB)).status_code == 201
        for payload in payloads:
            answer = await client.post(
                "/api/v1/templates/restart-web/launch",
                json={"params": {"unit": payload, "mode": "soft"}},
            )
            assert answer.status_code == 201, answer.text
            assert answer.json()["command"] == RESTART_WEB["command"]
        commands = link.hosts["web-1"].commands
        assert len(commands) == len(payloads)
        for envelope, payload in zip(commands, payloads, strict=True):
            # What the host received, run as an agent runs it: a shell with that environment.
            assert envelope.command == RESTART_WEB["command"]
            result = await run_command(envelope.command, env=dict(envelope.env), timeout=10)
            assert result.exit_code == 0, result
            assert result.stdout == f"unit={payload} mode=soft\n"
    assert not sentinel.exists()


async def test_a_secret_parameter_is_sealed_and_never_shown(tmp_path: Path) -> None:
    secret = "s3cr3t-value-never-shown"
    body = {
        **RESTART_WEB,
        "parameters": [{"name": "password", "type": "secret", "required": True}],
    }
    async with api(tmp_path) as (app, link, client):
        assert (await client.post("/api/v1/templates", json=body)).status_code == 201
        missing = await client.post("/api/v1/templates/restart-web/launch", json={})
        assert missing.status_code == 422 and "password" in missing.json()["detail"]
        answer = await client.post(
            "/api/v1/templates/restart-web/launch", json={"params": {"password": secret}}
        )
        assert answer.status_code == 201, answer.text
        (command,) = link.hosts["web-1"].commands
        assert command.env["PARAM_PASSWORD"] == secret
        assert "PARAMS_JSON" not in command.env  # no plain parameter at all
        engine: Engine = app.state.engine
        async with engine.sessions() as session:
            row = await session.get(TaskRow, answer.json()["id"])
            assert row is not None
            assert secret not in repr(row.spec)
        shown = [
            answer.text,
            (await client.get(f"/api/v1/tasks/{answer.json()['id']}")).text,
            (await client.get("/api/v1/audit", params={"format": "jsonl"})).text,
        ]
        assert not any(secret in text for text in shown)


async def test_templates_need_an_admin_to_change_them(tmp_path: Path) -> None:
    async with api(tmp_path) as (_app, _link, client):
        token = await _token(client, "op", "operator", groups=["web"])
        headers = {"Authorization": f"Bearer {token}"}
        assert (await client.post("/api/v1/templates", json=RESTART_WEB)).status_code == 201
        for method, path, body in [
            ("POST", "/api/v1/templates", {**RESTART_WEB, "name": "other"}),
            ("PUT", "/api/v1/templates/restart-web", RESTART_WEB),
            ("DELETE", "/api/v1/templates/restart-web", None),
        ]:
            answer = await client.request(method, path, json=body, headers=headers)
            assert answer.status_code == 403, (method, path, answer.text)
        assert (await client.get("/api/v1/templates", headers=headers)).status_code == 200


async def _token(
    client: httpx.AsyncClient, user: str, role: str, groups: list[str] | None = None
) -> str:
    created = await client.post(
        "/api/v1/users", json={"name": user, "role": role, "groups": groups}
    )
    assert created.status_code == 201, created.text
    token = await client.post(
        "/api/v1/tokens", json={"name": f"{user}-t", "role": role, "groups": groups, "user": user}
    )
    assert token.status_code == 201, token.text
    return str(token.json()["token"])
