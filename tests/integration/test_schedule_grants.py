"""Schedules made by operators (issue 20): who may create, change and delete a schedule, and
the launch check made again at every fire, so that a creator who lost the grant launches
nothing (the fire is recorded as ``error`` with the reason)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from opsplane.engine.core import Engine
from tests.integration.test_schedules import _finish
from tests.integration.test_templates_api import RESTART_WEB, _token, api

EVERY_MINUTE = {"template": "restart-web", "params": {"mode": "soft"}, "interval_seconds": 60}
ON_WEB = {**EVERY_MINUTE, "targets": {"groups": ["web"]}}
ON_DB = {**EVERY_MINUTE, "targets": {"groups": ["db"]}}

# user -> (role, operator groups, granted groups of restart-web)
USERS: dict[str, tuple[str, list[str] | None, list[str]]] = {
    "viewer-granted": ("viewer", None, ["web"]),
    "op-web": ("operator", ["web"], []),
    "op-db-granted-web": ("operator", ["db"], ["web"]),
}
# (user, what) -> expected status of POST /api/v1/schedules
MATRIX: dict[tuple[str, str], int] = {
    ("viewer-granted", "on web"): 403,  # a viewer schedules nothing, grant or not
    ("op-web", "on web"): 403,  # its own group, but no grant for the template
    ("op-db-granted-web", "on web"): 201,
    ("op-db-granted-web", "template's targets"): 201,  # the template's default: web
    ("op-db-granted-web", "on db"): 403,  # its own group, but not a granted one
    ("admin", "on db"): 201,
}


def _body(what: str) -> dict[str, Any]:
    return {"on web": ON_WEB, "on db": ON_DB, "template's targets": EVERY_MINUTE}[what]


async def _users(client: httpx.AsyncClient) -> dict[str, dict[str, str]]:
    headers: dict[str, dict[str, str]] = {"admin": {}}
    for user, (role, groups, granted) in USERS.items():
        token = await _token(client, user, role, groups)
        headers[user] = {"Authorization": f"Bearer {token}"}
        if granted:
            grant = {"template": "restart-web", "groups": granted}
            answer = await client.post(f"/api/v1/users/{user}/template-grants", json=grant)
            assert answer.status_code == 200, answer.text
    return headers


async def test_the_permission_matrix_of_schedule_creation(tmp_path: Path) -> None:
    async with api(tmp_path) as (_app, _link, client):
        assert (await client.post("/api/v1/templates", json=RESTART_WEB)).status_code == 201
        headers = await _users(client)
        found: dict[tuple[str, str], int] = {}
        for user, what in MATRIX:
            answer = await client.post("/api/v1/schedules", json=_body(what), headers=headers[user])
            found[(user, what)] = answer.status_code
            if answer.status_code == 403:
                assert answer.json()["detail"], answer.text
            if (user, what) == ("op-web", "on web"):
                assert "needs a grant for this template" in answer.json()["detail"]
            if (user, what) == ("op-db-granted-web", "on db"):
                assert "db-1" in answer.json()["detail"], answer.text
        assert found == MATRIX
        mine = (await client.get("/api/v1/schedules")).json()["items"]
        assert len(mine) == 3
        assert [s["created_by"] for s in mine].count("op-db-granted-web") == 2


async def test_an_operator_changes_and_deletes_only_its_own_schedules(tmp_path: Path) -> None:
    async with api(tmp_path) as (_app, _link, client):
        assert (await client.post("/api/v1/templates", json=RESTART_WEB)).status_code == 201
        headers = await _users(client)
        operator = headers["op-db-granted-web"]
        own = (await client.post("/api/v1/schedules", json=ON_WEB, headers=operator)).json()
        admins = (await client.post("/api/v1/schedules", json=ON_DB)).json()
        paused = await client.patch(
            f"/api/v1/schedules/{own['id']}", json={"paused": True}, headers=operator
        )
        assert paused.status_code == 200 and paused.json()["paused"] is True
        refused = await client.patch(
            f"/api/v1/schedules/{admins['id']}", json={"paused": True}, headers=operator
        )
        assert refused.status_code == 403
        assert "may change only its own schedules" in refused.json()["detail"]
        gone = await client.delete(f"/api/v1/schedules/{admins['id']}", headers=operator)
        assert gone.status_code == 403
        # The other operator, granted nothing, cannot touch it either; the admin can.
        other = await client.delete(f"/api/v1/schedules/{own['id']}", headers=headers["op-web"])
        assert other.status_code == 403
        resumed = await client.patch(f"/api/v1/schedules/{own['id']}", json={"paused": False})
        assert resumed.status_code == 200
        deleted = await client.delete(f"/api/v1/schedules/{own['id']}", headers=operator)
        assert deleted.status_code == 204


async def _fire(engine: Engine, client: httpx.AsyncClient, schedule_id: str) -> dict[str, Any]:
    """Step the schedule to its next due time (the service's own pass, at that moment) and
    return the newest entry of its history."""
    schedule = (await client.get(f"/api/v1/schedules/{schedule_id}")).json()
    due = datetime.fromisoformat(schedule["next_fire_times"][0])
    await engine.schedules.run_once(now=due + timedelta(seconds=0.5))
    history = (await client.get(f"/api/v1/schedules/{schedule_id}/history")).json()["items"]
    assert history and datetime.fromisoformat(history[0]["due_at"]) == due, history
    return dict(history[0])


async def test_each_fire_checks_the_creator_grant_again(tmp_path: Path) -> None:
    async with api(tmp_path) as (app, _link, client):
        engine: Engine = app.state.engine
        assert (await client.post("/api/v1/templates", json=RESTART_WEB)).status_code == 201
        headers = await _users(client)
        operator = headers["op-db-granted-web"]
        created = await client.post("/api/v1/schedules", json=ON_WEB, headers=operator)
        assert created.status_code == 201, created.text
        schedule_id = created.json()["id"]

        fired = await _fire(engine, client, schedule_id)
        assert fired["outcome"] == "launched", fired
        task = (await client.get(f"/api/v1/tasks/{fired['task_id']}")).json()
        assert task["created_by"] == f"schedule:{schedule_id}"
        assert task["targets"]["groups"] == ["web"]
        # Ended, so that the next due time is not skipped as an overlap.
        await _finish(engine, fired["task_id"])

        taken = await client.delete("/api/v1/users/op-db-granted-web/template-grants/restart-web")
        assert taken.status_code == 200 and taken.json()["groups"] == []
        before = (await client.get("/api/v1/tasks")).json()["total"]
        fired = await _fire(engine, client, schedule_id)
        assert fired["outcome"] == "error", fired
        assert fired["task_id"] is None
        assert "no longer holds a grant for template restart-web" in fired["detail"], fired
        assert (await client.get("/api/v1/tasks")).json()["total"] == before

        # A grant on another group does not reach the schedule's hosts: refused, naming them.
        grant = {"template": "restart-web", "groups": ["db"]}
        given = await client.post("/api/v1/users/op-db-granted-web/template-grants", json=grant)
        assert given.status_code == 200
        fired = await _fire(engine, client, schedule_id)
        assert fired["outcome"] == "error", fired
        assert "web-1" in fired["detail"], fired

        # Disabled: nothing fires, whatever the grants say.
        grant = {"template": "restart-web", "groups": ["web"]}
        await client.post("/api/v1/users/op-db-granted-web/template-grants", json=grant)
        disabled = await client.patch("/api/v1/users/op-db-granted-web", json={"disabled": True})
        assert disabled.status_code == 200, disabled.text
        fired = await _fire(engine, client, schedule_id)
        assert fired["outcome"] == "error" and "is disabled" in fired["detail"], fired
        assert (await client.get("/api/v1/tasks")).json()["total"] == before
