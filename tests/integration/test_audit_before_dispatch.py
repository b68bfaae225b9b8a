"""The compat façades' task records are durable before their work is dispatched, as
``/api/v1/tasks``'s are; refused input (422) is recorded as refused, not as a failure."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from opsplane.engine.core import Engine
from opsplane.store.tables import AuditRow
from opsplane.transport.base import AgentHello
from tests.auth import ADMIN_HEADERS
from tests.e2e.fleet import free_port
from tests.integration.apps import admin_api


def _count_records_at_dispatch(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many ``task.create`` records were durable each time the dispatcher sent work."""
    seen: list[int] = []
    send = engine.dispatcher.send

    async def checking_send(plan: Any) -> None:
        async with engine.sessions() as session:
            rows = await session.execute(select(AuditRow).where(AuditRow.action == "task.create"))
            seen.append(len(rows.all()))
        await send(plan)

    monkeypatch.setattr(engine.dispatcher, "send", checking_send)
    return seen


async def _records(engine: Engine) -> list[AuditRow]:
    async with engine.sessions() as session:
        return list((await session.execute(select(AuditRow).order_by(AuditRow.id))).scalars())


async def test_an_ssh_api_tasks_record_is_durable_before_its_first_command_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with admin_api(tmp_path, ssh_trust_on_first_use=True) as (app, client):
        engine: Engine = app.state.engine
        seen = _count_records_at_dispatch(engine, monkeypatch)
        body = {
            # Nothing listens there: the run fails later; what matters is the order.
            "targets": [f"ops@127.0.0.1:{free_port()}"],
            "commands": ["echo --password=hunter2"],
        }
        answer = await client.post("/api/ssh/task", json=body, headers=ADMIN_HEADERS)
        assert answer.status_code == 201, answer.text
        task_id = answer.json()["task_id"]
        # Let the run end (nothing listens: the connection is refused) before the engine stops.
        async with asyncio.timeout(30):
            await engine.wait_task(task_id)
        assert seen and seen[0] == 1
        every = await _records(engine)
    records = [r for r in every if r.action == "task.create"]
    assert len(records) == 1
    (record,) = records
    assert record.target == task_id and record.outcome == "ok"
    assert record.detail["api"] == "seed000"
    assert len(record.detail["commands"]) == 1
    assert "hunter2" not in str(record.detail)
    assert record.targets is not None and record.targets["count"] == 1
    # No second, generic record after the work was under way.
    assert [r.action for r in every if r.action == "http.post"] == []


async def test_a_remoterun_tasks_record_is_durable_before_the_script_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    script = scripts / "hello.sh"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    async with admin_api(tmp_path, script_dirs=[scripts]) as (app, client):
        engine: Engine = app.state.engine
        seen = _count_records_at_dispatch(engine, monkeypatch)
        body = {"script_path": "hello.sh", "params": {"token": "s3cr3t-value"}}
        answer = await client.post("/tasks", json=body, headers=ADMIN_HEADERS)
        assert answer.status_code == 201, answer.text
        task_id = answer.json()["id"]
        await engine.wait_task(task_id)
        assert seen and seen[0] == 1
        records = [r for r in await _records(engine) if r.action == "task.create"]
    (record,) = records
    assert record.target == task_id and record.outcome == "ok"
    assert record.detail["api"] == "seed003" and record.detail["params"] == ["token"]
    assert "s3cr3t-value" not in str(record.detail)


async def test_refused_input_is_recorded_as_rejected_not_as_an_internal_error(
    tmp_path: Path,
) -> None:
    async with admin_api(tmp_path) as (app, client):
        engine: Engine = app.state.engine
        # A route without a record of its own: the generic record says what happened.
        answer = await client.post(
            "/api/v1/hosts", json={"name": "x", "ssh": 5, "secret": "p" * 10_000},
            headers=ADMIN_HEADERS,
        )  # fmt: skip
        assert answer.status_code == 422
        records = [r for r in await _records(engine) if r.action == "http.post"]
    (record,) = records
    assert record.outcome == "rejected"
    error = record.detail["error"]
    assert error.startswith("invalid input:") and "internal error" not in error
    assert "ppppp" not in error and len(error) < 2000


async def test_removing_a_host_is_admin_only_audited_and_refused_for_a_connected_agent(
    tmp_path: Path,
) -> None:
    async with admin_api(tmp_path) as (app, client):
        engine: Engine = app.state.engine
        await engine.host_connected(AgentHello(hostname="old-1", link="grpc", groups=("web",)))
        refused = await client.delete("/api/v1/hosts/old-1", headers=ADMIN_HEADERS)
        assert refused.status_code == 409 and "stop (or revoke)" in refused.text
        await engine.host_disconnected("old-1", "grpc")
        removed = await client.delete("/api/v1/hosts/old-1", headers=ADMIN_HEADERS)
        assert removed.status_code == 204, removed.text
        assert (await client.get("/api/v1/hosts/old-1", headers=ADMIN_HEADERS)).status_code == 404
        again = await client.delete("/api/v1/hosts/old-1", headers=ADMIN_HEADERS)
        assert again.status_code == 404
        records = [r for r in await _records(engine) if r.action == "host.remove"]
    assert [(r.target, r.outcome) for r in records] == [
        ("old-1", "rejected"),
        ("old-1", "ok"),
        ("old-1", "rejected"),
    ]
    assert records[1].detail["link"] == "grpc"
