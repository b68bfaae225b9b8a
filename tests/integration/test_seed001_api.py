"""Seed 001's task API on opsplane's own routes (issue 16 item 9): the task JSON carries the
seed's names, and ``parameters`` on create reach the command as environment variables."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from opsplane.app_factory import create_app, make_engine
from opsplane.config import load_settings
from opsplane.engine.core import Engine
from opsplane.store.tables import AuditRow
from opsplane.transport.base import RunFinished
from opsplane.transport.memory import MemoryLink
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.integration.reports import report_result


class Api:
    def __init__(self, client: httpx.AsyncClient, engine: Engine, link: MemoryLink) -> None:
        self.client, self.engine, self.link = client, engine, link


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    settings = load_settings(data_dir=tmp_path, bootstrap_admin_token=ADMIN_TOKEN)
    link = MemoryLink()
    engine = make_engine(settings, [link])
    app = create_app(settings, engine)
    async with app.router.lifespan_context(app):
        for host in ("web-1", "web-2", "web-3"):
            await link.connect(host, ["web"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=ADMIN_HEADERS
        ) as client:
            yield Api(client, engine, link)


def _result(host: str, run_id: str, status: str, exit_code: int) -> RunFinished:
    now = datetime.now(UTC)
    return RunFinished(
        hostname=host, run_id=run_id, status=status, exit_code=exit_code, stdout="", stderr="",
        truncated=False, error=None, started_at=now, finished_at=now, duration_ms=1,
    )  # fmt: skip


async def test_the_task_json_carries_the_seeds_names(api: Api) -> None:
    created = await api.client.post(
        "/api/v1/tasks", json={"command": "uptime", "targets": {"groups": ["web"]}}
    )
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["task_id"] == task["id"]
    assert (task["total_hosts"], task["completed_hosts"], task["failed_hosts"]) == (3, 0, 0)
    assert task["updated_at"] is not None
    runs = {run.host: run.id for run in await api.engine.tasks.list_runs(task["id"])}
    await report_result(api.engine, _result("web-1", runs["web-1"], "succeeded", 0))
    await report_result(api.engine, _result("web-2", runs["web-2"], "failed", 2))
    await report_result(api.engine, _result("web-3", runs["web-3"], "timed_out", -1))
    shown = (await api.client.get(f"/api/v1/tasks/{task['id']}")).json()
    listed = (await api.client.get("/api/v1/tasks")).json()["items"]
    for view in (shown, next(item for item in listed if item["id"] == task["id"])):
        assert view["task_id"] == task["id"]
        assert view["status"] == "failed"
        # "completed" is the seed's done-and-succeeded; a timeout is a failure.
        assert (view["total_hosts"], view["completed_hosts"], view["failed_hosts"]) == (3, 1, 2)
        assert view["updated_at"] == view["finished_at"] is not None
        assert view["progress"] == {"finished": 3, "total": 3, "percent": 100.0}
        assert (view["counts"]["succeeded"], view["counts"]["failed"]) == (1, 1)


async def test_parameters_reach_the_command_as_environment_variables(api: Api) -> None:
    body = {
        "name": "deploy",
        "command": 'echo "$PARAM_VERSION"',
        "targets": {"hosts": ["web-1"]},
        "timeout": 30,
        "parameters": {"version": "1.2.3; rm -rf /", "replicas": 3},
        "env": {"STAGE": "prod"},
    }
    created = await api.client.post("/api/v1/tasks", json=body)
    assert created.status_code == 201, created.text
    # The seed's Go model holds parameters as a string: a string holding an object is read.
    as_string = await api.client.post(
        "/api/v1/tasks", json={**body, "parameters": json.dumps({"version": "2.0"})}
    )
    assert as_string.status_code == 201, as_string.text
    first, second = api.link.hosts["web-1"].commands
    # Never spliced into the command text: the shell reads them from its environment.
    assert first.command == 'echo "$PARAM_VERSION"'
    assert first.env == {
        "STAGE": "prod",
        "PARAM_VERSION": "1.2.3; rm -rf /",
        "PARAM_REPLICAS": "3",
        "PARAMS_JSON": '{"version":"1.2.3; rm -rf /","replicas":3}',
    }
    assert second.env["PARAM_VERSION"] == "2.0"
    async with api.engine.sessions() as session:
        audit = [
            row.detail
            for row in (await session.execute(select(AuditRow))).scalars()
            if row.action == "task.create"
        ]
    # Audited like env: the names, not the values.
    assert audit[0]["parameters"] == ["replicas", "version"]
    assert "1.2.3" not in json.dumps(audit)


@pytest.mark.parametrize(
    ("parameters", "says"),
    [
        ({"bad name": "x"}, "bad name"),
        ({"1st": "x"}, "1st"),
        ({"x": "a\u0000b"}, "NUL"),
        ({"v": "x", "V": "y"}, "PARAM_V"),
        ({"big": "x" * (128 * 1024)}, "bytes"),
        ("[1, 2]", "JSON object"),
        ("not json", "JSON object"),
        (["x"], "parameters"),
    ],
)
async def test_bad_parameters_are_refused(api: Api, parameters: object, says: str) -> None:
    body = {"command": "true", "targets": {"hosts": ["web-1"]}, "parameters": parameters}
    answer = await api.client.post("/api/v1/tasks", json=body)
    assert answer.status_code == 422, answer.text
    assert says in answer.text
    assert not api.link.hosts["web-1"].commands


async def test_a_parameter_and_an_env_variable_of_the_same_name_are_refused(api: Api) -> None:
    body = {
        "command": "true",
        "targets": {"hosts": ["web-1"]},
        "parameters": {"x": "1"},
        "env": {"PARAM_X": "2"},
    }
    answer = await api.client.post("/api/v1/tasks", json=body)
    assert answer.status_code == 422 and "PARAM_X" in answer.text
