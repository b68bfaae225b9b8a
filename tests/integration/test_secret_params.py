"""Secret task parameters: encrypted in the database, decrypted only into the command sent to
the host, never returned by the API and named (not shown) in the audit trail."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
from sqlalchemy import select

from opsplane.app_factory import create_app, make_engine
from opsplane.config import load_settings
from opsplane.store.tables import AuditRow, TaskRow
from opsplane.transport.memory import MemoryLink
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN

SECRET = "hunter2-do-not-store"


async def test_a_secret_reaches_the_host_and_nowhere_else(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, bootstrap_admin_token=ADMIN_TOKEN)
    link = MemoryLink()
    engine = make_engine(settings, [link])
    app = create_app(settings, engine)
    async with app.router.lifespan_context(app):
        await link.connect("db-1", ["db"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=ADMIN_HEADERS
        ) as client:
            body = {
                "command": 'pg_dump -h "$DB_HOST"',
                "targets": {"hosts": ["db-1"]},
                "env": {"DB_HOST": "10.0.0.5"},
                "secret_env": {"PGPASSWORD": SECRET},
            }
            created = await client.post("/api/v1/tasks", json=body)
            assert created.status_code == 201, created.text
            task_id = created.json()["id"]
            shown = [
                (await client.get(f"/api/v1/tasks/{task_id}")).text,
                (await client.get(f"/api/v1/tasks/{task_id}/runs?output=true")).text,
                (await client.get("/api/v1/tasks")).text,
                (await client.get("/api/v1/audit", params={"format": "jsonl"})).text,
            ]
            both = await client.post(
                "/api/v1/tasks",
                json={**body, "env": {"PGPASSWORD": "x"}},
            )
            bad_name = await client.post(
                "/api/v1/tasks", json={**body, "secret_env": {"BAD NAME": "x"}}
            )
        (command,) = link.hosts["db-1"].commands
        assert command.env == {"DB_HOST": "10.0.0.5", "PGPASSWORD": SECRET}
        async with engine.sessions() as session:
            task = await session.get(TaskRow, task_id)
            assert task is not None and task.spec is not None
            audit = [row.detail for row in (await session.execute(select(AuditRow))).scalars()]
    assert SECRET not in json.dumps(task.spec)
    assert set(task.spec["secret_env"]) == {"PGPASSWORD"}
    assert all(SECRET not in text for text in shown)
    assert any(d.get("secret_env") == ["PGPASSWORD"] for d in audit)
    assert SECRET not in json.dumps(audit)
    assert both.status_code == 422 and "PGPASSWORD" in both.text
    assert bad_name.status_code == 422 and "environment variable name" in bad_name.text
    key = settings.secret_key_path
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
